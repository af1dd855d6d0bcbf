"""GGUF models through llama.cpp's low-level API, one context decoding many sequences.

The high-level ``llama_cpp.Llama`` owns one sequence at a time; continuous batching
needs the C API underneath it: a ``llama_batch`` whose tokens belong to different
sequence ids, per-sequence KV cache removal, and one sampler chain per sequence.

Kernel modes (``RuntimeParams.kernels``, per model): ggml picks matmul and
attention kernels by the shape of each micro-batch, and their rounding differs. In
``fast`` mode the agent takes upstream's choices: repacked weights, flash attention
where llama.cpp enables it, one decode call per step. In ``deterministic`` mode a
greedy answer must not depend on the batch: weights are not repacked, flash
attention is on, and each step is decoded as ``agent.runtime.batch_plan`` plans it,
so no row ever takes a kernel of its own. ``GGML_CPU_TILED_MM=0`` in both modes: ggml
reads it once per process, and the tiled K-quant kernel did not pay on the machines
measured (docs/serving.md, "Kernel modes").

Threading: everything that touches the context (``decode``, ``sample``, ``forget``,
``set_sampler``) must be called from one thread, the scheduler's. Tokenising and
detokenising only read the vocabulary and may be called from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import psutil

from agent.errors import ContextOverflow, InvalidRequest, ModelFailed, ModelLoadError
from agent.runtime.base import RuntimeInfo, SamplingParams, TokenLogprob
from agent.runtime.batch_plan import BatchEntry, Call, padded, split_step
from models.manifest import KernelMode, ModelManifest, RuntimeParams
from models.policy import FailureKind

__all__ = ["BatchEntry", "LlamaModel", "load_gguf"]

_GGUF_MAGIC = b"GGUF"


def _physical_cores() -> int:
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


_log = logging.getLogger(__name__)
_LLAMA_LOG = logging.getLogger("llama.cpp")
_GGML_LOG_ERROR = 4  # enum ggml_log_level: NONE, DEBUG, INFO, WARN, ERROR, CONT
# llama.cpp reports a grammar's syntax error only through its log, on the calling thread
_errors_here = threading.local()
_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])  # llama_token_data
_CHECKED_GRAMMARS = 64  # parsed grammars remembered, so a popular schema parses once


@llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
def _forward_log(level: int, text: bytes, _user_data: Any) -> None:
    """Route llama.cpp's chatter (a line per tensor at load) to logging, at debug level.

    Only errors keep their level; everything else is debug, so operators see it
    with ``--log-level debug`` and it never clutters a terminal otherwise.
    """
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        _LLAMA_LOG.log(logging.ERROR if level == _GGML_LOG_ERROR else logging.DEBUG, "%s", message)
        if level == _GGML_LOG_ERROR:
            _errors_here.last = message


def _quiet_llama_logs() -> None:
    llama_cpp.llama_log_set(_forward_log, ctypes.c_void_p(0))


class LlamaModel:
    """A loaded GGUF model and one context with ``slots`` independent sequences."""

    def __init__(self, path: Path, manifest: ModelManifest, params: RuntimeParams) -> None:
        self._manifest = manifest
        self._path = path
        self._closed = False
        self._samplers: dict[int, Any] = {}
        self._argmax: set[int] = set()  # greedy sequences without penalties: no sampler chain
        self._grammars: dict[int, Any] = {}  # grammar samplers of constrained sequences
        self._checked: dict[str, None] = {}  # grammars known to parse, oldest first
        self._deterministic = params.kernels is KernelMode.DETERMINISTIC
        self._saved: list[np.ndarray[Any, np.dtype[np.float32]]] = []  # logits of earlier calls
        _quiet_llama_logs()
        os.environ.setdefault("GGML_CPU_TILED_MM", "0")  # see the module docstring
        _check_gguf_header(path)
        llama_cpp.llama_backend_init()
        started = time.perf_counter()

        offload = llama_cpp.llama_supports_gpu_offload()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = params.gpu_layers if offload else 0
        mparams.use_extra_bufts = not self._deterministic  # repacked: other kernels for 1 row
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: the file is not a valid GGUF model "
                "for this llama.cpp build; re-download it or check its sha256"
            )
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        n_ctx_train = llama_cpp.llama_model_n_ctx_train(model)
        self.n_ctx_slot = (
            min(params.context_length, n_ctx_train) if n_ctx_train > 0 else params.context_length
        )
        self.n_slots = params.parallel_slots
        self.n_batch = max(params.batch_tokens, self.n_slots + 1)
        # deterministic: a dummy row needs a neighbouring sequence id, even with one slot
        self._n_seq = max(self.n_slots, 2) if self._deterministic else self.n_slots
        self._capacity = self.n_batch + (self._n_seq if self._deterministic else 0)  # + dummies
        threads = params.threads or _physical_cores()

        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = self.n_ctx_slot * self._n_seq
        cparams.n_batch = self._capacity
        cparams.n_ubatch = self._capacity
        cparams.n_seq_max = self._n_seq
        # at most one sampled token per sequence per step; the default (n_batch outputs)
        # reserves n_batch x n_vocab floats: 512 MB for Gemma's 262k vocabulary
        cparams.n_outputs_max = self._n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        cparams.kv_unified = False  # each sequence attends over its own KV stream only
        cparams.swa_full = True  # lets partial seq_rm keep a reusable prompt prefix
        cparams.no_perf = True
        if self._deterministic:
            # without it, attention is an F16 matmul per sequence: llamafile's sgemm from
            # 2 query rows, ggml's dot product for 1, so decoding and prefilling differ
            cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelLoadError(
                f"llama.cpp could not create a context of {cparams.n_ctx} tokens for {path}: "
                "lower context_length or parallel_slots"
            )
        self._ctx = ctx
        self._memory = llama_cpp.llama_get_memory(ctx)
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self._dummy = bos if bos >= 0 else 0  # any token will do: its row is thrown away
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._ids = np.arange(self.n_vocab, dtype=np.int32)
        self._candidates = np.zeros(self.n_vocab, dtype=_TOKEN_DATA)  # reused every token
        self._one = np.zeros(1, dtype=_TOKEN_DATA)
        self._chat_template = _chat_template(model, params.chat_template)
        self._piece_cache: dict[int, bytes] = {}

        n_layers = llama_cpp.llama_model_n_layer(model)
        gpu_layers = 0
        if offload:
            gpu_layers = n_layers if params.gpu_layers < 0 else min(params.gpu_layers, n_layers)
        if self._deterministic and gpu_layers > 0:
            _log.warning(
                "%s: deterministic kernels are batch-invariant on the CPU only; with %d layers "
                "on the GPU a greedy answer can still change with the batch (docs/serving.md)",
                manifest.name,
                gpu_layers,
            )
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(model, desc, len(desc))
        self._info = RuntimeInfo(
            runtime="llama.cpp",
            runtime_version=str(llama_cpp.__version__),
            device="gpu" if gpu_layers > 0 else "cpu",
            provider="llama.cpp-gpu" if gpu_layers > 0 else "llama.cpp-cpu",
            gpu_layers=gpu_layers,
            load_seconds=time.perf_counter() - started,
            memory_bytes=int(llama_cpp.llama_model_size(model))
            + _kv_estimate(model, cparams.n_ctx),
            details={
                "description": desc.value.decode(errors="replace"),
                "layers": n_layers,
                "context_per_slot": self.n_ctx_slot,
                "slots": self.n_slots,
                "threads": threads,
                "kernels": params.kernels.value,
                "gpu_offload_supported": bool(offload),
                "system": llama_cpp.llama_print_system_info().decode(errors="replace").strip(),
            },
        )

    # -- identity ------------------------------------------------------------------------

    @property
    def manifest(self) -> ModelManifest:
        return self._manifest

    @property
    def info(self) -> RuntimeInfo:
        return self._info

    # -- text <-> tokens (any thread) ----------------------------------------------------

    def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Tokens for ``text`` with BOS; ``special`` parses control tokens (chat templates)."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidRequest(f"the text is not valid Unicode: {exc.reason}") from exc
        capacity = len(data) + 16
        buf = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, True, special)
        if n < 0:
            capacity = -n
            buf = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, capacity, True, special)
        if n < 0:
            raise InvalidRequest("the prompt could not be tokenised")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token; may be part of a multi-byte UTF-8 character."""
        cached = self._piece_cache.get(token)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
        out = buf.raw[: max(n, 0)]
        self._piece_cache[token] = out
        return out

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]]) -> str:
        """The model's own chat template (llama.cpp's built-in rendering of it)."""
        if not self._chat_template:
            raise InvalidRequest(
                f"model {self._manifest.name!r} has no chat template; use /v1/completions"
            )
        keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(keep))()
        for i, (role, content) in enumerate(keep):
            chat[i].role = role
            chat[i].content = content
        size = sum(len(r) + len(c) for r, c in keep) * 2 + 512
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_chat_apply_template(
                self._chat_template, chat, len(keep), True, buf, size
            )
            if n < 0:
                raise InvalidRequest("the chat template does not support these messages")
            if n <= size:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = n + 1
        raise InvalidRequest("the chat template output did not fit")  # pragma: no cover

    # -- the scheduler's thread only -----------------------------------------------------

    def decode(self, entries: Sequence[BatchEntry]) -> list[int]:
        """Decode one step; returns, per entry wanting logits, its index for sampling."""
        for entry in entries:
            if entry.pos + len(entry.tokens) > self.n_ctx_slot:
                raise ContextOverflow("sequence outgrew its context window")
        if sum(len(entry.tokens) for entry in entries) > self.n_batch:
            raise ValueError(f"a step of more than n_batch={self.n_batch} tokens")
        if not self._deterministic:
            return self._decode_call(Call(tuple(entries)))
        self._saved.clear()
        chunks, singles = split_step(entries)
        where: dict[int, int] = {}
        for n, chunk in enumerate(chunks):
            indices = self._decode_call(Call((chunk,)))
            if not indices:
                continue
            index = indices[0]
            if singles or n < len(chunks) - 1:  # a later call overwrites llama.cpp's logits
                self._saved.append(self._logits(index).copy())
                index = self._capacity + len(self._saved) - 1
            where[chunk.seq] = index
        if singles:
            call = padded(
                singles, n_seq=self._n_seq, room_at=self._room_at, dummy_token=self._dummy
            )
            wanted = [entry.seq for entry in call.entries if entry.want_logits]
            where.update(zip(wanted, self._decode_call(call), strict=True))
        return [where[entry.seq] for entry in entries if entry.want_logits]

    def _room_at(self, seq: int) -> int | None:
        pos = int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq)) + 1
        return pos if pos < self.n_ctx_slot else None

    def _decode_call(self, call: Call) -> list[int]:
        """One llama_decode; returns the batch index of each entry wanting logits, in order."""
        batch = self._batch
        n = 0
        out: list[int] = []
        for entry in call.entries:
            for i, token in enumerate(entry.tokens):
                batch.token[n] = token
                batch.pos[n] = entry.pos + i
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = entry.seq
                batch.logits[n] = False
                n += 1
            if entry.want_logits:
                batch.logits[n - 1] = True
                out.append(n - 1)
        batch.n_tokens = n
        rc = llama_cpp.llama_decode(self._ctx, batch)
        for pad in call.pads:
            llama_cpp.llama_memory_seq_rm(self._memory, pad.seq, pad.pos, -1)
        if rc != 0:
            raise ModelFailed(
                f"llama_decode failed with code {rc}", failure=self._decode_failure(rc)
            )
        return out

    def _decode_failure(self, rc: int) -> FailureKind:
        """llama_decode's codes: 1 no room in the KV cache, 2 aborted, < 0 a compute error."""
        if rc == 1:
            return FailureKind.OUT_OF_MEMORY
        if rc < 0 and self.info.device != "cpu":
            return FailureKind.GPU_FAULT
        return FailureKind.ERROR

    def check_grammar(self, grammar: str, *, param: str) -> None:
        """Refuse a grammar llama.cpp cannot parse, before it reaches the scheduler's thread."""
        if grammar in self._checked:
            return
        _errors_here.last = ""
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            why = _errors_here.last or "see llama.cpp's GBNF syntax"
            raise InvalidRequest(f"{param}: the grammar does not parse: {why}", param=param)
        llama_cpp.llama_sampler_free(sampler)
        self._checked[grammar] = None
        if len(self._checked) > _CHECKED_GRAMMARS:
            del self._checked[next(iter(self._checked))]

    def set_sampler(self, seq: int, params: SamplingParams) -> None:
        """Give ``seq`` a fresh sampler chain (and grammar) for a new request."""
        old = self._samplers.pop(seq, None)
        if old is not None:
            llama_cpp.llama_sampler_free(old)
        old = self._grammars.pop(seq, None)
        if old is not None:
            llama_cpp.llama_sampler_free(old)
        if params.grammar is not None:
            grammar = llama_cpp.llama_sampler_init_grammar(
                self._vocab, params.grammar.encode(), b"root"
            )
            if not grammar:  # checked before submit; a failure here is a bug, not input
                raise ModelFailed("llama.cpp refused a grammar it had parsed before")
            self._grammars[seq] = grammar
        penalties = (
            params.frequency_penalty or params.presence_penalty or params.repeat_penalty != 1.0
        )
        if params.greedy and not penalties and not params.logit_bias:
            # llama.cpp's greedy sampler copies all logits (262k for Gemma) into a
            # candidate array first; an argmax over them in place is ~10x cheaper.
            self._argmax.add(seq)
            return
        self._argmax.discard(seq)
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = llama_cpp.llama_sampler_chain_add
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(
                *(llama_cpp.llama_logit_bias(token, bias) for token, bias in params.logit_bias)
            )
            add(
                chain,
                llama_cpp.llama_sampler_init_logit_bias(self.n_vocab, len(biases), biases),
            )
        if penalties:
            add(
                chain,
                llama_cpp.llama_sampler_init_penalties(
                    self.n_vocab,
                    64,  # tokens looked back over (Ollama's repeat_last_n default)
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        if params.greedy:
            add(chain, llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(chain, llama_cpp.llama_sampler_init_top_k(params.top_k))
            add(chain, llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0:
                add(chain, llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            add(chain, llama_cpp.llama_sampler_init_temp(params.temperature))
            add(chain, llama_cpp.llama_sampler_init_dist(params.seed & 0xFFFFFFFF))
        self._samplers[seq] = chain

    def sample(self, seq: int, index: int) -> int:
        grammar = self._grammars.get(seq)
        if grammar is None:
            if seq in self._argmax:
                return int(self._logits(index).argmax())
            chain = self._samplers[seq]
            if index < self._capacity:
                return int(llama_cpp.llama_sampler_sample(chain, self._ctx, index))
            token = self._select(self._logits(index), chain, None)
            llama_cpp.llama_sampler_accept(chain, token)
            return token
        return self._sample_constrained(seq, index, grammar)

    def _sample_constrained(self, seq: int, index: int, grammar: Any) -> int:
        """Sample freely, and only if the grammar refuses that token, sample again under it.

        Applying a grammar to every token of the vocabulary (262k for Gemma) is the
        expensive part; the model usually picks an allowed token, so checking the one
        it picked first is what llama.cpp's own server does too.
        """
        logits = self._logits(index)
        chain = None if seq in self._argmax else self._samplers[seq]
        token = int(logits.argmax()) if chain is None else self._select(logits, chain, None)
        if not self._allows(grammar, token, float(logits[token])):
            token = self._select(logits, chain, grammar)
            if token < 0:  # nothing can follow: end the answer rather than break the grammar
                return int(llama_cpp.llama_vocab_eos(self._vocab))
        if chain is not None:
            llama_cpp.llama_sampler_accept(chain, token)
        llama_cpp.llama_sampler_accept(grammar, token)
        return token

    def _logits(self, index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        if index >= self._capacity:  # saved from an earlier call of this step
            return self._saved[index - self._capacity]
        logits = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(logits, shape=(self.n_vocab,))

    def _select(self, logits: np.ndarray[Any, Any], chain: Any, grammar: Any) -> int:
        """Run the grammar (if any) and the chain (if any, else argmax) over every token."""
        cand = self._candidates
        cand["id"] = self._ids
        cand["logit"] = logits
        cand["p"] = 0.0
        array = _token_array(cand)
        if grammar is not None:
            llama_cpp.llama_sampler_apply(grammar, ctypes.byref(array))
            if not np.isfinite(cand["logit"][: array.size]).any():
                return -1
        if chain is None:
            return int(cand["id"][int(cand["logit"][: array.size].argmax())])
        llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
        return int(cand["id"][array.selected])

    def _allows(self, grammar: Any, token: int, logit: float) -> bool:
        one = self._one
        one["id"], one["logit"], one["p"] = token, logit, 0.0
        llama_cpp.llama_sampler_apply(grammar, ctypes.byref(_token_array(one)))
        return bool(np.isfinite(one["logit"][0]))

    def logprobs(self, index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log probability under the raw logits at ``index``, and the ``top`` best."""
        logits = self._logits(index).astype(np.float64)
        peak = float(logits.max())
        total = peak + float(np.log(np.exp(logits - peak).sum()))
        best: tuple[tuple[bytes, float], ...] = ()
        if top > 0:
            ids = np.argpartition(-logits, top - 1)[:top]
            ids = ids[np.argsort(-logits[ids], kind="stable")]
            best = tuple((self.piece(int(i)), float(logits[i]) - total) for i in ids)
        return TokenLogprob(
            token=token, piece=self.piece(token), logprob=float(logits[token]) - total, top=best
        )

    def share(self, source: int, target: int) -> None:
        """Copy ``source``'s whole KV cache to ``target`` (emptied first): n > 1 choices."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, target, 0, -1)

    def forget(self, seq: int, keep: int) -> bool:
        """Drop ``seq``'s KV cache from position ``keep`` on; False if only a full drop works."""
        return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq, keep, -1))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for chain in (*self._samplers.values(), *self._grammars.values()):
            llama_cpp.llama_sampler_free(chain)
        self._samplers.clear()
        self._grammars.clear()
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self._ctx)
        llama_cpp.llama_model_free(self._model)


def _token_array(candidates: np.ndarray[Any, Any]) -> Any:
    """A ``llama_token_data_array`` over a numpy buffer of :data:`_TOKEN_DATA` rows."""
    return llama_cpp.llama_token_data_array(
        data=candidates.ctypes.data_as(llama_cpp.llama_token_data_p),
        size=len(candidates),
        selected=-1,
        sorted=False,
    )


def _kv_estimate(model: Any, n_ctx: int) -> int:
    """Rough KV cache size (f16 K and V per layer), for the memory budget."""
    n_layer = llama_cpp.llama_model_n_layer(model)
    n_embd = llama_cpp.llama_model_n_embd(model)
    n_head = max(llama_cpp.llama_model_n_head(model), 1)
    n_head_kv = max(llama_cpp.llama_model_n_head_kv(model), 1)
    kv_dim = n_embd * n_head_kv // n_head
    return int(2 * 2 * n_layer * kv_dim * n_ctx)


def _chat_template(model: Any, configured: str | None) -> bytes | None:
    """The GGUF's own template, else the configured built-in, else one named after the arch.

    Some GGUF conversions drop ``tokenizer.chat_template``; llama.cpp's built-in
    renderers (``gemma``, ``llama3``, ``chatml``...) cover the common families.
    """
    own = llama_cpp.llama_model_chat_template(model, None)
    if own:
        return bytes(own)
    if configured:
        return configured.encode()
    buf = ctypes.create_string_buffer(64)
    n = llama_cpp.llama_model_meta_val_str(model, b"general.architecture", buf, len(buf))
    arch = buf.value.decode(errors="replace") if n > 0 else ""
    for family in ("gemma", "llama3", "phi3", "qwen2", "mistral"):
        if arch.startswith(family):
            return b"chatml" if family == "qwen2" else family.encode()
    return None


def _check_gguf_header(path: Path) -> None:
    """Fail with a clear reason before llama.cpp prints a cryptic one."""
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic {magic!r})")


def load_gguf(path: Path, manifest: ModelManifest) -> LlamaModel:
    """Load ``path`` with the manifest's runtime parameters; blocking (run in a thread)."""
    return LlamaModel(path, manifest, manifest.runtime)
