"""Run the seeder's command line: ``python -m fleet.simulate.seed``."""

import sys

from fleet.simulate.seed.cli import main

sys.exit(main())
