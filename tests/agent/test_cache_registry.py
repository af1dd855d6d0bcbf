from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.errors import ConfigError, InvalidRequest, ModelNotFound, ModelNotReady
from agent.runtime.base import Embedder, RuntimeInfo, SamplingParams
from agent.serving.cache import ResponseCache, cache_key
from agent.serving.registry import ModelRegistry
from agent.serving.scheduler import GenerationRequest, GenerationResult
from models.manifest import ModelFormat, ModelManifest


def result(text: str) -> GenerationResult:
    return GenerationResult(text, "stop", 1, 1, 0, 0.1, 0.2)


def test_only_greedy_requests_have_cache_keys() -> None:
    greedy = GenerationRequest(prompt=[1, 2], max_tokens=4)
    sampled = GenerationRequest(
        prompt=[1, 2], max_tokens=4, sampling=SamplingParams(temperature=0.7)
    )
    assert cache_key("m", "1", greedy) is not None
    assert cache_key("m", "1", sampled) is None


def test_keys_differ_by_model_version_prompt_and_params() -> None:
    base = GenerationRequest(prompt=[1, 2], max_tokens=4)
    keys = {
        cache_key("m", "1", base),
        cache_key("m", "2", base),
        cache_key("other", "1", base),
        cache_key("m", "1", GenerationRequest(prompt=[1, 3], max_tokens=4)),
        cache_key("m", "1", GenerationRequest(prompt=[1, 2], max_tokens=5)),
        cache_key("m", "1", GenerationRequest(prompt=[1, 2], max_tokens=4, stop=("x",))),
    }
    assert len(keys) == 6


def test_lru_evicts_the_least_recently_used() -> None:
    cache = ResponseCache(2)
    cache.put("a", result("A"))
    cache.put("b", result("B"))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", result("C"))
    assert cache.get("b") is None
    assert cache.get("a") is not None
    assert cache.get("c") is not None
    assert len(cache) == 2


def test_zero_sized_cache_stores_nothing() -> None:
    cache = ResponseCache(0)
    cache.put("a", result("A"))
    assert cache.get("a") is None


@dataclass
class Model:
    name: str
    memory: int = 100
    closed: list[str] = field(default_factory=list)

    @property
    def manifest(self) -> ModelManifest:
        return ModelManifest(
            name=self.name,
            version="1",
            format=ModelFormat.GGUF,
            file="m.gguf",
            sha256="0" * 64,
            size_bytes=1,
        )

    @property
    def info(self) -> RuntimeInfo:
        return RuntimeInfo("fake", "0", "cpu", "fake", memory_bytes=self.memory)

    def close(self) -> None:
        self.closed.append(self.name)


def test_swap_keeps_the_old_model_until_its_last_lease_ends() -> None:
    reg = ModelRegistry()
    old, new = Model("m"), Model("m")
    reg.publish("m", old)
    with reg.lease("m", Model) as leased:
        reg.publish("m", new)
        assert leased is old
        assert old.closed == []  # still serving the in-flight request
        with reg.lease("m", Model) as fresh:
            assert fresh is new
    assert old.closed == ["m"]
    assert new.closed == []


def test_swap_without_leases_closes_the_old_model_at_once() -> None:
    reg = ModelRegistry()
    old = Model("m")
    reg.publish("m", old)
    reg.publish("m", Model("m"))
    assert old.closed == ["m"]


def test_unknown_loading_failed_and_wrong_kind_are_distinguished() -> None:
    reg = ModelRegistry()
    reg.expect("loading")
    reg.expect("broken")
    reg.fail("broken", "bad magic")
    reg.publish("m", Model("m"))
    with pytest.raises(ModelNotFound), reg.lease("nope", Model):
        pass
    with pytest.raises(ModelNotReady, match="still loading"), reg.lease("loading", Model):
        pass
    with pytest.raises(ModelNotReady, match="bad magic"), reg.lease("broken", Model):
        pass
    with pytest.raises(InvalidRequest, match="does not support"), reg.lease("m", Embedder):
        pass
    assert not reg.ready()
    assert reg.waiting() == (["loading"], {"broken": "bad magic"})


def test_memory_budget_is_enforced_and_counts_replacement() -> None:
    reg = ModelRegistry(memory_budget_bytes=250)
    reg.publish("a", Model("a", memory=100))
    reg.publish("b", Model("b", memory=100))
    with pytest.raises(ConfigError, match="memory budget"):
        reg.check_budget(100)
    reg.check_budget(150, replacing="a")  # a's 100 is freed by the swap
