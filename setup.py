"""Build hook: fetch the dashboard's pinned front-end assets before packaging them.

Everything else about the build is in pyproject.toml. The assets are never committed
(docs/dashboard.md), so ``build_py`` runs the fetcher in the source tree first; the
package-data globs then ship ``fleet/dashboard/static/vendor/``. The fetcher runs by its
file path, not as ``-m fleet.dashboard.vendor``: importing the ``fleet.dashboard``
package builds the web app, whose dependencies (FastAPI, Jinja2) the build environment
does not have; the fetcher itself needs only httpx and :mod:`fleet.errors`.
"""

import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FETCH = "import runpy; runpy.run_path('fleet/dashboard/vendor.py', run_name='__main__')"


class BuildPyWithAssets(build_py):
    """``build_py`` that first installs the front-end assets pinned in package-lock.json."""

    def run(self) -> None:
        subprocess.run([sys.executable, "-c", FETCH], cwd=ROOT, check=True)
        self.__dict__.pop("data_files", None)  # computed lazily: glob again, assets included
        super().run()


setup(cmdclass={"build_py": BuildPyWithAssets})
