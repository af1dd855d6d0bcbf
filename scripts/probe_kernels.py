"""Kernel-mode probe for edgefleet's llama.cpp runtime: batch/chunk invariance and speed.

Mirrors agent/runtime/llama_cpp.py (low-level llama-cpp-python API, one context,
n_seq_max=8 sequences, kv_unified=False, swa_full=True, n_outputs_max=8) and measures,
for one kernel configuration:

  a   batch invariance: prompt P alone (seq 0) vs P decoding beside 7 other prompts
      (prompts prefilled one per llama_decode, then 32 steps of 8 tokens); P is
      teacher-forced with the reference tokens so every step's logits are comparable.
  a2  same, but all 8 prompts prefilled in one llama_decode (llama.cpp splits it with
      split_equal, as the agent's mixed batches are).
  b   chunking / prefix reuse: P prefilled in one decode vs [5, rest], [L-1, 1]
      (what the scheduler's `reusable()` leaves after a full prefix hit), [1, rest];
      plus "gen-reuse" (prompt = P + 16 generated tokens + Q, fresh vs reusing the KV
      that decoding left) and "sched-mix" (P's whole prompt in one batch with 7 decode
      tokens of other sequences). Last-position logits plus 8 teacher-forced decode
      steps are compared.
  speed  prefill tok/s of a 200-token prompt, decode tok/s of 1 sequence and of 8
      sequences (48 steps after prefill), including logits read-out and argmax.

  nonadj  long prompt on seq 0 decoding beside seq 2 only (llama.cpp splits non-consecutive
      sequence ids into separate ubatches), vs alone.

Options: --extra-bufts (weight repacking), --tiled {0,1,unset} (GGML_CPU_TILED_MM, read once
per process), --fa {0,1} (flash attention), --max-chunk N (split every prefill into chunks of
at most N tokens; 63 keeps the CPU flash-attention kernel off its tiled path, which starts at
GGML_FA_TILE_Q=64 query rows per sequence), --pad (entries are sorted by sequence id; every run
of consecutive ids that is one sequence decoding one token gets a dummy token on an adjacent
free sequence, removed with llama_memory_seq_rm after the step, so no ubatch is one token of
one stream: that keeps flash attention off its split-KV path), --pad-logits (the dummy also
requests logits and a lone prefill chunk requests 2 outputs, so the last layer and the output
matmul see >= 2 rows too: the brief's "every matmul >= 2 rows" padding).

Usage: python probe.py --label NAME [--extra-bufts] [--tiled 0|1|unset] [--fa 0|1]
                       [--pad [--pad-logits]] [--max-chunk N]
                       [--tests a,a2,b,long,nonadj,speed] [--json out.json]
       python probe.py --two-models ...   (per-process vs per-model switch check)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", default="cfg")
    ap.add_argument("--model", required=True, help="a GGUF file, e.g. the bundled Gemma 3 270M")
    ap.add_argument("--extra-bufts", action="store_true")
    ap.add_argument("--tiled", default="0", choices=["0", "1", "unset"])
    ap.add_argument("--fa", type=int, default=0)
    ap.add_argument("--pad", action="store_true")
    ap.add_argument(
        "--pad-logits",
        action="store_true",
        help="the dummy row requests logits and prefill chunks request 2 outputs, so the "
        "last layer and the output matmul also see >= 2 rows",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tests", default="a,a2,b,speed")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--speed-steps", type=int, default=48)
    ap.add_argument("--json", default=None)
    ap.add_argument("--two-models", action="store_true")
    ap.add_argument(
        "--max-chunk",
        type=int,
        default=0,
        help="split every prefill into chunks of at most N tokens",
    )
    return ap.parse_args()


ARGS = parse()
# read by ggml once per process (std::call_once), so set before anything touches ggml
if ARGS.tiled == "unset":
    os.environ.pop("GGML_CPU_TILED_MM", None)
else:
    os.environ["GGML_CPU_TILED_MM"] = ARGS.tiled

import ctypes  # noqa: E402

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402


@llama_cpp.llama_log_callback
def _quiet(level, text, user) -> None:  # noqa: ANN001
    pass


llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()

N_SEQ = 8
N_BATCH = 512

PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg combined movable metal type with an oil-based ink. Explain in a few "
    "sentences why this mattered for Europe:",
    "Write a short poem about a lighthouse keeper who",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Q: What is the capital of Australia, and why was it chosen?\nA:",
    "List three ways to keep bread fresh for longer:\n1.",
    "Translate to French: The weather is lovely today and we are going to the beach.",
    "Once upon a time, in a village at the edge of a vast forest, there lived a",
    "Summarise the plot of Hamlet in two sentences:",
]
FOLLOW_UP = "\nNow say the same thing in one short sentence:"
LONG_TEXT = (
    "Edge devices run quantized language models close to their users. They must keep "
    "serving when the network fails, update safely when a new model version arrives, "
    "and report what they actually run to a fleet controller. "
) * 12


class Runner:
    def __init__(self, path: str, *, extra_bufts: bool, fa: int, pad: bool, threads: int) -> None:
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        mp.use_extra_bufts = extra_bufts
        self.model = llama_cpp.llama_model_load_from_file(path.encode(), mp)
        assert self.model, "model load failed"
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = N_SEQ * 512
        cp.n_batch = N_BATCH
        cp.n_ubatch = N_BATCH
        cp.n_seq_max = N_SEQ
        cp.n_outputs_max = N_SEQ
        cp.n_threads = threads
        cp.n_threads_batch = threads
        cp.kv_unified = False
        cp.swa_full = True
        cp.no_perf = True
        cp.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if fa
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        assert self.ctx, "context creation failed"
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(N_BATCH, 0, 1)
        self.pad = pad
        self.dummy = llama_cpp.llama_vocab_bos(self.vocab)
        self.pad_rows = 0  # dummy rows decoded (for the report)
        self.max_chunk = 0
        self.pad_logits = False

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)

    def tokenize(self, text: str, bos: bool = True) -> list[int]:
        raw = text.encode()
        buf = (llama_cpp.llama_token * (len(raw) + 16))()
        n = llama_cpp.llama_tokenize(self.vocab, raw, len(raw), buf, len(buf), bos, False)
        assert n >= 0
        return list(buf[:n])

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.mem, True)

    def seq_len(self, seq: int) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.mem, seq) + 1

    def decode(self, entries: list[tuple[int, list[int], int, bool]]) -> dict[int, int]:
        """entries: (seq, tokens, pos, want_logits of last token). Returns seq -> batch index."""
        rows: list[tuple[int, int, int, bool]] = []  # seq, token, pos, logits
        out: dict[int, int] = {}
        pads: list[tuple[int, int]] = []  # (pad seq, position) to remove after the decode
        if self.pad:
            # llama.cpp splits a multi-stream batch with split_equal(sequential): a ubatch holds
            # only consecutive sequence ids, in batch order. Sort by id, find the runs, and give
            # every run that is one sequence decoding one token a dummy row on an adjacent
            # sequence (not in this batch), so no ubatch is a single token of a single stream.
            entries = sorted(entries, key=lambda e: e[0])
            busy = {e[0] for e in entries}
            runs: list[list[tuple[int, list[int], int, bool]]] = []
            for e in entries:
                if runs and e[0] == runs[-1][-1][0] + 1:
                    runs[-1].append(e)
                else:
                    runs.append([e])
            for run in runs:
                if len(run) == 1 and len(run[0][1]) == 1:
                    s0 = run[0][0]
                    cand = [c for c in (s0 + 1, s0 - 1) if 0 <= c < N_SEQ and c not in busy]
                    assert cand, "no adjacent free sequence to pad with"
                    busy.add(cand[0])
                    pads.append((cand[0], self.seq_len(cand[0])))
            dummies = [(p, [self.dummy], pos, self.pad_logits) for p, pos in pads]
            entries = sorted(entries + dummies, key=lambda e: e[0])
            self.pad_rows += len(pads)
        pad_ids = {p for p, _ in pads}
        single = len(entries) - len(pads) == 1
        for seq, toks, pos, want in entries:
            # with --pad-logits a lone prefill chunk asks for 2 outputs (2 rows in the last layer)
            n_out = (
                2 if (self.pad_logits and single and seq not in pad_ids and len(toks) >= 2) else 1
            )
            for i, t in enumerate(toks):
                rows.append((seq, t, pos + i, want and i >= len(toks) - n_out))
            if want and seq not in pad_ids:
                out[seq] = len(rows) - 1
        b = self.batch
        assert len(rows) <= N_BATCH
        for n, (seq, t, pos, lg) in enumerate(rows):
            b.token[n] = t
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = lg
        b.n_tokens = len(rows)
        rc = llama_cpp.llama_decode(self.ctx, b)
        assert rc == 0, f"llama_decode rc={rc}"
        for p, pos in pads:
            llama_cpp.llama_memory_seq_rm(self.mem, p, pos, -1)
        return out

    def logits(self, index: int) -> np.ndarray:
        p = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(p, shape=(self.n_vocab,)).copy()

    def argmax(self, index: int) -> int:
        p = llama_cpp.llama_get_logits_ith(self.ctx, index)
        return int(np.argmax(np.ctypeslib.as_array(p, shape=(self.n_vocab,))))

    # ---------------------------------------------------------------- sequences

    def prefill(self, seq: int, toks: list[int], chunks: list[int] | None = None) -> np.ndarray:
        """Prefill ``toks`` on ``seq`` (already holding seq_len tokens) in the given chunks."""
        pos = self.seq_len(seq)
        chunks = chunks or [len(toks)]
        assert sum(chunks) == len(toks)
        if self.max_chunk:
            capped = []
            for c in chunks:
                while c > self.max_chunk:
                    capped.append(self.max_chunk)
                    c -= self.max_chunk
                capped.append(c)
            chunks = capped
        i = 0
        out = None
        for c in chunks:
            last = i + c == len(toks)
            idx = self.decode([(seq, toks[i : i + c], pos + i, last)])
            i += c
            if last:
                out = self.logits(idx[seq])
        return out

    def step_alone(self, seq: int, token: int) -> np.ndarray:
        idx = self.decode([(seq, [token], self.seq_len(seq), True)])
        return self.logits(idx[seq])


def compare(
    ref: list[np.ndarray], got: list[np.ndarray], ref_tokens: list[int] | None = None
) -> dict:
    diffs = [
        float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64))))
        for r, g in zip(ref, got, strict=False)
    ]
    bit = all(
        np.array_equal(r.view(np.uint32), g.view(np.uint32)) for r, g in zip(ref, got, strict=False)
    )
    same_argmax = [int(np.argmax(r)) == int(np.argmax(g)) for r, g in zip(ref, got, strict=False)]
    first_div = next((i for i, s in enumerate(same_argmax) if not s), None)
    first_diff = next((i for i, d in enumerate(diffs) if d != 0.0), None)
    return {
        "bit_identical": bit,
        "max_abs_diff": max(diffs) if diffs else 0.0,
        "first_nonzero_step": first_diff,
        "greedy_same": first_div is None,
        "first_greedy_divergence": first_div,
        "steps": len(diffs),
    }


# --------------------------------------------------------------------- tests


def reference_alone(
    r: Runner, p: list[int], steps: int, seq: int = 0
) -> tuple[list[np.ndarray], list[int]]:
    """P alone on ``seq``: prefill, then ``steps`` greedy steps; the logits per step, the tokens."""
    r.clear()
    lg = [r.prefill(seq, p)]
    toks = [int(np.argmax(lg[0]))]
    for _ in range(steps):
        lg.append(r.step_alone(seq, toks[-1]))
        toks.append(int(np.argmax(lg[-1])))
    return lg, toks


def check_batch(r: Runner, prompts: list[list[int]], steps: int, joint_prefill: bool) -> dict:
    ref, ref_toks = reference_alone(r, prompts[0], steps)
    r.clear()
    nxt: dict[int, int] = {}
    got: list[np.ndarray] = []
    if joint_prefill:
        idx = r.decode([(s, prompts[s], 0, True) for s in range(N_SEQ)])
        first = {s: r.logits(idx[s]) for s in range(N_SEQ)}
    else:
        first = {s: r.prefill(s, prompts[s]) for s in range(N_SEQ)}
    got.append(first[0])
    for s in range(1, N_SEQ):
        nxt[s] = int(np.argmax(first[s]))
    for step in range(steps):
        nxt[0] = ref_toks[step]  # teacher-forced
        idx = r.decode([(s, [nxt[s]], r.seq_len(s), True) for s in range(N_SEQ)])
        got.append(r.logits(idx[0]))
        for s in range(1, N_SEQ):
            nxt[s] = r.argmax(idx[s])
    res = compare(ref, got)
    res["ref_tokens_head"] = ref_toks[:12]
    return res


def check_chunking(
    r: Runner,
    p: list[int],
    others: list[list[int]],
    follow: list[int],
    after: int = 8,
    splits: dict[str, list[int]] | None = None,
) -> dict:
    L = len(p)
    ref, ref_toks = reference_alone(r, p, after)
    results: dict[str, dict] = {}

    def tail(seq: int, first: np.ndarray) -> list[np.ndarray]:
        lg = [first]
        for k in range(after):
            lg.append(r.step_alone(seq, ref_toks[k]))
        return lg

    splits = splits or {"5+rest": [5, L - 5], "L-1+1": [L - 1, 1], "1+rest": [1, L - 1]}
    for name, chunks in splits.items():
        r.clear()
        first = r.prefill(0, p, chunks)
        res = compare(ref, tail(0, first))
        res["last_logits_bit_identical"] = bool(
            np.array_equal(ref[0].view(np.uint32), first.view(np.uint32))
        )
        res["last_logits_max_diff"] = float(np.max(np.abs(ref[0] - first)))
        results[name] = res

    # gen-reuse: prompt2 = P + G (16 generated tokens, decoded one at a time) + follow-up
    _gen_ref, gen_toks = reference_alone(r, p, 16)  # KV now holds P + gen_toks[:16]
    prompt2 = p + gen_toks[:16] + follow
    assert r.seq_len(0) == len(p) + 16
    reused = r.prefill(0, follow)
    r.clear()
    fresh = r.prefill(0, prompt2)
    results["gen-reuse"] = {
        "last_logits_bit_identical": bool(
            np.array_equal(fresh.view(np.uint32), reused.view(np.uint32))
        ),
        "last_logits_max_diff": float(np.max(np.abs(fresh - reused))),
        "greedy_same": int(np.argmax(fresh)) == int(np.argmax(reused)),
    }

    # sched-mix: seqs 0..6 decoding, P's whole prompt arrives on seq 7 in the same batch
    r.clear()
    nxt = {}
    for s in range(7):
        nxt[s] = int(np.argmax(r.prefill(s, others[s])))
    first = p[: r.max_chunk] if r.max_chunk else p  # the scheduler caps chunks the same way
    entries = [(s, [nxt[s]], r.seq_len(s), True) for s in range(7)] + [
        (7, first, 0, len(first) == len(p))
    ]
    idx = r.decode(entries)
    mixed = r.logits(idx[7]) if len(first) == len(p) else r.prefill(7, p[len(first) :])
    # reference on seq 7 alone (a fresh context state)
    r.clear()
    alone7 = r.prefill(7, p)
    results["sched-mix"] = {
        "last_logits_bit_identical": bool(
            np.array_equal(alone7.view(np.uint32), mixed.view(np.uint32))
        ),
        "last_logits_max_diff": float(np.max(np.abs(alone7 - mixed))),
        "greedy_same": int(np.argmax(alone7)) == int(np.argmax(mixed)),
        "alone_seq7_equals_alone_seq0": bool(
            np.array_equal(alone7.view(np.uint32), ref[0].view(np.uint32))
        ),
    }

    # sched-mix2: P's first 5 tokens alone, then the rest in one batch with 7 decode tokens
    # (split_equal puts P's 6th token in a 1-token-per-sequence ubatch)
    r.clear()
    nxt = {}
    for s in range(7):
        nxt[s] = int(np.argmax(r.prefill(s, others[s])))
    r.decode([(7, p[:5], 0, False)])
    rest = p[5:]
    first = rest[: r.max_chunk] if r.max_chunk else rest
    entries = [(s, [nxt[s]], r.seq_len(s), True) for s in range(7)]
    entries.append((7, first, 5, len(first) == len(rest)))
    idx = r.decode(entries)
    mixed = r.logits(idx[7]) if len(first) == len(rest) else r.prefill(7, rest[len(first) :])
    r.clear()
    r.decode([(7, p[:5], 0, False)])
    alone = r.prefill(7, rest)
    results["sched-mix2"] = {
        "last_logits_bit_identical": bool(
            np.array_equal(alone.view(np.uint32), mixed.view(np.uint32))
        ),
        "last_logits_max_diff": float(np.max(np.abs(alone - mixed))),
        "greedy_same": int(np.argmax(alone)) == int(np.argmax(mixed)),
    }
    return results


def check_nonadjacent(r: Runner, lp: list[int], other: list[int], steps: int) -> dict:
    """Long prompt on seq 0 decoding beside one short prompt on seq 2 (seq 1 idle): llama.cpp
    splits each step into two single-stream ubatches. Compared with seq 0 decoding alone."""
    ref, ref_toks = reference_alone(r, lp, steps)
    r.clear()
    got = [r.prefill(0, lp)]
    nxt = int(np.argmax(r.prefill(2, other)))
    for step in range(steps):
        idx = r.decode([(0, [ref_toks[step]], r.seq_len(0), True), (2, [nxt], r.seq_len(2), True)])
        got.append(r.logits(idx[0]))
        nxt = r.argmax(idx[2])
    return compare(ref, got)


def check_speed(
    r: Runner, prompts: list[list[int]], long_p: list[int], steps: int, reps: int = 3
) -> dict:
    """Each figure ``reps`` times after one warm-up; the report keeps all and the median."""
    res: dict[str, object] = {}
    # prefill of a 200-token prompt, alone
    times = []
    for _ in range(reps + 1):
        r.clear()
        t0 = time.perf_counter()
        r.prefill(0, long_p)
        times.append(time.perf_counter() - t0)
    res["prefill_tok_s_all"] = [round(len(long_p) / t, 1) for t in times[1:]]
    # 1 sequence decoding alone
    d1 = []
    for _ in range(reps):
        r.clear()
        tok = int(np.argmax(r.prefill(0, prompts[0])))
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = r.decode([(0, [tok], r.seq_len(0), True)])
            tok = r.argmax(idx[0])
        d1.append(round(steps / (time.perf_counter() - t0), 2))
    res["decode1_tok_s_all"] = d1
    # 8 sequences decoding together
    d8 = []
    for _ in range(reps):
        r.clear()
        nxt = {s: int(np.argmax(r.prefill(s, prompts[s]))) for s in range(N_SEQ)}
        t0 = time.perf_counter()
        for _ in range(steps):
            idx = r.decode([(s, [nxt[s]], r.seq_len(s), True) for s in range(N_SEQ)])
            for s in range(N_SEQ):
                nxt[s] = r.argmax(idx[s])
        d8.append(round(steps * N_SEQ / (time.perf_counter() - t0), 2))
    res["decode8_tok_s_all"] = d8
    for k in ("prefill", "decode1", "decode8"):
        res[f"{k}_tok_s"] = float(np.median(res[f"{k}_tok_s_all"]))
    return res


def loadavg() -> str:
    with Path("/proc/loadavg").open() as f:
        return " ".join(f.read().split()[:3])


def system_info() -> str:
    return llama_cpp.llama_print_system_info().decode()


def main() -> None:
    if ARGS.two_models:
        return two_models()
    r = Runner(
        ARGS.model, extra_bufts=ARGS.extra_bufts, fa=ARGS.fa, pad=ARGS.pad, threads=ARGS.threads
    )
    r.max_chunk = ARGS.max_chunk
    r.pad_logits = ARGS.pad_logits
    desc = ctypes.create_string_buffer(256)
    llama_cpp.llama_model_desc(r.model, desc, 256)
    prompts = [r.tokenize(t) for t in PROMPTS]
    follow = r.tokenize(FOLLOW_UP, bos=False)
    long_p = r.tokenize(LONG_TEXT)[:200]
    out: dict[str, object] = {
        "label": ARGS.label,
        "model_desc": desc.value.decode(),
        "extra_bufts": ARGS.extra_bufts,
        "GGML_CPU_TILED_MM": os.environ.get("GGML_CPU_TILED_MM", "unset"),
        "flash_attn": ARGS.fa,
        "pad": ARGS.pad,
        "max_chunk": ARGS.max_chunk,
        "pad_logits": ARGS.pad_logits,
        "threads": ARGS.threads,
        "llamafile_in_build": "LLAMAFILE = 1" in system_info(),
        "prompt_lens": [len(p) for p in prompts],
        "loadavg_start": loadavg(),
    }
    tests = ARGS.tests.split(",")
    if "a" in tests:
        out["a_batch_invariance"] = check_batch(r, prompts, ARGS.steps, joint_prefill=False)
    if "a2" in tests:
        out["a2_joint_prefill"] = check_batch(r, prompts, ARGS.steps, joint_prefill=True)
    if "b" in tests:
        out["b_chunking"] = check_chunking(r, prompts[0], prompts[1:], follow)
    if "long" in tests:
        lp = r.tokenize(LONG_TEXT)[:300]
        L = len(lp)
        out["long_prompt_len"] = L
        out["long_a_batch_invariance"] = check_batch(
            r, [lp, *prompts[1:]], ARGS.steps, joint_prefill=False
        )
        out["long_b_chunking"] = check_chunking(
            r,
            lp,
            prompts[1:],
            follow,
            splits={
                "5+rest": [5, L - 5],
                "L-1+1": [L - 1, 1],
                "64+rest": [64, L - 64],
                "100+100+rest": [100, 100, L - 200],
                "63s": [63] * (L // 63) + ([L % 63] if L % 63 else []),
            },
        )
    if "nonadj" in tests:
        out["nonadjacent"] = check_nonadjacent(
            r, r.tokenize(LONG_TEXT)[:300], prompts[1], ARGS.steps
        )
    if "speed" in tests:
        out["speed"] = check_speed(r, prompts, long_p, ARGS.speed_steps)
    out["pad_rows"] = r.pad_rows
    out["loadavg_end"] = loadavg()
    r.close()
    text = json.dumps(out, indent=1)
    print(text)
    if ARGS.json:
        with Path(ARGS.json).open("w") as f:
            f.write(text)
    return None


def two_models() -> None:
    """Two models in one process: A (no repack) then B (repack); GGML_CPU_TILED_MM flipped between.

    Each model's batch invariance (test a, 16 steps) is measured. If B inherits A's
    GGML_CPU_TILED_MM although the variable changed before B loaded, the switch is
    per process.
    """
    out: dict[str, object] = {"env_at_A": os.environ.get("GGML_CPU_TILED_MM", "unset")}
    a = Runner(ARGS.model, extra_bufts=False, fa=0, pad=False, threads=ARGS.threads)
    prompts = [a.tokenize(t) for t in PROMPTS]
    out["A_no_repack"] = check_batch(a, prompts, 16, joint_prefill=False)
    flip = "1" if out["env_at_A"] in ("0",) else "0"
    os.environ["GGML_CPU_TILED_MM"] = flip
    out["env_at_B"] = flip
    b = Runner(ARGS.model, extra_bufts=False, fa=0, pad=False, threads=ARGS.threads)
    out["B_no_repack_after_env_flip"] = check_batch(b, prompts, 16, joint_prefill=False)
    c = Runner(ARGS.model, extra_bufts=True, fa=0, pad=False, threads=ARGS.threads)
    out["C_repack"] = check_batch(c, prompts, 16, joint_prefill=False)
    out["A_again_after_C_loaded"] = check_batch(a, prompts, 16, joint_prefill=False)
    for m in (a, b, c):
        m.close()
    text = json.dumps(out, indent=1)
    print(text)
    if ARGS.json:
        with Path(ARGS.json).open("w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
