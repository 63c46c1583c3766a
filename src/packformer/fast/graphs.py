"""CUDA graphs per token-count bucket: small and medium batches replay a captured forward instead of
launching ~100 kernels from Python one by one.

A graph has static shapes, so a batch of T tokens in B sequences runs in the graph of the smallest
bucket N >= T (buckets 64 apart up to 512, then about 8 per doubling: under 11% padding) with room for
S >= B sequences (a power of two). The N - T padding tokens form a dummy segment, cut into pieces of
at most 128 tokens, that attends only to itself: real tokens never see it, and it costs little attention.
Unused sequence slots are empty segments (cu_seqlens repeats N). Everything else in the encoder is
row-wise, so the real rows are exactly what an eager run computes.

Graphs are captured lazily, on a key's second use (a one-off shape is not worth a capture), into one
shared memory pool; the output lives in one static buffer sized for the largest bucket, and each graph's
inputs (ids, positions, token types, cu_seqlens: a few KB) in one static buffer of its own, refilled from
a pinned host copy by a single host-to-device copy per replay, so each extra graph costs almost no
memory. A batch larger than `max_tokens`, or past `max_graphs` keys, runs eagerly. Replays happen on the
caller's current stream, one at a time (a lock), and the output is cloned out of the static buffer so a
later replay cannot overwrite what a caller holds.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ..batch import PackedBatch
from ..ops.attention import AttentionMeta

log = logging.getLogger(__name__)

DUMMY_CHUNK = 128      # longest piece of the dummy segment (one flash-attention query block)


def token_buckets(max_tokens: int, step: int = 64, fine_until: int = 512, per_doubling: int = 8) -> list[int]:
    """Bucket sizes: multiples of `step` up to `fine_until`, then `per_doubling` geometric steps per
    doubling (rounded up to `step`), ending at the first bucket >= max_tokens."""
    out = list(range(step, min(fine_until, max_tokens) + step, step))
    while out[-1] < max_tokens:
        out.append(max(out[-1] + step, int(round(out[-1] * 2 ** (1 / per_doubling) / step)) * step))
    return out


def seq_bucket(num_seqs: int) -> int:
    return 1 << max(2, (max(num_seqs, 1) - 1).bit_length())


def padded_cu_seqlens(seqlens: list[int], n_tokens: int, n_slots: int, chunk: int = DUMMY_CHUNK) -> np.ndarray:
    """[n_slots + 1] int32 cu_seqlens: the real sequences, then [T, n_tokens) cut into dummy segments of
    at most `chunk` tokens, then empty segments. Raises ValueError if it does not fit."""
    b = len(seqlens)
    if b > n_slots:
        raise ValueError(f"{b} sequences do not fit a graph of {n_slots} segments")
    cu = np.empty(n_slots + 1, dtype=np.int32)
    cu[0] = 0
    np.cumsum(seqlens, out=cu[1:b + 1])
    t = int(cu[b])
    pad = n_tokens - t
    n_dummy = -(-pad // chunk) if pad > 0 else 0
    if pad < 0 or b + n_dummy > n_slots:
        raise ValueError(f"{b} sequences of {t} tokens do not fit a graph of {n_tokens} tokens "
                         f"and {n_slots} segments")
    cu[b + 1:b + 1 + n_dummy] = np.minimum(np.arange(t + chunk, t + chunk * (n_dummy + 1), chunk), n_tokens)
    cu[b + 1 + n_dummy:] = n_tokens
    return cu


@dataclass
class _Captured:
    """One captured graph and its static inputs.

    `inputs` (int64, on the device) holds everything a replay changes, so that one host-to-device copy
    refills it: ids [n] | positions [n] | token types [n] (if used) | cu_seqlens as int32 [slots + 1].
    """
    graph: torch.cuda.CUDAGraph
    n: int
    slots: int
    rows: int                  # 2 (ids, positions) or 3 (and token types)
    inputs: torch.Tensor
    # two pinned host copies of `inputs`, used in turn: one may still be waiting for its copy to the
    # device (which is asynchronous) while the next batch fills the other; each event marks its copy done
    host: tuple = ()
    copied: tuple = ()
    turn: int = 0

    @staticmethod
    def size(n: int, rows: int, slots: int) -> int:
        return rows * n + -(-(slots + 1) // 2)

    def split(self, buf, int32):
        """Views (ids, positions, token types or None, cu_seqlens) into `buf`, the device `inputs` or a
        host copy (torch or numpy; `int32` is that library's dtype)."""
        n, r = self.n, self.rows
        cu = buf[r * n:].view(int32)[:self.slots + 1]
        return buf[:n], buf[n:2 * n], buf[2 * n:3 * n] if r == 3 else None, cu


class GraphRunner:
    """Wraps an eager runner `forward(batch, meta, out=None) -> [T, H]` with graph replay."""

    def __init__(self, forward, max_tokens: int, max_seqlen: int, hidden: int, capture_after: int = 2,
                 max_graphs: int = 64):
        self.forward = forward
        self.device, self.dtype = forward.device, forward.dtype
        self.buckets = token_buckets(max_tokens)
        self._bucket_arr = np.asarray(self.buckets)
        self.max_seqlen = int(max_seqlen)
        self.hidden = hidden
        self.capture_after = capture_after
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Captured] = {}
        self.seen: Counter = Counter()
        self.stats: Counter = Counter()          # "replay", "eager", "capture"
        self.capture_s = 0.0                     # wall time spent capturing (warm-up run included)
        self._pool = None
        self._lock = threading.Lock()
        self._out: torch.Tensor | None = None

    # ---- choosing ------------------------------------------------------------------------------
    def key_for(self, num_tokens: int, seqlens: list[int], max_seqlen: int, has_token_types: bool) -> tuple | None:
        """(N, slots, has_tt) of the graph that would run this batch, or None for eager."""
        if num_tokens == 0 or num_tokens > self.buckets[-1] or max_seqlen > self.max_seqlen:
            return None
        i = int(np.searchsorted(self._bucket_arr, num_tokens))
        n, prev = self.buckets[i], (self.buckets[i - 1] if i else 0)
        slots = seq_bucket(len(seqlens)) + -(-(n - prev) // DUMMY_CHUNK)
        return n, slots, has_token_types

    # ---- running -------------------------------------------------------------------------------
    @torch.inference_mode()
    def __call__(self, batch: PackedBatch, meta: AttentionMeta) -> torch.Tensor:
        """A batch already on the device. Batches with visible-key prefixes (meta.key_lens) run eagerly: a
        captured graph attends to every key of its sequences."""
        if meta.key_lens is not None:
            with self._lock:
                self.stats["eager"] += 1
            return self.forward(batch, meta)
        return self._run(batch, meta.seqlens, meta.max_seqlen, lambda: (batch, meta))

    @torch.inference_mode()
    def run_host(self, batch: PackedBatch, seqlens: list[int]) -> torch.Tensor:
        """A batch still on the host: a replay stages its rows with the rest of the graph's inputs and
        copies them in one host-to-device copy, with no device copy of the batch in between; an eager
        run moves the batch to the device first."""
        def eager():
            dev = batch.to(self.device, non_blocking=True)
            return dev, AttentionMeta.build(dev.cu_seqlens, dev.max_seqlen, seqlens)
        return self._run(batch, seqlens, batch.max_seqlen, eager)

    def _run(self, batch: PackedBatch, seqlens: list[int], max_seqlen: int, eager_inputs) -> torch.Tensor:
        key = self.key_for(batch.num_tokens, seqlens, max_seqlen, batch.token_type_ids is not None)
        with self._lock:
            g = self.graphs.get(key) if key is not None else None
            if g is None and key is not None:
                self.seen[key] += 1
                if self.seen[key] >= self.capture_after and len(self.graphs) < self.max_graphs:
                    g = self._capture(key)
            if g is None:
                self.stats["eager"] += 1
                return self.forward(*eager_inputs())
            t = batch.num_tokens
            g.turn ^= 1
            host, done = g.host[g.turn], g.copied[g.turn]
            done.synchronize()                  # its previous copy (two batches ago) has long finished
            ids, pos, tt, cu = g.split(host.numpy(), np.int32)
            cu[:] = padded_cu_seqlens(seqlens, g.n, g.slots)
            src = [batch.input_ids, batch.positions] + ([batch.token_type_ids] if tt is not None else [])
            if src[0].device.type == "cpu":     # host rows: staged with the rest, one copy for all
                for dst, rows in zip((ids, pos, tt), src):
                    dst[:t] = rows.numpy()
                    dst[t:] = 0                 # the dummy segment: any valid id / position
                g.inputs.copy_(host, non_blocking=True)
            else:                               # rows on the device: device copies, then the meta part
                d_ids, d_pos, d_tt, _ = g.split(g.inputs, torch.int32)
                torch._foreach_copy_([d[:t] for d in (d_ids, d_pos, d_tt)[:len(src)]], src, non_blocking=True)
                k = g.rows * g.n
                g.inputs[k:].copy_(host[k:], non_blocking=True)
            done.record()
            g.graph.replay()
            self.stats["replay"] += 1
            return self._output()[:t].clone()

    def describe(self) -> dict:
        """For Model.info() / the server's /info: the captured graphs and how batches ran so far."""
        d = {"graphs": len(self.graphs), "graph_max_tokens": self.buckets[-1], "replays": self.stats["replay"],
             "eager_runs": self.stats["eager"], "captures": self.stats["capture"],
             "capture_s": round(self.capture_s, 4)}
        if hasattr(self.forward, "describe"):
            d.update(self.forward.describe())
        return d

    def _output(self) -> torch.Tensor:
        """The static output rows, shared by every graph (sized for the largest bucket)."""
        if self._out is None:
            self._out = torch.zeros(self.buckets[-1], self.hidden, device=self.device, dtype=self.dtype)
        return self._out

    def _capture(self, key: tuple) -> _Captured:
        t0 = time.perf_counter()
        n, slots, has_tt = key
        rows = 3 if has_tt else 2
        size = _Captured.size(n, rows, slots)
        cap = _Captured(graph=torch.cuda.CUDAGraph(), n=n, slots=slots, rows=rows,
                        inputs=torch.zeros(size, dtype=torch.long, device=self.device))
        ids, pos, tt, cu = cap.split(cap.inputs, torch.int32)
        # during the warm-up every segment is empty (attention touches nothing); replays refill `cu`
        static = PackedBatch(input_ids=ids, positions=pos, cu_seqlens=cu, max_seqlen=min(self.max_seqlen, n),
                             token_type_ids=tt)
        meta = AttentionMeta(cu_seqlens=cu, max_seqlen=static.max_seqlen, seqlens=[])
        out = self._output()[:n]
        graph = cap.graph
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        # capture_begin/end rather than the `torch.cuda.graph` context, which also runs gc.collect() and
        # empty_cache(): with a large Python heap (an encode() of many texts) that took tens of ms per capture
        with torch.cuda.stream(side):
            self.forward(static, meta, out=out)   # warm-up: compiles kernels, creates library handles
            side.synchronize()
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                self.forward(static, meta, out=out)
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._pool is None:
            self._pool = graph.pool()
        cap.host = tuple(torch.zeros(size, dtype=torch.long, pin_memory=True) for _ in range(2))
        cap.copied = (torch.cuda.Event(), torch.cuda.Event())
        for e in cap.copied:
            e.record()
        self.graphs[key] = cap
        self.stats["capture"] += 1
        self.capture_s += time.perf_counter() - t0
        log.debug("captured CUDA graph for %d tokens, %d segments", n, slots)
        return cap

    def warmup(self, shapes: list[tuple[int, int]], has_token_types: bool = False) -> None:
        """Capture graphs ahead of time for (num_tokens, num_seqs) shapes (e.g. a server's typical batches)."""
        with torch.inference_mode(), self._lock:
            for t, b in shapes:
                key = self.key_for(t, [1] * b, 1, has_token_types)
                if key is not None and key not in self.graphs and len(self.graphs) < self.max_graphs:
                    self._capture(key)
