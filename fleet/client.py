"""A small client of the controller's REST API, as the ``edgefleet`` CLI uses it.

It turns every failure into :class:`ClientError` with one line a person can act on
("is `edgefleet serve` running?", "pass --admin-token"), so the CLI never prints a
traceback for an operator's mistake.
"""

from __future__ import annotations

import getpass
import json as jsonlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from fleet.config import ADMIN_TOKEN_FILE

__all__ = [
    "ADMIN_TOKEN_FILE",
    "DEFAULT_URL",
    "UPLOAD_CHUNK_BYTES",
    "ClientError",
    "FleetClient",
    "read_admin_token",
]

DEFAULT_URL = "http://127.0.0.1:8000"
UPLOAD_CHUNK_BYTES = 1024 * 1024  # bytes read from disk per chunk of a model upload
UPLOAD_WAIT_S = 600.0  # after the last byte the controller fsyncs the file: allow for it


class ClientError(Exception):
    """A request the controller refused or never answered; ``str()`` says what to do."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a bare container)
        return ""


def read_admin_token(data_dir: Path) -> str | None:
    """The token the controller generated into ``data_dir``, or None when it is not there."""
    try:
        token = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
    except OSError:
        return None
    return token or None


class FleetClient:
    """JSON in, JSON out; one ``httpx.Client`` (pass ``http`` to reuse one, as tests do)."""

    def __init__(
        self,
        url: str,
        admin_token: str | None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.url = url.rstrip("/")
        self._token = admin_token
        self._own = http is None
        self._http = http or httpx.Client(base_url=self.url, timeout=timeout)

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._own:
            self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> Any:
        return self._send(method, path, json, params, content, headers, timeout)[1]

    def _send(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        content: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> tuple[int, Any]:
        sent = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        sent["X-Edgefleet-Actor"] = _login()  # who, for the audit log
        sent.update(headers or {})
        query = {k: v for k, v in (params or {}).items() if v is not None}
        # A client handed in (a test's TestClient) keeps its own timeouts.
        extra: dict[str, Any] = {"timeout": timeout} if timeout and self._own else {}
        try:
            response = self._http.request(
                method, path, json=json, params=query, headers=sent, content=content, **extra
            )
        except httpx.ConnectError:
            raise ClientError(
                f"cannot reach the controller at {self.url}: is `edgefleet serve` running?"
            ) from None
        except httpx.TimeoutException:
            raise ClientError(f"the controller at {self.url} did not answer in time") from None
        except httpx.TransportError as exc:
            raise ClientError(f"cannot talk to the controller at {self.url}: {exc}") from None
        if response.status_code == 204:
            return 204, None
        if response.is_success:
            return response.status_code, response.json()
        raise self._error(response)

    def upload(
        self,
        path: str,
        file: Path,
        *,
        params: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[bool, Any]:
        """Stream ``file`` as the raw body; ``(created, response)``, ``progress`` gets bytes sent.

        The file is read in chunks as it is sent, so its size never matters here.
        """
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise ClientError(f"cannot read {file}: {exc}") from None

        def chunks() -> Iterator[bytes]:
            with file.open("rb") as source:
                while chunk := source.read(UPLOAD_CHUNK_BYTES):
                    yield chunk
                    if progress is not None:
                        progress(len(chunk))

        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "X-Edgefleet-Metadata": jsonlib.dumps(metadata or {}),  # ASCII: header-safe
        }
        timeout = httpx.Timeout(30.0, read=UPLOAD_WAIT_S)
        status, body = self._send("POST", path, None, params, chunks(), headers, timeout)
        return status == 201, body

    def _error(self, response: httpx.Response) -> ClientError:
        status = response.status_code
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = "http_error", response.text[:200] or response.reason_phrase
        if status == 401:
            how = (
                "the controller rejected the admin token"
                if self._token
                else "no admin token was found"
            )
            message = (
                f"{how}: pass --admin-token, set EDGEFLEET_ADMIN_TOKEN, or point --data-dir at "
                "the controller's data folder (it holds the admin-token file)"
            )
        return ClientError(f"{message} (HTTP {status})", status=status, code=code)

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, json=body)

    def put(self, path: str, body: Any) -> Any:
        return self.request("PUT", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        return self.request("PATCH", path, json=body)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    # -- alerts (docs/alerts.md) ---------------------------------------------------------

    def alerts(self, *, state: str = "open", kind: str | None = None, limit: int = 200) -> Any:
        """Alerts, newest first: ``state`` "open" or "all"."""
        return self.get("/api/v1/alerts", state=state, kind=kind, limit=limit)

    def acknowledge_alert(self, alert_id: int) -> Any:
        return self.post(f"/api/v1/alerts/{alert_id}/acknowledge")

    def alert_rules(self) -> Any:
        return self.get("/api/v1/alerts/rules")

    def set_alert_rule(self, kind: str, *, enabled: bool, params: dict[str, Any]) -> Any:
        """Replace one rule's settings: ``params`` are all the overrides it keeps."""
        path = f"/api/v1/alerts/rules/{quote(kind, safe='')}"
        return self.put(path, {"enabled": enabled, "params": params})

    def alert_webhook(self) -> Any:
        return self.get("/api/v1/alerts/webhook")

    def set_alert_webhook(self, url: str, *, secret: str | None = None) -> Any:
        return self.put("/api/v1/alerts/webhook", {"url": url, "secret": secret})

    def delete_alert_webhook(self) -> Any:
        return self.delete("/api/v1/alerts/webhook")

    def test_alert_webhook(self) -> Any:
        return self.post("/api/v1/alerts/webhook/test")
