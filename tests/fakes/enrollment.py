"""A fake of the controller's enrollment endpoints (``POST /api/v1/enroll``), over real HTTP.

The agent enrolls through httpx against a real socket, so the fake is a tiny
``ThreadingHTTPServer``: it checks the signed request as the controller does
(:func:`models.trust.verify_enrollment`) and lets the test decide the answer
(``respond``; :func:`accept_as` answers like a controller that accepts the device).
With ``check`` it also answers provisioning's token check (``POST /api/v1/enroll/check``;
:func:`check_tokens` answers like the controller for a set of tokens).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from pydantic import ValidationError

from models.paths import PROVISION_CHECK_PATH
from models.trust import TrustError, verify_enrollment
from models.wire import (
    BrokerCredentials,
    EnrollmentRequest,
    EnrollmentResponse,
    ProvisionCheckRequest,
    ProvisionCheckResponse,
)

__all__ = ["CheckResponder", "FakeController", "Responder", "accept_as", "check_tokens"]


Responder = Callable[[EnrollmentRequest], tuple[int, dict[str, Any]]]
CheckResponder = Callable[[ProvisionCheckRequest], tuple[int, dict[str, Any]]]


class FakeController:
    """A tiny real HTTP enrollment endpoint: checks the proof as the controller does.

    ``respond`` decides the answer for each verified request; a request whose proof
    does not verify gets 403 with the reason, like the real one.
    """

    def __init__(
        self, respond: Responder, port: int = 0, *, check: CheckResponder | None = None
    ) -> None:
        self.respond = respond
        self.check = check
        self.requests: list[EnrollmentRequest] = []
        self.checks: list[ProvisionCheckRequest] = []
        controller = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                if self.path == PROVISION_CHECK_PATH and controller.check is not None:
                    self._check(body, controller.check)
                    return
                if self.path != "/api/v1/enroll":
                    self._answer(404, {"detail": "Not Found"})
                    return
                try:
                    request = EnrollmentRequest.model_validate_json(body)
                    verify_enrollment(request, datetime.now(UTC))
                except ValidationError as exc:
                    self._answer(
                        422, {"detail": exc.errors(include_url=False, include_context=False)}
                    )
                    return
                except TrustError as exc:
                    self._answer(403, {"detail": str(exc)})
                    return
                controller.requests.append(request)
                self._answer(*controller.respond(request))

            def _check(self, body: bytes, check: CheckResponder) -> None:
                try:
                    request = ProvisionCheckRequest.model_validate_json(body)
                except ValidationError as exc:
                    self._answer(
                        422, {"detail": exc.errors(include_url=False, include_context=False)}
                    )
                    return
                controller.checks.append(request)
                self._answer(*check(request))

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body, default=str).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        # serve_forever checks for shutdown every 0.05 s, not every 0.5 s (each test waited)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeController:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def accept_as(
    device_id: str, broker_url: str, password: str, *, telemetry_interval_s: float = 10.0
) -> Responder:
    def respond(request: EnrollmentRequest) -> tuple[int, dict[str, Any]]:
        response = EnrollmentResponse(
            device_id=device_id,
            broker=BrokerCredentials(
                url=broker_url, username=device_id, password=password, client_id=device_id
            ),
            telemetry_interval_s=telemetry_interval_s,
        )
        return 200, response.model_dump(mode="json")

    return respond


def check_tokens(
    tokens: dict[str, str],
    *,
    tuf_root: str,
    broker_url: str = "mqtts://broker.example:8883",
    broker_ca_pem: str | None = None,
) -> CheckResponder:
    """Answer the token check like the controller: ``tokens`` maps a secret to its state.

    A state is ``active``, ``used``, ``expired`` or ``revoked``; an unknown secret is
    refused as the controller refuses it, with its ``{"error": {...}}`` body.
    """

    def respond(request: ProvisionCheckRequest) -> tuple[int, dict[str, Any]]:
        state = tokens.get(request.token)
        token_id = f"tok-{abs(hash(request.token)) % 10**6:06d}"
        reasons = {
            None: "unknown enrollment token: check it was copied whole",
            "used": f"enrollment token {token_id} is used up: ask the fleet admin for a new one",
            "expired": f"enrollment token {token_id} expired at 2026-01-01T00:00:00+00:00: "
            "ask the fleet admin for a new one",
            "revoked": f"enrollment token {token_id} was revoked",
        }
        if state != "active":
            error = {"code": "enrollment_rejected", "message": reasons[state]}
            return 403, {"error": error}
        answer = ProvisionCheckResponse(
            token_id=token_id,
            group="lab",
            uses_left=1,
            expires_at=datetime(2030, 1, 1, tzinfo=UTC),
            tuf_root=tuf_root,
            broker_url=broker_url,
            broker_ca_pem=broker_ca_pem,
        )
        return 200, answer.model_dump(mode="json")

    return respond
