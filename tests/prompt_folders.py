"""sentence-transformers folders of the real all-MiniLM-L6-v2 with prompts, a default prompt, truncate_dim,
include_prompt and a pooling mode of the test's choosing (the weights are linked, not copied)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from packformer.loading import builtin_model_dir


def st_folder(dst: Path, prompts: dict | None = None, default: str | None = None, include_prompt: bool = True,
              mode: str = "mean", truncate_dim: int | None = None) -> Path:
    """The built-in all-MiniLM-L6-v2 as a sentence-transformers folder with these settings (weights linked)."""
    src = builtin_model_dir()
    dst.mkdir(parents=True)
    for p in src.iterdir():
        if p.is_dir():
            shutil.copytree(p, dst / p.name)
        elif p.suffix in (".safetensors", ".bin"):
            (dst / p.name).symlink_to(p)
        else:
            shutil.copy(p, dst / p.name)
    cfg = {"prompts": prompts or {}, "default_prompt_name": default}
    if truncate_dim is not None:
        cfg["truncate_dim"] = truncate_dim
    (dst / "config_sentence_transformers.json").write_text(json.dumps(cfg))
    pool = dst / "1_Pooling" / "config.json"
    pc = json.loads(pool.read_text())
    for key in [k for k in pc if k.startswith("pooling_mode")]:
        pc[key] = False
    pc[{"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens"}[mode]] = True
    pc["include_prompt"] = include_prompt
    pool.write_text(json.dumps(pc))
    return dst
