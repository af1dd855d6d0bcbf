from __future__ import annotations

from agent.config import ModelSpec
from agent.state.plan import Load, Unload, plan_models
from models.manifest import ModelFormat, ModelManifest, RuntimeParams


def manifest(name: str, sha: str = "a", version: str = "1") -> ModelManifest:
    return ModelManifest(
        name=name,
        version=version,
        format=ModelFormat.GGUF,
        file="m.gguf",
        sha256=sha * 64,
        size_bytes=1,
    )


def test_nothing_to_do_when_current_matches_desired() -> None:
    spec = ModelSpec(name="llm")
    assert plan_models({"llm": (spec, manifest("llm"))}, [(spec, manifest("llm"))]) == []


def test_new_changed_and_removed_models() -> None:
    llm, emb, old = ModelSpec(name="llm"), ModelSpec(name="emb"), ModelSpec(name="old")
    current = {"llm": (llm, manifest("llm")), "old": (old, manifest("old"))}
    desired = [(llm, manifest("llm", sha="b")), (emb, manifest("emb"))]
    assert plan_models(current, desired) == [
        Load(llm, replaces=True),
        Load(emb, replaces=False),
        Unload("old"),
    ]


def test_runtime_override_or_version_change_is_a_swap() -> None:
    spec = ModelSpec(name="llm")
    tuned = ModelSpec(name="llm", runtime=RuntimeParams(context_length=1024))
    current = {"llm": (spec, manifest("llm"))}
    assert plan_models(current, [(tuned, manifest("llm"))]) == [Load(tuned, replaces=True)]
    assert plan_models(current, [(spec, manifest("llm", version="2"))]) == [
        Load(spec, replaces=True)
    ]
