"""`packformer bench-serve`: throughput (tokens/s) and p50/p99 latency of `packformer serve` at several
client concurrencies, next to the same texts through offline `encode()`, through a plain FastAPI app
calling `SentenceTransformer.encode` per request, and through the embedding servers named by --peer
(Infinity). Everything runs on localhost, bounded in requests and time; the load generator shares the
machine with the server (say so when you report figures)."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from .common import POSITIVE, POSITIVE_NUMBER, add_model_options


def add_parser(sub):
    p = sub.add_parser("bench-serve", help="benchmark packformer serve against offline encode and a plain server",
                       description=__doc__)
    add_model_options(p, positional=True)
    p.add_argument("--url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=os.environ.get("PACKFORMER_API_KEY"), help="API key of --url's server")
    p.add_argument("--concurrency", type=POSITIVE, nargs="+", default=[1, 8, 64],
                   help="client counts (default: 1 8 64)")
    p.add_argument("--requests", type=POSITIVE, default=600, help="requests per concurrency level (default: 600)")
    p.add_argument("--duration", type=POSITIVE_NUMBER, default=60.0,
                   help="max seconds per concurrency level (default: 60)")
    p.add_argument("--texts-per-request", type=POSITIVE, default=1, help="texts in one request (default: 1)")
    p.add_argument("--num-texts", type=POSITIVE, default=None,
                   help="distinct texts, cycled by the requests (default: requests x texts-per-request)")
    p.add_argument("--seed", type=int, default=7, help="seed of the benchmark text generator (default: 7)")
    p.add_argument("--no-baseline", action="store_true", help="skip the FastAPI + SentenceTransformer server")
    p.add_argument("--peer", action="append", default=[], choices=["infinity"],
                   help="also drive this embedding server on the same model folder (repeatable): infinity = "
                        "`infinity_emb v2` (pip install -e \".[peers]\")")
    p.add_argument("--no-offline", action="store_true", help="skip offline encode() throughput")
    p.add_argument("--rerank", type=POSITIVE, default=None, metavar="N",
                   help="rerank mode: POST /rerank of one query x N passages to packformer serve on a cross-encoder "
                        "MODEL (default: a MiniLM-size one); latency and requests/s per concurrency")
    p.add_argument("--sparse", action="store_true",
                   help="sparse mode: POST /embed_sparse to packformer serve on a SPLADE MODEL (default: a random "
                        "SPLADE of bert-base shape); latency and tokens/s per concurrency")
    p.add_argument("--server-arg", action="append", default=[],
                   help="extra argument for the started server (repeatable), e.g. --server-arg=--max-batch-requests=64")
    p.add_argument("--output", "-o", default="bench-serve.json", help="JSON results file (default: bench-serve.json)")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. 'shared machine')")
    return p


def machine() -> dict:
    """The benchmark's machine (bench.report.machine_info) plus the host name and the load at start,
    which tells whether the figures were taken on a quiet machine."""
    import torch

    from ..bench.report import machine_info

    d = machine_info("cuda" if torch.cuda.is_available() else "cpu")
    d["hostname"] = platform.node()
    try:
        d["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return d


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere). On a shared machine,
    tokens per CPU-second compare servers more fairly than wall-clock throughput does."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args) -> int:
    if args.rerank is not None:
        from ..bench.rerank import serve_rerank
        return serve_rerank(args)
    if args.sparse:
        from ..bench.outputs import serve_sparse
        return serve_sparse(args)
    import packformer
    from ..bench.launch import ServerProcess
    from ..bench.loadgen import run_level
    from ..bench.workloads import generate_texts

    tpr = args.texts_per_request
    n_texts = args.num_texts or args.requests * tpr
    texts = generate_texts(n_texts, args.seed)
    model = packformer.load(args.model, device=args.device, dtype=args.dtype)
    lengths = [len(s) for s in model.token_ids(texts)]
    payloads = [{"inputs": texts[i: i + tpr]} for i in range(0, len(texts), tpr)]
    tokens = [sum(lengths[i: i + tpr]) for i in range(0, len(texts), tpr)]
    total_tokens = sum(lengths)
    print(f"bench-serve: {len(texts)} generated texts (seed {args.seed}), {total_tokens} tokens, "
          f"{len(payloads)} distinct requests of {tpr} text(s); {args.requests} requests per level, "
          f"at most {args.duration:g} s each", file=sys.stderr)
    results: dict = {"machine": machine(), "note": args.note, "model": str(model.source),
                     "device": str(model.device), "dtype": str(model.dtype).replace("torch.", ""),
                     "texts": {"count": len(texts), "tokens": total_tokens, "seed": args.seed,
                               "texts_per_request": tpr},
                     "requests_per_level": args.requests, "duration_cap_s": args.duration, "levels": args.concurrency}

    check_texts = texts[:8]
    check = model.encode(check_texts)       # what a peer server must answer for these texts
    pooling = model.pooler.mode
    if not args.no_offline:
        model.encode(texts)     # a first pass: on a GPU it compiles kernels for these batch shapes
        c0 = time.process_time()
        s = _timed(lambda: model.encode(texts))
        cpu = time.process_time() - c0
        results["offline_encode"] = {"seconds": round(s, 3), "tokens_per_s": round(total_tokens / s, 1),
                                     "tokens_per_cpu_s": round(total_tokens / cpu, 1), "load_average": _load()}
        print(f"  offline packformer encode(): {total_tokens / s:,.0f} tokens/s", file=sys.stderr)
    del model                               # free the CPU and memory for the servers

    def levels(url: str, headers: dict | None, name: str, pid: int | None = None, bodies: list | None = None) -> dict:
        bodies = bodies or payloads
        out = {}
        for c in args.concurrency:
            run_level(url, bodies, tokens, c, min(2 * c, 16), 30.0, headers=headers)        # connections, warm
            cpu0 = process_cpu_seconds(pid) if pid else None
            load0 = _load()
            r = run_level(url, bodies, tokens, c, args.requests, args.duration, headers=headers)
            cpu1 = process_cpu_seconds(pid) if pid else None
            out[str(c)] = d = r.summary()
            d["load_average"] = [load0, _load()]
            if cpu0 is not None and cpu1 is not None and cpu1 > cpu0:
                d["server_cpu_s"] = round(cpu1 - cpu0, 2)
                d["tokens_per_server_cpu_s"] = round(r.tokens / (cpu1 - cpu0), 1)
            print(f"  {name} c={c}: {r.tokens_per_s:,.0f} tokens/s, p50 {r.percentile_ms(50):.1f} ms, "
                  f"p99 {r.percentile_ms(99):.1f} ms, {r.ok}/{r.sent} ok {r.errors or ''}", file=sys.stderr)
        return out

    model_args = [args.model] if args.model else []
    if args.url:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
        results["serve"] = levels(args.url.rstrip("/") + "/embed", headers, "packformer serve")
        results["serve_url"] = args.url
    else:
        server_args = [*model_args, "--device", args.device, "--log-level", "warning", *args.server_arg]
        if args.dtype:
            server_args += ["--dtype", args.dtype]
        if args.max_batch_tokens:
            server_args += ["--max-batch-tokens", str(args.max_batch_tokens)]
        results["serve_args"] = server_args
        with ServerProcess(server_args) as srv:
            results["serve"] = levels(srv.url + "/embed", None, "packformer serve", srv.proc.pid)

    folder = model_folder(args.model)
    if not args.no_baseline:
        if folder is None:
            print("  baseline skipped: it needs a model folder, not a random preset", file=sys.stderr)
        else:
            with ServerProcess([folder, "--device", args.device],
                               command=[sys.executable, "-m", "packformer.bench.serve_baseline"]) as srv:
                results["baseline"] = levels(srv.url + "/embed", None, "FastAPI+SentenceTransformer", srv.proc.pid)
            from sentence_transformers import SentenceTransformer
            st = SentenceTransformer(folder, device=args.device)
            st.encode(texts)
            c0 = time.process_time()
            s = _timed(lambda: st.encode(texts))
            cpu = time.process_time() - c0
            results["offline_sentence_transformers"] = {"seconds": round(s, 3),
                                                        "tokens_per_s": round(total_tokens / s, 1),
                                                        "tokens_per_cpu_s": round(total_tokens / cpu, 1)}

    for name in dict.fromkeys(args.peer):
        from ..bench.peers import NotApplicable
        from ..bench.serve_peers import SERVERS, check_agreement
        try:
            if folder is None:
                raise NotApplicable("it needs a model folder, not a random preset")
            peer = SERVERS[name](folder, args.device, pooling, results["dtype"])
        except (FileNotFoundError, NotApplicable) as e:   # not installed, or cannot serve this model
            print(f"  {name} skipped: {e}", file=sys.stderr)
            results[f"{name}_skipped"] = str(e)
            continue
        bodies = [peer.body(texts[i: i + tpr]) for i in range(0, len(texts), tpr)]
        with ServerProcess([], command=peer.command, env=peer.env) as srv:
            results[f"{name}_agreement"] = agree = check_agreement(peer, srv.url, check_texts, check)
            print(f"  {peer.label}: min cosine {agree['min_cosine']:.6f} against packformer on "
                  f"{agree['texts']} texts", file=sys.stderr)
            results[name] = levels(srv.url + peer.route, None, peer.label, srv.proc.pid, bodies)
        results[f"{name}_command"] = peer.command

    results["ratios"] = ratios(results)
    print(table(results))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def model_folder(model: str | None) -> str | None:
    """The folder the peer servers load (the built-in one for the default names); None for a random preset."""
    from ..loading import _DEFAULT_ALIASES, builtin_model_dir

    folder = str(builtin_model_dir()) if model in _DEFAULT_ALIASES else str(model)
    return None if folder.startswith("random:") else folder


PEER_SERVERS = ("baseline", "infinity")    # results keys of the servers measured next to packformer serve


def ratios(results: dict) -> dict:
    out = {}
    off = results.get("offline_encode", {}).get("tokens_per_s")
    for c, r in results.get("serve", {}).items():
        d = {}
        if off:
            d["serve_vs_offline_encode"] = round(r["tokens_per_s"] / off, 3)
        for peer in PEER_SERVERS:
            other = results.get(peer, {}).get(c)
            if other and other["tokens_per_s"] > 0:
                d[f"serve_vs_{peer}"] = round(r["tokens_per_s"] / other["tokens_per_s"], 2)
            if other and r.get("tokens_per_server_cpu_s") and other.get("tokens_per_server_cpu_s"):
                d[f"serve_vs_{peer}_per_cpu_s"] = round(r["tokens_per_server_cpu_s"] / other["tokens_per_server_cpu_s"], 2)
        out[c] = d
    return out


def table(results: dict) -> str:
    rows = ["| concurrency | serve tokens/s | p50 ms | p99 ms | baseline tokens/s | baseline p50 / p99 ms "
            "| serve / baseline | serve / offline encode | serve / baseline per server CPU-s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for c, r in results.get("serve", {}).items():
        b = results.get("baseline", {}).get(c)
        q = results["ratios"].get(c, {})
        rows.append(f"| {c} | {r['tokens_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                    + (f"{b['tokens_per_s']:,.0f} | {b['p50_ms']:.1f} / {b['p99_ms']:.1f} | " if b else "– | – | ")
                    + f"{q.get('serve_vs_baseline', '–')} | {q.get('serve_vs_offline_encode', '–')} | "
                    + f"{q.get('serve_vs_baseline_per_cpu_s', '–')} |")
    if results.get("infinity"):
        rows += ["", "| concurrency | serve tokens/s | Infinity tokens/s | Infinity p50 / p99 ms | serve / Infinity "
                 "| serve / Infinity per server CPU-s |", "|---|---|---|---|---|---|"]
        for c, r in results.get("serve", {}).items():
            i = results["infinity"].get(c)
            q = results["ratios"].get(c, {})
            rows.append(f"| {c} | {r['tokens_per_s']:,.0f} | "
                        + (f"{i['tokens_per_s']:,.0f} | {i['p50_ms']:.1f} / {i['p99_ms']:.1f} | " if i else "– | – | ")
                        + f"{q.get('serve_vs_infinity', '–')} | {q.get('serve_vs_infinity_per_cpu_s', '–')} |")
    off = results.get("offline_encode", {}).get("tokens_per_s")
    st = results.get("offline_sentence_transformers", {}).get("tokens_per_s")
    if off:
        rows.append(f"\noffline packformer encode(): {off:,.0f} tokens/s")
    if st:
        rows.append(f"offline SentenceTransformer.encode(): {st:,.0f} tokens/s")
    return "\n".join(rows)
