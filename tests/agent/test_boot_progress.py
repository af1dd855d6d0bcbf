"""First-boot progress as the real code paths record it: startup, the link, the executor.

The controller is the enrollment fake over real HTTP; no broker runs, so the link's
session keeps failing to connect, which is what the desired-state step must explain.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import httpx
import pytest

from agent.boot_status import BootRecorder, Step, StepState
from agent.cli import _join_fleet
from agent.config import AgentSettings, LinkSettings, ModelSpec
from agent.errors import ConfigError
from agent.link.enroll import transport_reason
from agent.link.errors import EnrollmentRejected
from agent.link.fleet import FleetLink, prepare_identity
from agent.state.apply import ModelController
from agent.store import ModelStore
from models.manifest import RuntimeParams
from models.wire import EnrollmentRequest
from scripts.servers import free_port
from tests.agent.test_apply import Loader, desired, make_state
from tests.agent.test_link_session import DEVICE_REPORT
from tests.fakes.enrollment import FakeController, accept_as
from tests.fakes.link_host import FakeHost, FakeTelemetry
from tests.polling import eventually

DEVICE = "dev-boot-1"
PASSWORD = "boot-secret"
HARDWARE_ID = "4c4c4544-0042-3510-8052-b4c04f565631"


def probe() -> object:
    return DEVICE_REPORT


def link_settings(state_dir: Path, **overrides: object) -> LinkSettings:
    values: dict[str, object] = {
        "state_dir": state_dir,
        "enroll_timeout_s": 2,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
    }
    values.update(overrides)
    return LinkSettings.model_validate(values)


def state_of(recorder: BootRecorder, step: Step) -> StepState:
    return recorder.status.step(step).state


def test_an_unreachable_controller_leaves_enrollment_retrying(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    boot = BootRecorder(tmp_path / "boot.json")
    identity = asyncio.run(
        prepare_identity(link_settings(tmp_path / "state", url=url, token="t"), probe, boot=boot)
    )
    assert identity is None
    assert state_of(boot, Step.PROVISIONED) is StepState.DONE
    assert boot.status.step(Step.DEVICE_KEY).detail == str(tmp_path / "state" / "device.key")
    enrolled = boot.status.step(Step.ENROLLED)
    assert enrolled.state is StepState.ACTIVE
    assert enrolled.error == (
        f"controller unreachable at {url}: connection refused; retrying in the background"
    )
    assert boot.status.last_error == enrolled.error


def test_a_fleet_url_without_a_token_is_not_provisioned(tmp_path: Path) -> None:
    boot = BootRecorder(None)
    with pytest.raises(ConfigError, match="pass --token"):
        asyncio.run(
            prepare_identity(link_settings(tmp_path, url="https://fleet.example"), probe, boot=boot)
        )
    assert state_of(boot, Step.PROVISIONED) is StepState.FAILED
    assert "not enrolled with https://fleet.example" in str(boot.status.last_error)


def test_a_refused_token_fails_the_enrolled_step(tmp_path: Path) -> None:
    def refuse(_: EnrollmentRequest) -> tuple[int, dict[str, object]]:
        return 403, {"error": {"code": "enrollment_rejected", "message": "token tok-1 is used up"}}

    boot = BootRecorder(None)
    with FakeController(refuse) as ctl, pytest.raises(EnrollmentRejected):
        asyncio.run(
            prepare_identity(
                link_settings(tmp_path, url=ctl.url, token="eft_used"), probe, boot=boot
            )
        )
    enrolled = boot.status.step(Step.ENROLLED)
    assert enrolled.state is StepState.FAILED
    assert enrolled.error is not None
    assert enrolled.error.startswith(f"enrollment refused by {ctl.url} (HTTP 403): token tok-1")


def test_enrolling_sends_the_hardware_id_and_later_starts_need_no_controller(
    tmp_path: Path,
) -> None:
    boot = BootRecorder(None)
    with FakeController(accept_as(DEVICE, "mqtt://127.0.0.1:1", PASSWORD)) as ctl:
        identity = asyncio.run(
            prepare_identity(
                link_settings(tmp_path, url=ctl.url, token="eft_good"),
                probe,
                boot=boot,
                hardware_id=lambda: HARDWARE_ID,
            )
        )
    assert identity is not None
    assert [r.hardware_id for r in ctl.requests] == [HARDWARE_ID]
    assert state_of(boot, Step.ENROLLED) is StepState.DONE
    assert boot.status.step(Step.ENROLLED).detail == f"device {DEVICE} of {ctl.url}"

    later = BootRecorder(None)
    asyncio.run(prepare_identity(link_settings(tmp_path), probe, boot=later))
    assert {state_of(later, s) for s in (Step.PROVISIONED, Step.DEVICE_KEY, Step.ENROLLED)} == {
        StepState.DONE
    }


def test_without_a_hardware_id_the_request_carries_none(tmp_path: Path) -> None:
    with FakeController(accept_as(DEVICE, "mqtt://127.0.0.1:1", PASSWORD)) as ctl:
        asyncio.run(
            prepare_identity(
                link_settings(tmp_path, url=ctl.url, token="t"), probe, hardware_id=lambda: None
            )
        )
    assert [r.hardware_id for r in ctl.requests] == [None]


def test_a_device_outside_any_fleet_skips_the_fleet_steps(tmp_path: Path) -> None:
    boot = BootRecorder(None)
    _join_fleet(AgentSettings(fleet=LinkSettings(state_dir=tmp_path)), boot)
    for step in (Step.PROVISIONED, Step.DEVICE_KEY, Step.ENROLLED, Step.DESIRED_STATE):
        assert state_of(boot, step) is StepState.SKIPPED
    assert state_of(boot, Step.MODELS) is StepState.PENDING


def test_the_link_records_its_retries_then_enrollment_then_the_missing_broker(
    tmp_path: Path,
) -> None:
    port = free_port()
    broker = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    boot = BootRecorder(tmp_path / "boot.json")
    url = f"http://127.0.0.1:{port}"

    async def scenario() -> None:
        link = FleetLink(
            link_settings(tmp_path / "state", url=url, token="t"),
            FakeHost(),
            FakeTelemetry(),
            DEVICE_REPORT,
            boot=boot,
            hardware_id=lambda: HARDWARE_ID,
        )
        async with link:
            error = await eventually(
                lambda: boot.status.step(Step.ENROLLED).error, "a failed enrollment"
            )
            assert error.startswith(f"controller unreachable at {url}: connection refused; ")
            assert "retrying in " in error
            with FakeController(accept_as(DEVICE, broker, PASSWORD), port=port) as ctl:
                await eventually(lambda: boot.is_done(Step.ENROLLED), "enrolled")
            assert [r.hardware_id for r in ctl.requests][-1] == HARDWARE_ID
            waiting = await eventually(
                lambda: boot.status.step(Step.DESIRED_STATE).error, "the broker's absence"
            )
            assert waiting.startswith(f"broker {broker}: ")
            assert "retrying in " in waiting
            assert state_of(boot, Step.DESIRED_STATE) is StepState.ACTIVE
            assert boot.status.step(Step.DESIRED_STATE).detail == (
                f"waiting for the desired state from {broker}"
            )

    asyncio.run(scenario())


def test_an_unusable_provisioned_broker_ca_disables_the_link_and_says_why(tmp_path: Path) -> None:
    bad = tmp_path / "broker-ca.pem"
    bad.write_text("not a certificate")
    boot = BootRecorder(None)

    async def scenario() -> None:
        link = FleetLink(
            link_settings(tmp_path / "state", url="http://127.0.0.1:1", token="t", broker_ca=bad),
            FakeHost(),
            FakeTelemetry(),
            DEVICE_REPORT,
            boot=boot,
        )
        async with link:
            assert link.state == "disabled"

    asyncio.run(scenario())
    assert state_of(boot, Step.ENROLLED) is StepState.FAILED
    assert f"the broker CA {bad} is not a PEM certificate" in str(boot.status.last_error)


# -- the models step, recorded by the executor ------------------------------------------------


def test_the_executor_records_loading_then_serving_or_the_failure(tmp_path: Path) -> None:
    store = tmp_path / "store"
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF fake weights")
    ModelStore(store).install(source, name="llm", version="2", runtime=RuntimeParams())
    boot = BootRecorder(None)
    seen: list[str] = []
    boot.listeners.append(lambda s: seen.append(str(s.step(Step.MODELS).detail)))
    controller = ModelController(
        make_state(store), [ModelSpec(name="llm")], load=Loader(), boot=boot
    )

    async def scenario() -> None:
        await controller.reconcile()
        assert controller.serving.is_set()
        assert state_of(boot, Step.MODELS) is StepState.DONE
        assert boot.status.step(Step.MODELS).detail == "serving llm"
        await controller.apply_desired(desired(1, ("llm", None), ("ghost", None)))
        models = boot.status.step(Step.MODELS)
        assert models.state is StepState.ACTIVE  # waiting for ghost, not failed
        assert models.detail is not None
        assert models.detail.startswith("waiting for ghost")

    asyncio.run(scenario())
    assert seen[0] == "loading llm"

    broken = BootRecorder(None)
    failing = ModelController(
        make_state(store), [ModelSpec(name="llm")], load=Loader(fail={"llm"}), boot=broken
    )
    asyncio.run(failing.reconcile())
    models = broken.status.step(Step.MODELS)
    assert models.state is StepState.FAILED
    assert models.error == "not serving llm: llm is broken"


def test_transport_reasons_are_the_os_errors_words() -> None:
    def chained(outer: Exception, inner: BaseException) -> Exception:
        outer.__cause__ = inner
        return outer

    refused = OSError(111, "Connect call failed ('127.0.0.1', 1)")
    assert transport_reason(chained(httpx.ConnectError("x"), refused)) == "connection refused"
    dns = socket.gaierror(-2, "Name or service not known")
    assert transport_reason(chained(httpx.ConnectError("x"), dns)) == "name or service not known"
    assert transport_reason(httpx.ReadTimeout("timed out")) == "timed out"
    untrusted = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] ...")
    untrusted.verify_message = "self-signed certificate"
    assert transport_reason(chained(httpx.ConnectError("x"), untrusted)) == (
        "the TLS certificate is not trusted (self-signed certificate)"
    )  # not errno 1's "operation not permitted"
