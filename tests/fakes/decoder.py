"""A deterministic stand-in for llama.cpp behind the BatchDecoder seam.

It keeps a per-sequence "KV cache" (tokens by position) and picks the next token
from a hash of the whole sequence, so the output depends on exactly the tokens
the scheduler put in the cache: any slot mix-up, lost token or bad prefix reuse
changes the text. Token 0 is end-of-generation; token t prints as letter t.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Mapping, Sequence

from agent.errors import InvalidRequest, Transient
from agent.runtime.base import RuntimeInfo, SamplingParams, TokenLogprob
from agent.runtime.llama_cpp import BatchEntry
from models.manifest import ModelFormat, ModelManifest

VOCAB = 27  # 0 = EOG, 1..26 = a..z
GATE_S = 30.0  # seconds a shut step gate holds a decode step before failing it


class FakeDecoder:
    def __init__(
        self, *, slots: int = 4, n_ctx: int = 64, n_batch: int = 32, eog_after: int | None = None
    ) -> None:
        self.n_slots = slots
        self.n_ctx_slot = n_ctx
        self.n_batch = n_batch
        self.n_vocab = VOCAB
        self.eog_after = eog_after  # emit EOG once a sequence has this many tokens
        self.kv: dict[int, list[int]] = {s: [] for s in range(slots)}
        self.decoded_tokens = 0
        self.calls: list[list[tuple[int, int, int]]] = []  # (seq, pos, n_tokens) per decode call
        self.closed = False
        self.step_gate: threading.Event | None = None  # tests can hold the decode loop
        self.fail_next = False
        self._manifest = ModelManifest(
            name="fake",
            version="1",
            format=ModelFormat.GGUF,
            file="fake.gguf",
            sha256="0" * 64,
            size_bytes=0,
        )

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def info(self) -> RuntimeInfo:
        return RuntimeInfo(runtime="fake", runtime_version="0", device="cpu", provider="fake")

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return [1 + (ord(c) - ord("a")) % 26 for c in text]  # round-trips lower-case letters

    def piece(self, token: int) -> bytes:
        return bytes([ord("a") + token - 1]) if token > 0 else b""

    def is_eog(self, token: int) -> bool:
        return token == 0

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        return "".join(m["content"] for m in messages)

    def decode(self, entries: Sequence[BatchEntry]) -> list[int]:
        if self.step_gate is not None and not self.step_gate.wait(GATE_S):
            raise Transient(f"FakeDecoder: the step gate stayed shut for {GATE_S:g} s")
        if self.fail_next:
            self.fail_next = False
            raise Transient("llama_decode failed with code -1")
        out: list[int] = []
        n = 0
        self.calls.append([(e.seq, e.pos, len(e.tokens)) for e in entries])
        for e in entries:
            cache = self.kv[e.seq]
            assert len(cache) == e.pos, (
                f"seq {e.seq}: KV has {len(cache)} tokens, batch says {e.pos}"
            )
            cache.extend(e.tokens)
            n += len(e.tokens)
            if e.want_logits:
                out.append(n - 1)
        self.decoded_tokens += n
        return out

    def check_grammar(self, grammar: str, *, param: str) -> None:
        if "::=" not in grammar:
            raise InvalidRequest(f"{param}: the grammar does not parse", param=param)

    def set_sampler(self, seq: int, params: SamplingParams) -> None:
        pass

    def logprobs(self, index: int, token: int, top: int) -> TokenLogprob:
        """The fake is sure of its pick: log 1 = 0, its rivals far behind."""
        rivals = [(t, -10.0 - t) for t in range(1, VOCAB) if t != token][: max(top - 1, 0)]
        top_pieces = tuple((self.piece(t), lp) for t, lp in ((token, 0.0), *rivals)[:top])
        return TokenLogprob(token, self.piece(token), 0.0, top_pieces)

    def sample(self, seq: int, index: int) -> int:
        cache = self.kv[seq]
        if self.eog_after is not None and len(cache) >= self.eog_after:
            return 0
        digest = hashlib.sha256(bytes(t % 256 for t in cache)).digest()
        return 1 + digest[0] % 26

    def share(self, source: int, target: int) -> None:
        assert not self.kv[target], f"seq {target} must be emptied before it takes a copy"
        self.kv[target] = list(self.kv[source])

    def forget(self, seq: int, keep: int) -> bool:
        del self.kv[seq][keep:]
        return True

    def close(self) -> None:
        self.closed = True
