"""A closed-loop HTTP load generator for bench-serve: N clients, each sending its next request as soon as
the previous one answered, bounded in requests and in time.

aiohttp rather than httpx: on a 2-core machine the client shares the CPU with the server, and aiohttp
spends several times less CPU per request.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class LevelResult:
    concurrency: int
    sent: int
    ok: int
    tokens: int                       # tokens of the requests that succeeded
    wall_s: float
    errors: dict[str, int] = field(default_factory=dict)   # status (or exception name) -> count
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def summary(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "latencies_ms"}
        d.update(tokens_per_s=round(self.tokens_per_s, 1), requests_per_s=round(self.requests_per_s, 2),
                 p50_ms=round(self.percentile_ms(50), 2), p99_ms=round(self.percentile_ms(99), 2),
                 mean_ms=round(float(np.mean(self.latencies_ms)), 2) if self.latencies_ms else float("nan"))
        return d


async def _run_level(url: str, payloads: Sequence[dict], tokens: Sequence[int], concurrency: int,
                     max_requests: int, duration_s: float, timeout_s: float, headers: dict | None) -> LevelResult:
    import aiohttp

    next_i = 0
    res = LevelResult(concurrency, 0, 0, 0, 0.0)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        t0 = time.perf_counter()
        deadline = t0 + duration_s

        async def client():
            nonlocal next_i
            while next_i < max_requests and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                res.sent += 1
                start = time.perf_counter()
                try:
                    async with session.post(url, json=payloads[i % len(payloads)]) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    status = type(e).__name__
                if status == 200:
                    res.ok += 1
                    res.tokens += tokens[i % len(payloads)]
                    res.latencies_ms.append((time.perf_counter() - start) * 1e3)
                else:
                    res.errors[str(status)] = res.errors.get(str(status), 0) + 1

        await asyncio.gather(*(client() for _ in range(concurrency)))
        res.wall_s = time.perf_counter() - t0
    return res


def run_level(url: str, payloads: Sequence[dict], tokens: Sequence[int], concurrency: int, max_requests: int,
              duration_s: float = 60.0, timeout_s: float = 120.0, headers: dict | None = None) -> LevelResult:
    """POST payloads (cycled) to `url` from `concurrency` clients until `max_requests` were sent or
    `duration_s` passed; each request may take at most `timeout_s`."""
    return asyncio.run(_run_level(url, payloads, tokens, concurrency, max_requests, duration_s, timeout_s, headers))


def drive_server(folder: str, route: str, payloads: Sequence[dict], tokens: Sequence[int], args, out: dict,
                 server_args: Sequence[str] = ()) -> dict:
    """bench-serve's route modes (--rerank, --sparse): start `packformer serve folder` with args' device,
    dtype and budget, drive `route` at each of args.concurrency (after a short warm-up), record each level's
    summary in out["levels"] and the machine in out["machine"], write args.output. Returns `out`."""
    import json
    import sys
    from pathlib import Path

    from .launch import ServerProcess
    from .report import machine_info

    cmd = [str(folder), "--device", args.device, "--log-level", "warning", *server_args, *args.server_arg]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if args.max_batch_tokens:
        cmd += ["--max-batch-tokens", str(args.max_batch_tokens)]
    out.setdefault("levels", {})
    with ServerProcess(cmd) as srv:
        for c in args.concurrency:
            run_level(srv.url + route, payloads, tokens, c, min(2 * c, 16), 30.0)                # warm
            r = run_level(srv.url + route, payloads, tokens, c, args.requests, args.duration)
            out["levels"][str(c)] = r.summary()
            print(f"  {route} c={c}: p50 {r.percentile_ms(50):.1f} ms, p99 {r.percentile_ms(99):.1f} ms, "
                  f"{r.requests_per_s:.1f} requests/s, {r.tokens_per_s:.0f} tokens/s, {r.ok}/{r.sent} ok "
                  f"{r.errors or ''}", file=sys.stderr)
    out["machine"] = machine_info(args.device)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return out
