"""The command line: ``python -m fleet.simulate.seed``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from fleet.db import make_engine
from fleet.errors import FleetError
from fleet.simulate.seed.config import SeedConfig
from fleet.simulate.seed.load import seed


def _moment(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.simulate.seed",
        description="Fill a controller database with a realistic fleet (see the module's doc).",
    )
    parser.add_argument("--database-url", required=True, help="any URL `edgefleet serve` takes")
    parser.add_argument("--devices", type=int, default=SeedConfig.devices)
    parser.add_argument("--days", type=float, default=SeedConfig.days, help="of telemetry")
    parser.add_argument(
        "--interval-min", type=float, default=SeedConfig.interval_min,
        help="minutes between a device's telemetry samples",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=SeedConfig.seed)
    parser.add_argument("--now", type=_moment, default=None, help="ISO time; default: now")
    parser.add_argument("--batch-rows", type=int, default=SeedConfig.batch_rows)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        config = SeedConfig(
            devices=args.devices, days=args.days, interval_min=args.interval_min,
            seed=args.seed, now=args.now, batch_rows=args.batch_rows,
        )  # fmt: skip
        engine = make_engine(args.database_url)
    except (ValueError, FleetError) as exc:
        parser.error(str(exc))
    try:
        result = seed(engine, config, out=None if args.quiet else sys.stderr)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        engine.dispose()
    print(json.dumps(result.summary(), indent=2))
    return 0
