"""The `encode()` / `classify()` pipeline: tokenization of the next chunk of texts overlaps the device
work of the current one.

On a GPU the model runs at many millions of tokens/s while the fast tokenizer manages a few million on 16
cores, so tokenizing everything first and then running the model leaves the GPU idle for most of the
call. Here a background thread tokenizes texts in chunks (the Rust tokenizer releases the GIL and
spreads a chunk over all cores), while the calling thread packs each tokenized chunk into batches under
the token budget, stages them in reused pinned buffers and copies them to the device without blocking
(torch's CPU threads capped for the call: they only copy), launches the model,
and copies results back asynchronously. Results are scattered into input order at the end of a short
in-flight window, so host memory stays bounded and the device never waits for the host to read back.

Packed batches carry no padding, so a batch need not hold similar lengths: chunks are planned as they
arrive (length-sorted within the chunk, as `runtime.plan_chunks` does), not over the whole input; a
chunk's partly filled last batch is carried over into the next chunk.
The same pipeline runs on CPU (no pinning, no events); there it mainly hides tokenization behind
the model's matrix work, which releases the GIL.
"""
from __future__ import annotations

import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from .batch import PackedBatch, pack
from .runtime import check_batch_size, plan_chunks


@dataclass
class PipelineConfig:
    first_chunk: int = 256       # texts in the first tokenizer call: small, so the device starts early
    chunk: int = 2048            # texts per later tokenizer call
    prefetch: int = 2            # tokenized chunks kept ready ahead of the device
    inflight: int = 4            # batches launched whose results have not been read back yet

    def __post_init__(self):
        if min(self.first_chunk, self.chunk, self.prefetch, self.inflight) < 1:
            raise ValueError(f"PipelineConfig fields must be >= 1, got {self}")


@dataclass
class RunStats:
    """What one run_texts call did, for callers that report throughput (embed-dataset's replicas)."""

    tokens: int = 0              # real tokens run through the model
    batches: int = 0
    tokenize_wait_s: float = 0.0  # time the device feed waited for the tokenizer thread (not overlapped)


HOST_THREADS_ON_GPU = 1    # torch intra-op threads while encode() feeds a GPU


@contextmanager
def host_threads_for(device: torch.device) -> Iterator[None]:
    """While encode() feeds a GPU, torch's CPU pool only copies small tensors (pinning, read-back), and
    its idle threads spin on the cores the Rust tokenizer needs: on a 16-core H200 host, encode() of
    20,000 texts ran at 1.81M tokens/s with 16 torch threads and 2.11M with 1 (benchmarks/NOTES-gpu.md).
    The cap is set for the call and restored after it; with OpenMP it is the calling thread's setting.
    On CPU the model itself needs the pool: nothing changes."""
    saved = torch.get_num_threads()
    if torch.device(device).type == "cuda" and saved > HOST_THREADS_ON_GPU:
        torch.set_num_threads(HOST_THREADS_ON_GPU)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def default_config(device: torch.device) -> PipelineConfig:
    """On a GPU, larger tokenizer calls: each spreads over all cores with less per-call overhead, and
    the device, at millions of tokens/s, waits on the tokenizer. Measured on an H200 host (16 cores,
    20,000 texts, benchmarks/NOTES-gpu.md): all-MiniLM-L6-v2 1.72M tokens/s with (256, 2048), 2.15M with
    (512, 8192); bert-base 1.57M and 1.56M."""
    if torch.device(device).type == "cuda":
        return PipelineConfig(first_chunk=512, chunk=8192)
    return PipelineConfig()


def text_ranges(n: int, first: int, size: int) -> Iterator[tuple[int, int]]:
    """[0, n) cut into [start, end) ranges: one of `first` texts, then `size` each."""
    start, step = 0, first
    while start < n:
        end = min(n, start + step)
        yield start, end
        start, step = end, size


def tokenize_range(tokenizer, texts: Sequence[str], start: int, max_length: int, truncate: bool) -> list[list[int]]:
    """Ids for texts[start:start+len(texts)]: truncated to max_length, or with truncate=False a ValueError
    naming the over-long text's index in the caller's whole input."""
    if truncate:
        return tokenizer.encode(texts, max_length, True)
    ids = tokenizer.encode_raw(list(texts))
    for i, seq in enumerate(ids):
        if len(seq) > max_length:
            raise ValueError(f"texts[{start + i}] has {len(seq)} tokens, more than the model's maximum of "
                             f"{max_length}; pass truncate=True to cut it")
    return ids


class _PinnedStaging:
    """Reused pinned host buffers for the batches sent to a GPU. `pin_memory()` per tensor cost about
    1.7 ms each on an H200 host, four per batch, on the thread that also launches the model
    (benchmarks/gpu_encode_host.py); copying a batch into a buffer pinned once costs microseconds. A slot is
    reused only after the event recorded behind its batch's launch has fired, i.e. after its
    host-to-device copies are done."""

    def __init__(self, slots: int, event_factory: Callable[[], Any] | None = None, pin: bool = True):
        self.bufs: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * slots
        self.events: list[Any] = [None] * slots
        self.next = 0
        self.pin = pin
        self.event_factory = event_factory or torch.cuda.Event

    def stage(self, batch: PackedBatch) -> tuple[PackedBatch, int]:
        """The batch copied into a free slot (same values, pinned memory) and that slot's number."""
        i = self.next
        self.next = (i + 1) % len(self.bufs)
        if self.events[i] is not None:
            self.events[i].synchronize()          # long done in practice: the slot was used `slots` batches ago
            self.events[i] = None
        t, b1 = batch.num_tokens, batch.cu_seqlens.numel()
        rows = 3 if batch.token_type_ids is not None else 2
        buf = self.bufs[i]
        if buf is None or buf[0].numel() < rows * t or buf[1].numel() < b1:
            cap = max(rows * t, 3 * 4096)
            buf = (torch.empty(cap, dtype=torch.long, pin_memory=self.pin),
                   torch.empty(max(b1, 1024), dtype=torch.int32, pin_memory=self.pin))
            self.bufs[i] = buf
        flat, cu = buf
        ids, pos, cus = flat[:t], flat[t:2 * t], cu[:b1]
        ids.copy_(batch.input_ids)
        pos.copy_(batch.positions)
        cus.copy_(batch.cu_seqlens)
        tt = None
        if batch.token_type_ids is not None:
            tt = flat[2 * t:3 * t]
            tt.copy_(batch.token_type_ids)
        return replace(batch, input_ids=ids, positions=pos, cu_seqlens=cus, token_type_ids=tt), i

    def launched(self, slot: int) -> None:
        """Call right after the model was launched on the staged batch (its copies are on the stream)."""
        ev = self.event_factory()
        ev.record()
        self.events[slot] = ev


class _Readback:
    """Device results copied to pinned host memory without blocking; scattered once their event fires."""

    def __init__(self, out: torch.Tensor, window: int):
        self.out, self.window = out, window
        self.pending: deque = deque()

    def add(self, result: torch.Tensor, index: torch.Tensor) -> None:
        if result.device.type != "cuda":
            self.out[index] = result.float()
            return
        host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(result, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self.pending.append((ev, host, index))
        while len(self.pending) > self.window:
            self._pop()

    def _pop(self) -> None:
        ev, host, index = self.pending.popleft()
        ev.synchronize()
        self.out[index] = host

    def drain(self) -> None:
        while self.pending:
            self._pop()


def run_texts(model, texts: list[str], fn: Callable[[PackedBatch], torch.Tensor], width: int, *,
              batch_size: int | None = None, truncate: bool = True, show_progress_bar: bool | None = None,
              config: PipelineConfig | None = None,
              sink: Callable[[Any, list[int]], None] | None = None,
              stats: RunStats | None = None) -> torch.Tensor:
    """texts -> fn(batch) for every packed batch -> [N, width] fp32 on CPU, in input order.

    `fn` maps a PackedBatch on the host (pinned on CUDA) to [B, width] on the model's device, in the
    batch's own sequence order. With `sink`, outputs whose shape varies per text (token embeddings,
    sparse vectors) go to `sink(fn(batch), input indices of its sequences)` instead, and the returned
    tensor is [N, 0]. `stats`, if given, is filled in (tokens, batches, time waiting for the tokenizer)."""
    check_batch_size(batch_size)
    with host_threads_for(model.device):
        return _run_texts(model, texts, fn, 0 if sink is not None else width, batch_size, truncate,
                          show_progress_bar, config, sink, stats if stats is not None else RunStats())


def _run_texts(model, texts, fn, width, batch_size, truncate, show_progress_bar, config, sink,
               stats: RunStats) -> torch.Tensor:
    cfg = config or default_config(model.device)
    tokenizer = model._require_tokenizer()
    out = torch.empty(len(texts), width, dtype=torch.float32)
    if not texts:
        return out
    max_len, offset = model.max_seq_length, model.config.position_offset
    cuda = model.device.type == "cuda"
    ranges = list(text_ranges(len(texts), cfg.first_chunk, cfg.chunk))
    bar = _progress(len(texts), show_progress_bar, len(ranges))
    readback = _Readback(out, cfg.inflight)

    def tokenize(r):
        return r, tokenize_range(tokenizer, texts[r[0]:r[1]], r[0], max_len, truncate)

    def chunks() -> Iterator[tuple[tuple[int, int], list[list[int]]]]:
        if len(ranges) == 1:                  # nothing to overlap: no thread
            t0 = time.perf_counter()
            chunk = tokenize(ranges[0])
            stats.tokenize_wait_s += time.perf_counter() - t0
            yield chunk
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="packformer-tok") as pool:
            queued = deque(pool.submit(tokenize, r) for r in ranges[:cfg.prefetch + 1])
            nxt = cfg.prefetch + 1
            try:
                while queued:
                    t0 = time.perf_counter()
                    r, ids = queued.popleft().result()
                    stats.tokenize_wait_s += time.perf_counter() - t0
                    if nxt < len(ranges):
                        queued.append(pool.submit(tokenize, ranges[nxt]))
                        nxt += 1
                    yield r, ids
            finally:
                for f in queued:
                    f.cancel()

    staging = _PinnedStaging(cfg.inflight + 2) if cuda else None

    def launch(seqs: list[list[int]], index: list[int]) -> None:
        batch = pack(seqs, offset)
        stats.tokens += batch.num_tokens
        stats.batches += 1
        if staging is not None:
            batch, slot = staging.stage(batch)
        result = fn(batch)
        if staging is not None:
            staging.launched(slot)
        if sink is not None:
            sink(result, index)
            return
        readback.add(result, torch.as_tensor(index, dtype=torch.long))

    # The last, partly filled batch of a chunk waits for the next chunk's texts, so every batch but the
    # very last is full (and odd-sized tails do not each get a CUDA graph captured).
    left_ids: list[list[int]] = []
    left_idx: list[int] = []
    for (start, end), ids in chunks():
        ids = left_ids + ids
        idx = left_idx + list(range(start, end))
        plans = plan_chunks([len(s) for s in ids], model.max_batch_tokens, batch_size)
        last = plans.pop() if end < len(texts) else []
        for plan in plans:
            launch([ids[i] for i in plan], [idx[i] for i in plan])
        left_ids, left_idx = [ids[i] for i in last], [idx[i] for i in last]
        if bar is not None:
            bar.update(end - start)
    readback.drain()
    if bar is not None:
        bar.close()
    return out


def _progress(total: int, show: bool | None, n_chunks: int):
    if show is None:
        show = n_chunks > 4 and sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="packformer", unit="text")
