"""Desired state to served models: the pure mapping, the report, and the controller.

The controller runs the real executor and planner against a real model store; only
loading is faked (the loader seam), so these tests take milliseconds.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.config import AgentSettings, ModelSpec
from agent.errors import ModelLoadError, ModelNotFound
from agent.metrics import AgentMetrics
from agent.runtime.base import RuntimeInfo, ServedModel
from agent.serving.degraded import DegradedMode
from agent.serving.registry import ModelRegistry
from agent.state.apply import ExecutorContext, ModelController, Outcome, specs_for_desired
from agent.state.report import build_report, report_key
from agent.state.saved import SavedDesired
from agent.store import ModelStore
from models.device import DeviceReport
from models.manifest import ModelFormat, ModelManifest, RuntimeParams
from models.policy import Chain, FallbackPolicy, ModelTier
from models.wire import DesiredModel, DesiredState, ModelState
from tests.fakes.models import FakeModel

DEVICE = "dev-apply-1"
NOW = datetime(2026, 5, 1, tzinfo=UTC)


def manifest(name: str, version: str = "1") -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        format=ModelFormat.GGUF,
        file="m.gguf",
        sha256="a" * 64,
        size_bytes=1,
    )


def desired(version: int, *models: tuple[str, str | None]) -> DesiredState:
    return DesiredState(
        device_id=DEVICE,
        version=version,
        models=[DesiredModel(name=n, version=v) for n, v in models],
    )


# -- the pure mapping -----------------------------------------------------------------


def test_desired_models_map_to_specs_from_the_store() -> None:
    tuned = RuntimeParams(context_length=1024)
    mapped = specs_for_desired(
        desired(1, ("llm", "2"), ("emb", None), ("llm", "9")),
        {"llm": manifest("llm", "2"), "emb": manifest("emb", "7")},
        configured=[ModelSpec(name="llm", runtime=tuned), ModelSpec(name="other")],
    )
    assert mapped.specs == [ModelSpec(name="llm", runtime=tuned), ModelSpec(name="emb")]
    assert mapped.missing == {}


def test_absent_models_and_other_versions_are_missing_not_fatal() -> None:
    mapped = specs_for_desired(
        desired(3, ("llm", "2"), ("ghost", None), ("emb", None)),
        {
            "llm": manifest("llm", "1"),
            "ghost": "model 'ghost' is not installed",
            "emb": manifest("emb"),
        },
    )
    assert mapped.specs == [ModelSpec(name="emb")]
    assert mapped.missing == {
        "llm": "version 2 of 'llm' is not in the model store (it holds 1)",
        "ghost": "model 'ghost' is not installed",
    }


# -- the report ---------------------------------------------------------------------------


def report_for(
    want: DesiredState | None,
    served: list[ServedModel],
    *,
    loading: list[str] | None = None,
    failed: dict[str, str] | None = None,
    missing: dict[str, str] | None = None,
) -> dict[str, tuple[ModelState, str | None, str | None]]:
    report = build_report(
        device_id=DEVICE,
        desired=want,
        served=served,
        loading=loading or [],
        failed=failed or {},
        missing=missing or {},
        agent_version="1.2.3",
        device=None,
        now=NOW,
    )
    assert report.agent_version == "1.2.3"
    assert report.reported_at == NOW
    assert report.desired_version == (want.version if want else None)
    return {m.name: (m.state, m.version, m.error) for m in report.models}


def test_report_states_and_convergence() -> None:
    want = desired(4, ("llm", "2"), ("emb", None), ("ghost", None))
    llm = FakeModel(manifest("llm", "2"))
    states = report_for(
        want,
        [llm],
        loading=["emb"],
        missing={"ghost": "not in the store"},
    )
    assert states == {
        "emb": (ModelState.LOADING, None, None),
        "ghost": (ModelState.MISSING, None, "not in the store"),
        "llm": (ModelState.READY, "2", None),
    }


def test_converged_needs_every_desired_model_ready_at_its_version_and_nothing_else() -> None:
    want = desired(5, ("llm", "2"), ("emb", None))

    def converged(served: list[ServedModel], **kw: dict[str, str]) -> bool:
        return build_report(
            device_id=DEVICE,
            desired=want,
            served=served,
            loading=[],
            failed=kw.get("failed", {}),
            missing=kw.get("missing", {}),
            agent_version="1",
            device=None,
            now=NOW,
        ).converged

    llm2, llm1 = FakeModel(manifest("llm", "2")), FakeModel(manifest("llm", "1"))
    emb, extra = FakeModel(manifest("emb")), FakeModel(manifest("extra"))
    assert converged([llm2, emb])
    assert not converged([llm1, emb])
    assert not converged([llm2])
    assert not converged([llm2, emb, extra])
    assert not converged([llm1, emb], missing={"llm": "version 2 is not in the store"})


def test_an_older_copy_still_serving_is_reported_missing_with_its_version() -> None:
    states = report_for(
        desired(6, ("llm", "2")),
        [FakeModel(manifest("llm", "1"))],
        missing={"llm": "version 2 of 'llm' is not in the model store (it holds 1)"},
    )
    assert states["llm"][:2] == (ModelState.MISSING, "1")


def test_the_report_key_ignores_only_the_time() -> None:
    def make(now: datetime, served: list[ServedModel]) -> str:
        return report_key(
            build_report(
                device_id=DEVICE,
                desired=None,
                served=served,
                loading=[],
                failed={},
                missing={},
                agent_version="1",
                device=None,
                now=now,
            )
        )

    llm = FakeModel(manifest("llm"))
    assert make(NOW, [llm]) == make(datetime.now(UTC), [llm])
    assert make(NOW, [llm]) != make(NOW, [])


# -- the controller, with a real store and executor -----------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF fake weights")
    store = ModelStore(root)
    store.install(source, name="llm", version="2", runtime=RuntimeParams())
    store.install(source, name="emb", version="1", runtime=RuntimeParams())
    return root


def make_state(store: Path) -> ExecutorContext:
    registry = ModelRegistry()
    return ExecutorContext(
        settings=AgentSettings(store_dir=store),
        registry=registry,
        metrics=AgentMetrics(registry.models),
        device=DeviceReport(
            hostname="h",
            os="linux",
            kernel="6",
            arch="x86_64",
            cpu_physical_cores=1,
            cpu_logical_cores=1,
            ram_total_bytes=1,
            ram_available_bytes=1,
        ),
    )


class Loader:
    def __init__(self, fail: set[str] | None = None) -> None:
        self.loaded: list[str] = []
        self.fail = fail or set()

    def __call__(
        self, manifest: ModelManifest, path: Path, settings: AgentSettings, registry: ModelRegistry
    ) -> ServedModel:
        if manifest.name in self.fail:
            raise ModelLoadError(f"{manifest.name} is broken")
        assert path.is_file()
        self.loaded.append(f"{manifest.name}@{manifest.version}")
        return FakeModel(manifest)


def test_a_desired_state_takes_over_from_the_config_and_is_saved(
    store: Path, tmp_path: Path
) -> None:
    state = make_state(store)
    saved = SavedDesired(tmp_path / "state" / "desired.json")
    load = Loader()
    controller = ModelController(state, [ModelSpec(name="emb")], saved=saved, load=load)
    changes: list[int] = []
    outcomes: list[Outcome] = []
    controller.on_change = lambda: changes.append(1)
    controller.on_outcomes = outcomes.extend

    async def scenario() -> None:
        await controller.reconcile()
        assert state.registry.names() == ["emb"]
        await controller.apply_desired(desired(1, ("llm", "2"), ("ghost", None)))
        assert state.registry.names() == ["llm"]  # emb is not desired: unloaded
        assert saved.load() == controller.desired
        # SIGHUP with another configured list: the desired state still wins.
        await controller.reload_config([ModelSpec(name="emb")])
        assert state.registry.names() == ["llm"]
        loading, failed = state.registry.waiting()
        assert (loading, list(failed)) == ([], ["ghost"])  # /readyz says why
        report = controller.report(DEVICE)
        assert report.desired_version == 1
        assert not report.converged
        assert {m.name: m.state for m in report.models} == {
            "ghost": ModelState.MISSING,
            "llm": ModelState.READY,
        }
        # The controller drops the missing model: converged, and /readyz forgets it.
        await controller.apply_desired(desired(2, ("llm", None)))
        assert state.registry.waiting() == ([], {})
        assert controller.report(DEVICE).converged

    asyncio.run(scenario())
    assert load.loaded == ["emb@1", "llm@2"]
    assert [(o.name, o.action, o.error) for o in outcomes] == [
        ("emb", "load", None),
        ("llm", "load", None),
        ("emb", "unload", None),
    ]
    assert len(changes) >= 8  # before and after every reconcile


def test_a_wanted_version_that_is_not_in_the_store_keeps_the_served_copy(store: Path) -> None:
    state = make_state(store)
    controller = ModelController(state, [], load=Loader())

    async def scenario() -> None:
        await controller.apply_desired(desired(1, ("llm", "2")))
        served = state.registry.models()
        await controller.apply_desired(desired(2, ("llm", "3")))
        assert state.registry.models() == served  # still serving version 2
        assert state.registry.waiting() == ([], {})
        model = controller.report(DEVICE).models[0]
        assert (model.state, model.version) == (ModelState.MISSING, "2")
        assert model.error is not None
        assert "version 3" in model.error

    asyncio.run(scenario())


def test_a_model_that_fails_to_load_is_reported_failed(store: Path) -> None:
    state = make_state(store)
    controller = ModelController(state, [], load=Loader(fail={"emb"}))

    async def scenario() -> list[Outcome]:
        return await controller.apply_desired(desired(1, ("llm", None), ("emb", None)))

    outcomes = asyncio.run(scenario())
    assert [(o.name, o.error) for o in outcomes] == [("llm", None), ("emb", "emb is broken")]
    states = {m.name: (m.state, m.error) for m in controller.report(DEVICE).models}
    assert states == {"emb": (ModelState.FAILED, "emb is broken"), "llm": (ModelState.READY, None)}


class GpuModel(FakeModel):
    """A fake model that says it runs where its manifest's runtime puts it."""

    @property
    def info(self) -> RuntimeInfo:
        on_gpu = self.manifest.runtime.gpu_layers != 0
        return RuntimeInfo("fake", "0", "cuda:0" if on_gpu else "cpu", "fake", memory_bytes=1000)


def test_a_cpu_tier_gets_a_cpu_copy_of_a_gpu_model_and_loses_it_with_the_policy(
    store: Path,
) -> None:
    mode = DegradedMode()
    state = replace(make_state(store), degraded=mode)
    loads: list[int] = []

    def load(
        manifest: ModelManifest, path: Path, settings: AgentSettings, registry: ModelRegistry
    ) -> ServedModel:
        loads.append(manifest.runtime.gpu_layers)
        return GpuModel(manifest)

    controller = ModelController(state, [], load=load)
    policy = FallbackPolicy(
        name="p",
        version=1,
        chains={"llm": Chain(tiers=(ModelTier(model="llm", device="cpu"),))},
    )

    async def scenario() -> None:
        mode.set_policy(policy, "test")
        await controller.apply_desired(desired(1, ("llm", None)))
        assert loads == [-1, 0]  # the model on the GPU, then its CPU copy
        assert state.registry.names() == ["llm"]  # the copy is private to the walker
        with state.registry.lease("llm@cpu", GpuModel) as copy:
            assert copy.info.device == "cpu"
        assert [r.name for r in controller.report(DEVICE).models] == ["llm"]
        mode.set_policy(None, "test")
        await controller.reconcile()
        with pytest.raises(ModelNotFound):
            state.registry.lease("llm@cpu", GpuModel).__enter__()

    asyncio.run(scenario())
