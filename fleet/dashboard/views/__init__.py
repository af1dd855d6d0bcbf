"""Queries the dashboard's pages need beyond the API's services: in SQL, bounded, small."""

__all__: list[str] = []
