"""The edgefleet fleet controller: devices, desired state, signed model updates, telemetry.

Imports run one way, top to bottom; nothing imports upward and nothing imports the
agent (:mod:`models` is all the two share):

- :mod:`fleet.cli`: the ``edgefleet`` command, one module per command group;
- :mod:`fleet.app`: the FastAPI app, built in its lifespan from the settings;
- :mod:`fleet.api`: one router per resource; routes parse and call a service;
- the jobs: :mod:`fleet.desired` (desired state, stored then published) above
  :mod:`fleet.link` (MQTT), :mod:`fleet.registry` (model artifacts, TUF),
  :mod:`fleet.simulate` (simulated devices), :mod:`fleet.state` (drift),
  :mod:`fleet.tokens` and :mod:`fleet.client` (the CLI's HTTP client);
- the resources: :mod:`fleet.db`, :mod:`fleet.tables`, :mod:`fleet.files`,
  :mod:`fleet.config`, then :mod:`fleet.errors`.

docs/fleet.md is the operator's guide.
"""
