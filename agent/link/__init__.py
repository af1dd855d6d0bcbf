"""The agent's side of the fleet link: enrollment, MQTT session, spool, telemetry.

- :mod:`agent.link.fleet`: :class:`~agent.link.fleet.FleetLink`, the async context
  manager the app's lifespan enters; everything runs in the background.
- :mod:`agent.link.applier`: hands desired states to the executor without waiting on
  it, so a newer one can pre-empt a download; reconciles asked for meanwhile coalesce.
- :mod:`agent.link.outcomes`: a reconcile's outcomes as events, one per thing that happened.
- :mod:`agent.link.enroll`: the signed enrollment request and its refusals.
- :mod:`agent.link.identity`: the state folder (device key, identity, last desired state).
- :mod:`agent.link.session`: the MQTT connection, receive, send, report, reconnect.
- :mod:`agent.link.spool`: store-and-forward on disk (SQLite).
- :mod:`agent.link.telemetry`: one window of statistics as a wire sample.

Nothing is imported here, so reading an identity does not load the MQTT client.
The operator's guide is docs/agent-fleet.md.
"""
