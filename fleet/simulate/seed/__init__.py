"""Fill a controller database with a realistic fleet, fast: for the dashboard and its benchmark.

``python -m fleet.simulate.seed --database-url URL --devices 10000 --days 7 --interval-min 15``
migrates the database (:func:`fleet.db.migrate`), refuses one that already holds
devices, and writes, the same rows for the same ``--seed`` and ``--now``:

- users ``alice`` (admin), ``bob`` (operator) and ``carol`` (viewer), the people in the
  audit trail, each with the password ``edgefleet-seed``: a seeded database is for
  development and benchmarks, never for production;
- groups (sites, each with a time zone and an enrollment token) and devices in them, with
  tags, hardware reports drawn from :data:`~fleet.simulate.hardware.HARDWARE`, agent
  versions, and a mix of standings: online (seen in the last minute), offline (gone for
  minutes to weeks), never connected since enrolling, revoked;
- a registered model, ``gemma3-270m`` 1.0, 1.1 and 1.2 in two variants, and an embedder,
  ``minilm-l6`` 1.0 and 2.0 (yanked);
- each device's desired state (signed targets of those models) and reported state (what
  it serves, some models degraded, some devices drifting from what they should run);
- telemetry: a sample per device every ``--interval-min`` minutes over ``--days`` days,
  from enrollment (or the range's start) until the device was last seen, with gaps, load
  that follows the device's local day and numbers that fit its hardware, stored in time
  order across devices as the ingest stores them (so a device's rows are spread over the
  table, not packed together);
- events: connects and disconnects, agent restarts, downloads and installs, health
  checks passed and rolled back, breaker transitions, out-of-memory failures;
- three rollouts as the engine (:mod:`fleet.rollout.engine`) would leave them, with
  their gate checks and evidence and audit trails: one completed six days ago, one
  aborted by an abort rule after failed health checks, and one active, in its second
  stage with devices updated, updating, queued, timed out, failed and ineligible. The
  engine's next steps change nothing for about 45 minutes: every updating device has
  time left and the concurrency cap is full.

Rows are shaped as the controller's own writers shape them and written in bulk:
SQLAlchemy Core executemany in batches on SQLite, ``COPY`` on PostgreSQL (several times
faster for millions of telemetry rows), then ``ANALYZE`` on PostgreSQL so its planner
knows the tables' sizes at once, as autovacuum would tell it a minute later. Nothing
passes through the API or the broker, so none of their checks vouch for these rows:
``tests/fleet/test_seed.py`` reads them back through the controller's own read paths.

The layering allows this module only what lies below :mod:`fleet.simulate`
(:mod:`fleet.db`, :mod:`fleet.tables`, :mod:`models`), so the rollout plan's device rank
and stage quotas, a spec's defaults and the registry's target paths are restated here;
the test checks that they agree with the originals.
"""

from fleet.simulate.seed.artifacts import (
    _artifacts as _artifacts,
)  # for the tests: the seeded registry
from fleet.simulate.seed.cli import main
from fleet.simulate.seed.config import (
    SEED_PASSWORD,
    TELEMETRY_COLUMNS,
    USERS,
    SeedConfig,
    SeedResult,
)
from fleet.simulate.seed.load import seed
from fleet.simulate.seed.rules import device_rank, rollout_spec, stage_quotas, target_path
from fleet.simulate.seed.writer import _Writer as _Writer  # for the tests: its rebuild threshold

__all__ = [
    "SEED_PASSWORD",
    "TELEMETRY_COLUMNS",
    "USERS",
    "SeedConfig",
    "SeedResult",
    "device_rank",
    "main",
    "rollout_spec",
    "seed",
    "stage_quotas",
    "target_path",
]
