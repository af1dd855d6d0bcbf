"""What the OpenAI and Ollama embedding routes share: the dimension check and the record."""

from __future__ import annotations

from collections.abc import Sequence

from agent.api.deps import AgentState
from agent.errors import InvalidRequest
from agent.interaction_log import Interaction
from agent.runtime.base import Embedder

__all__ = ["check_dimensions", "record_embedding"]


def check_dimensions(name: str, model: Embedder, dimensions: int | None) -> None:
    """A model's vectors have one size; asking for another is a 400, not a silent cut."""
    dim = model.manifest.runtime.embedding_dim
    if dimensions is not None and dim is not None and dimensions != dim:
        raise InvalidRequest(
            f"model {name!r} produces {dim}-dimensional vectors; dimensions cannot be changed",
            param="dimensions",
        )


def record_embedding(
    state: AgentState,
    *,
    request_id: str,
    model: str,
    endpoint: str,
    texts: Sequence[str],
    status: int,
    n_tokens: int,
    error: str | None,
    elapsed: float,
) -> None:
    """Metrics and the interaction log for one embedding request, whatever its outcome."""
    state.metrics.requests.labels(model, endpoint, str(status)).inc()
    state.metrics.latency.labels(model, endpoint).observe(elapsed)
    state.metrics.window.observe(status, elapsed)
    bodies = state.settings.log.include_bodies
    state.interactions.record(
        Interaction(
            request_id=request_id,
            model=model,
            endpoint=endpoint,
            status=status,
            prompt_tokens=n_tokens,
            completion_tokens=0,
            latency_ms=elapsed * 1000,
            error=error,
            prompt="\n".join(texts) if bodies else None,
        )
    )
