"""sentence-transformers MultiVectorEncoder folders (ColBERT) and PyLate folders: Transformer + Dense [+
MultiVectorMask] [+ Normalize], with the query / document rules read as sentence-transformers reads them.

Native folders keep query_length / document_length / query_expansion in the Transformer's
sentence_bert_config.json and the skiplist in MultiVectorMask's config.json. PyLate (<= 3) folders keep them
at the top of config_sentence_transformers.json (model_type "ColBERT": query_prefix, document_prefix,
query_length, document_length, do_query_expansion, attend_to_expansion_tokens, skiplist_words) and list only
Transformer + pylate Dense; the mask (punctuation skiplist by default) and the Normalize are implied.
"""
from __future__ import annotations

import string
from pathlib import Path

from ..colbert import ColbertConfig, TokenProjection
from ..files import read_json
from ..outputs import read_output_config
from .hf import load_hf, read_state_dict
from .parts import ModelParts

ST_CONFIG = "config_sentence_transformers.json"
PYLATE_KEYS = ("query_length", "document_length", "query_expansion", "do_query_expansion",
               "attend_to_expansion_tokens", "attend_to_mask_tokens", "query_prefix", "document_prefix",
               "skiplist_words")
IDENTITY = ("torch.nn.modules.linear.Identity",)


def _kind(m: dict) -> str:
    return m.get("type", "").rsplit(".", 1)[-1]


def is_multi_vector_folder(folder: Path, modules: list[dict]) -> bool:
    """config_sentence_transformers.json says MultiVectorEncoder (or PyLate's ColBERT), or a MultiVectorMask
    or a pylate module is listed."""
    p = folder / ST_CONFIG
    if p.exists() and read_json(p).get("model_type") in ("MultiVectorEncoder", "ColBERT"):
        return True
    return any(_kind(m) == "MultiVectorMask" or m.get("type", "").startswith("pylate.") for m in modules)


def _read_projection(path: Path) -> TokenProjection:
    cfg = read_json(path / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if act not in IDENTITY:
        raise ValueError(f"{path / 'config.json'}: activation_function {act!r} is not supported on token "
                         "embeddings; packformer runs the ColBERT projection with Identity")
    if cfg.get("module_input_name", "token_embeddings") != "token_embeddings":
        raise ValueError(f"{path / 'config.json'}: module_input_name {cfg['module_input_name']!r}: a multi-vector "
                         "model's Dense must read token_embeddings")
    proj = TokenProjection(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)))
    missing, unused = proj.load_state_dict(read_state_dict(path), strict=False)
    if missing or unused:
        raise ValueError(f"{path}: Dense weights do not fit {cfg}: missing {missing}, unused {unused}")
    return proj


def _expansion(d: dict | None, where: str) -> dict | None:
    if d is None:
        return None
    unknown = set(d) - {"strategy", "attend", "token", "length"}
    if unknown:
        raise ValueError(f"{where}: query_expansion has unknown keys {sorted(unknown)}")
    if d.get("strategy") not in ("fixed", "min"):
        raise ValueError(f"{where}: query_expansion['strategy'] must be 'fixed' or 'min', got {d.get('strategy')!r}")
    length = d.get("length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"{where}: query_expansion['length'] must be a positive int, got {length!r}")
    return {"strategy": d["strategy"], "attend": bool(d.get("attend", False)), "token": d.get("token"),
            "length": length}


def load_multi_vector(folder: str | Path) -> ModelParts:
    folder = Path(folder)
    modules = read_json(folder / "modules.json")
    kinds = [_kind(m) for m in modules]
    top_path = folder / ST_CONFIG
    top = read_json(top_path) if top_path.exists() else {}
    pylate = top.get("model_type") == "ColBERT"
    allowed = {"Transformer", "Dense", "MultiVectorMask", "Normalize"}
    odd = [m.get("type") for m, k in zip(modules, kinds) if k not in allowed]
    if odd or kinds[:1] != ["Transformer"] or kinds.count("Transformer") != 1:
        raise ValueError(f"{folder / 'modules.json'}: packformer runs multi-vector folders of Transformer + Dense "
                         f"[+ MultiVectorMask] [+ Normalize]; this one holds {' + '.join(kinds)}"
                         + (f" (unsupported: {odd})" if odd else ""))
    rest = kinds[1:]
    n_dense = rest.count("Dense")
    if rest[:n_dense] != ["Dense"] * n_dense or n_dense > 1 or rest[n_dense:] not in (
            [], ["MultiVectorMask"], ["MultiVectorMask", "Normalize"], ["Normalize"]):
        raise ValueError(f"{folder / 'modules.json'}: expected Transformer, at most one Dense, then MultiVectorMask "
                         f"and Normalize; found {' + '.join(kinds)}")
    tpath = folder / modules[0].get("path", "")
    st_cfg_path = tpath / "sentence_bert_config.json"
    st_cfg = read_json(st_cfg_path) if st_cfg_path.exists() else {}
    task = st_cfg.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise ValueError(f"{st_cfg_path}: transformer_task {task!r}: packformer's multi-vector models need "
                         "feature-extraction")
    if "message" in (st_cfg.get("modality_config") or {}):
        raise ValueError(f"{st_cfg_path}: modality_config 'message' (a chat-template backbone) is not supported")

    # the Transformer's own keys win; PyLate's top-level keys fill in (sentence-transformers' setdefault order)
    knobs = {k: st_cfg[k] for k in ("query_length", "document_length") if st_cfg.get(k) is not None}
    expansion = _expansion(st_cfg.get("query_expansion"), str(st_cfg_path))
    has_expansion_key = "query_expansion" in st_cfg
    for k in ("query_length", "document_length"):
        if top.get(k) is not None:
            knobs.setdefault(k, top[k])
    if not has_expansion_key and "query_expansion" in top:
        expansion, has_expansion_key = _expansion(top["query_expansion"], str(top_path)), True
    if not has_expansion_key and any(k in top for k in PYLATE_KEYS):
        if top.get("do_query_expansion") is not False:
            attend = top.get("attend_to_expansion_tokens", top.get("attend_to_mask_tokens"))
            length = knobs.pop("query_length", None) or 32
            expansion = {"strategy": "fixed", "attend": bool(attend), "token": None, "length": length}
    for k, v in knobs.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{st_cfg_path}: {k} must be a positive int, got {v!r}")
    if expansion is not None and knobs.get("query_length") is not None and knobs["query_length"] < expansion["length"]:
        raise ValueError(f"{st_cfg_path}: query_length={knobs['query_length']} is smaller than "
                         f"query_expansion['length']={expansion['length']}")

    mask_cfg: dict = {}
    if "MultiVectorMask" in kinds:
        mask_cfg = read_json(folder / modules[kinds.index("MultiVectorMask")]["path"] / "config.json")
    skiplist = mask_cfg.get("skiplist_words")
    if "MultiVectorMask" not in kinds and pylate:       # PyLate <= 3: its punctuation skiplist, unless pinned
        skiplist = top.get("skiplist_words") if top.get("skiplist_words") is not None else list(string.punctuation)
    skip_tasks = mask_cfg.get("skiplist_tasks") or ["document"]
    skip_tasks = [skip_tasks] if isinstance(skip_tasks, str) else list(skip_tasks)

    parts = load_hf(tpath)
    if parts.config.num_labels:
        raise ValueError(f"{tpath} holds a classification model; a multi-vector model needs an encoder")
    if any(getattr(l, "disentangled", None) is not None for l in parts.encoder.layers) and expansion is not None \
            and not expansion["attend"]:
        raise ValueError(f"{st_cfg_path}: query_expansion with attend=False is not supported for DeBERTa")
    msl = st_cfg.get("max_seq_length")
    if msl:
        parts.max_seq_length = min(int(msl), parts.config.max_tokens_per_sequence)
    limit = parts.config.max_tokens_per_sequence
    for k, v in [*knobs.items(), *([("query_expansion['length']", expansion["length"])] if expansion else [])]:
        if v > limit:
            raise ValueError(f"{st_cfg_path}: {k}={v} is more than the model's {limit} positions")
    default_length = parts.max_seq_length          # documents and queries without their own length
    parts.max_seq_length = max([parts.max_seq_length, *knobs.values(), *([expansion["length"]] if expansion else [])])

    oc = read_output_config(folder)
    # PyLate's query_prefix / document_prefix go before the saved prompts, as sentence-transformers composes them
    prefixes = {}
    for key, name in (("query_prefix", "query"), ("document_prefix", "document")):
        if key in top:
            prefixes[name] = top[key] or ""
            oc.prompts[name] = prefixes[name] + (oc.prompts.get(name) or "").removeprefix(prefixes[name])
    dense = [_read_projection(folder / m["path"]) for m, k in zip(modules, kinds) if k == "Dense"]
    if not dense:
        raise ValueError(f"{folder / 'modules.json'}: a multi-vector folder needs its Dense projection")
    parts.output_config = oc
    parts.outputs = {"multi_vector": dense[0]}
    parts.colbert = ColbertConfig(
        query_length=knobs.get("query_length"), document_length=knobs.get("document_length"), expansion=expansion,
        default_length=default_length,
        skiplist_words=list(skiplist or []), skiplist_tasks=skip_tasks,
        keep_only_token_ids=mask_cfg.get("keep_only_token_ids"), normalize="Normalize" in kinds or pylate,
        prefixes=prefixes, similarity_fn_name=top.get("similarity_fn_name"))
    parts.colbert.resolve(parts.tokenizer, tpath)
    parts.source, parts.format = str(folder), "multi-vector"
    return parts
