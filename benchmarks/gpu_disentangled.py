"""DeBERTa's disentangled attention on the GPU, op level: the flash kernel (ops/disentangled_flash.py;
flash_varlen's default 64x32 tiles first, then others: the model runs 64x16 w4 s3) against the grouped
torch implementation (ops/disentangled.py), the plain flash kernel without position terms and the
position tables' GEMMs alone, on the serve_b32 and offline_b256 lengths of deberta-v3-base (12 heads
of 64, fp16, DeBERTa-v3's 256 buckets). Prints a table and writes JSON to --out.

    PYTHONPATH=src python3 benchmarks/gpu_disentangled.py --out $OUT/disentangled.json
"""
from __future__ import annotations

import argparse
import json

import torch

from packformer.bench.timing import measure
from packformer.bench.workloads import lengths
from packformer.ops.attention import AttentionMeta
from packformer.ops.disentangled import DisentangledConfig, disentangled_attention
from packformer.ops.disentangled_flash import aligned_rows, disentangled_flash, position_scores
from packformer.ops.flash_varlen import FlashConfig, default_config, flash_varlen, tile_table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="disentangled.json")
    args = ap.parse_args()
    cfg, nh, d = DisentangledConfig(256, 512, ("c2p", "p2c")), 12, 64
    rows = []
    for name in ("serve_b32", "offline_b256"):
        lens = lengths(name)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = torch.randn(sum(lens), 3, nh, d, device="cuda", generator=g, dtype=torch.float16).unbind(1)
        pq, pk = (torch.randn(2, nh, 2 * cfg.span, d, device="cuda", generator=g) * 0.5).half().unbind(0)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        fc = default_config(d, 512)
        tiles = torch.from_numpy(tile_table(lens, fc.block_m)).cuda()
        meta = AttentionMeta.build(cu, max(lens), lens)
        lo, hi = aligned_rows(cfg, max(lens))
        ways = {
            "disentangled_flash": lambda: disentangled_flash(q, k, v, cu, max(lens), pq, pk, cfg, config=fc,
                                                             tiles=tiles),
            "grouped_torch": lambda: disentangled_attention(q, k, v, meta, pq, pk, cfg),
            "plain_flash (no position terms)": lambda: flash_varlen(q, k, v, cu, max(lens), config=fc, tiles=tiles),
            "position_scores (the tables alone)": lambda: position_scores(q, k, pq, pk, cfg, lo, hi)[0],
        }
        for bm, bn, warps, stages in ((64, 16, 4, 3), (64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2),
                                      (128, 32, 8, 3)):
            c = FlashConfig(bm, bn, warps, stages)
            t_c = torch.from_numpy(tile_table(lens, bm)).cuda()
            ways[f"disentangled_flash {bm}x{bn} w{warps} s{stages}"] = (
                lambda c=c, t_c=t_c: disentangled_flash(q, k, v, cu, max(lens), pq, pk, cfg, config=c, tiles=t_c))
        ref = ways["grouped_torch"]().float()
        for way, fn in ways.items():
            t, out = measure(fn, "cuda", iterations=20, warmup=3)
            diff = (out.float() - ref).abs().max().item() if out.shape == ref.shape else float("nan")
            rows.append({"workload": name, "tokens": sum(lens), "way": way, "median_ms": t.median_ms,
                         "max_abs_diff_vs_grouped": diff})
            print(f"{name:13s} {way:32s} {t.median_ms:8.3f} ms  max|diff| {diff:.2e}", flush=True)
    info = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
