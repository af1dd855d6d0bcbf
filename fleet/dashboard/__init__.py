"""The controller's web dashboard: server-rendered pages, htmx and pinned front-end assets.

:func:`install` adds it to the controller's app under ``/ui``: the pages
(:mod:`fleet.dashboard.pages`), signing in and out, the live event stream, the static
files (own and vendored, :mod:`fleet.dashboard.vendor`), HTML error pages and the
security headers. The pages call the same services and role checks as the REST API.
"""

from fleet.dashboard.app import install

__all__ = ["install"]
