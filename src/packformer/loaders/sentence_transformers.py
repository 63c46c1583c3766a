"""sentence-transformers folders: modules.json -> Transformer (an HF folder) + Pooling [+ Dense ...] [+ Normalize]."""
from __future__ import annotations

from pathlib import Path

from ..files import read_json
from ..heads import Dense, Pooler
from ..outputs import read_output_config
from .hf import load_hf
from .parts import ModelParts

TRANSFORMER = "sentence_transformers.models.Transformer"
POOLING = "sentence_transformers.models.Pooling"
NORMALIZE = "sentence_transformers.models.Normalize"
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max",
                "pooling_mode_lasttoken": "last"}
UNSUPPORTED_POOLING = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens")
DENSE_ACTIVATIONS = {"torch.nn.modules.linear.Identity": "identity", "torch.nn.modules.activation.Tanh": "tanh"}


def _module_type(m: dict) -> str:
    # sentence-transformers >= 5 may write short names ("sentence_transformers.models.Transformer" or
    # "sentence_transformers.base.modules...."); match on the class name.
    return m.get("type", "").rsplit(".", 1)[-1]


def read_pooling(path: Path) -> str:
    cfg = read_json(path / "config.json")
    on = [mode for key, mode in POOLING_KEYS.items() if cfg.get(key)]
    odd = [k for k in UNSUPPORTED_POOLING if cfg.get(k)]
    if odd or len(on) != 1:
        raise ValueError(f"{path / 'config.json'}: packformer supports exactly one of cls/mean/max/lasttoken "
                         f"pooling; found enabled {on + odd or 'none'}")
    return on[0]


def read_dense(path: Path) -> Dense:
    """A Dense module folder: config.json (in/out features, bias, activation) + model.safetensors or
    pytorch_model.bin (linear.weight, linear.bias)."""
    from .hf import read_state_dict

    cfg = read_json(path / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act not in DENSE_ACTIVATIONS:
        raise ValueError(f"{path / 'config.json'}: unsupported Dense activation_function {act!r}; supported: "
                         f"{', '.join(DENSE_ACTIVATIONS)}")
    dense = Dense(int(cfg["in_features"]), int(cfg["out_features"]), bias=bool(cfg.get("bias", True)),
                  act=DENSE_ACTIVATIONS[act])
    state = read_state_dict(path)
    missing, unused = dense.load_state_dict(state, strict=False)
    if missing or unused:
        raise ValueError(f"{path}: Dense weights do not fit {cfg}: missing {missing}, unused {unused}")
    return dense


def load_sentence_transformers(folder: str | Path) -> ModelParts:
    folder = Path(folder)
    modules = read_json(folder / "modules.json")
    kinds = [_module_type(m) for m in modules]
    from .sparse_encoder import is_sparse_encoder, load_sparse_encoder
    if is_sparse_encoder(folder, modules):        # SPLADE: MLMTransformer + SpladePooling
        return load_sparse_encoder(folder)
    from .multi_vector import is_multi_vector_folder, load_multi_vector
    if is_multi_vector_folder(folder, modules):   # ColBERT: Transformer + Dense + MultiVectorMask + Normalize
        return load_multi_vector(folder)
    unknown = [m.get("type") for m, k in zip(modules, kinds)
               if k not in ("Transformer", "Pooling", "Dense", "Normalize")]
    if unknown:
        raise ValueError(f"{folder / 'modules.json'}: unsupported module types {unknown}; "
                         "packformer runs Transformer + Pooling [+ Dense ...] [+ Normalize]")
    after = [k for k in kinds if k != "Transformer"]
    if "Dense" in kinds and (after[:1] != ["Pooling"]
                             or after[1:] not in (["Dense"] * (len(after) - 1), ["Dense"] * (len(after) - 2) + ["Normalize"])):
        raise ValueError(f"{folder / 'modules.json'}: Dense modules must follow Pooling (before Normalize), found {kinds}")
    if kinds.count("Transformer") != 1 or kinds[0] != "Transformer":
        raise ValueError(f"{folder / 'modules.json'}: expected one Transformer module first, found {kinds}")
    tpath = folder / modules[0].get("path", "")
    parts = load_hf(tpath)
    if parts.config.num_labels:
        raise ValueError(f"{tpath} holds a classification model; a sentence-transformers folder needs an encoder")
    mode = "mean"
    pooling_dir = folder / modules[kinds.index("Pooling")]["path"] if "Pooling" in kinds else None
    if pooling_dir is not None:
        mode = read_pooling(pooling_dir)
    parts.output_config = read_output_config(folder, pooling_dir)      # prompts, include_prompt, truncate_dim
    dense = [read_dense(folder / m["path"]) for m, k in zip(modules, kinds) if k == "Dense"]
    parts.pooler = Pooler(mode, normalize="Normalize" in kinds, dense=dense)
    for name in ("sentence_bert_config.json",):
        p = tpath / name
        if p.exists():
            msl = read_json(p).get("max_seq_length")
            if msl:
                parts.max_seq_length = min(int(msl), parts.config.max_tokens_per_sequence)
    parts.source, parts.format = str(folder), "sentence-transformers"
    return parts
