"""sentence-transformers SparseEncoder folders (SPLADE): an MLM transformer + SpladePooling.

modules.json holds MLMTransformer (or, since sentence-transformers 5.4, Transformer with
transformer_task "fill-mask") and SpladePooling; the encoder loads as any Hugging Face folder, and the
masked-LM head (ignored by the encoder's key map) is read here from the same checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..families.base import hf_activation
from ..files import read_json
from ..sparse import MLMHead, SpladeHead, check_max_active_dims
from .hf import load_hf, read_state_dict
from .keymap import CheckpointError, rename_legacy_layernorm
from .parts import ModelParts

# config.json model_type -> (dense, LayerNorm, decoder weight, decoder bias candidates, act key or fixed act)
MLM_KEYS = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm",
             "cls.predictions.decoder.weight", ("cls.predictions.bias", "cls.predictions.decoder.bias"),
             ("hidden_act", None)),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.decoder.weight",
                ("lm_head.bias", "lm_head.decoder.bias"), (None, "gelu")),
    "distilbert": ("vocab_transform", "vocab_layer_norm", "vocab_projector.weight", ("vocab_projector.bias",),
                   ("activation", None)),
}
MLM_KEYS["xlm-roberta"] = MLM_KEYS["camembert"] = MLM_KEYS["roberta"]
WORD_EMBEDDINGS = ("embeddings.word_embeddings.weight",)
SPARSE_MODULES = ("MLMTransformer", "SpladePooling", "SparseStaticEmbedding", "SparseAutoEncoder", "Router", "Asym")


def _kind(m: dict) -> str:
    return m.get("type", "").rsplit(".", 1)[-1]


def is_sparse_encoder(folder: Path, modules: list[dict]) -> bool:
    """A SparseEncoder folder: config_sentence_transformers.json says so, or a module only sparse models use."""
    cfg = folder / "config_sentence_transformers.json"
    if cfg.exists() and read_json(cfg).get("model_type") == "SparseEncoder":
        return True
    return any(_kind(m) in SPARSE_MODULES for m in modules)


def load_mlm_head(folder: Path) -> MLMHead:
    """The masked-LM head of a BERT / RoBERTa / XLM-R / DistilBERT *ForMaskedLM folder; the decoder takes
    the word embeddings where the checkpoint ties them (no decoder weight saved)."""
    d = read_json(folder / "config.json")
    mt = d.get("model_type")
    if mt not in MLM_KEYS:
        raise ValueError(f"{folder}: SPLADE needs a masked-LM head packformer knows ({', '.join(sorted(MLM_KEYS))}); "
                         f"model_type is {mt!r}")
    dense, norm, dec_w, dec_b, (act_key, act_fixed) = MLM_KEYS[mt]
    state = rename_legacy_layernorm(read_state_dict(folder))
    need = [f"{dense}.weight", f"{dense}.bias", f"{norm}.weight", f"{norm}.bias"]
    missing = [k for k in need if k not in state]
    if missing:
        raise CheckpointError(f"{folder} has no masked-LM head ({mt}): missing {', '.join(missing)}; SPLADE needs a "
                              "*ForMaskedLM checkpoint")
    weight = state.get(dec_w)
    if weight is None:
        tied = [k for k in state if k.endswith(WORD_EMBEDDINGS[0])]
        if not tied or d.get("tie_word_embeddings", True) is False:
            raise CheckpointError(f"{folder}: the masked-LM decoder weight {dec_w} is missing and not tied to the "
                                  "word embeddings")
        weight = state[tied[0]]
    bias_key = next((k for k in dec_b if k in state), None)
    bias = state[bias_key] if bias_key is not None else torch.zeros(weight.shape[0])
    act = act_fixed or hf_activation(d.get(act_key, "gelu"), key=act_key)
    eps = 1e-12 if mt == "distilbert" else d.get("layer_norm_eps", 1e-12 if mt == "bert" else 1e-5)
    head = MLMHead(weight.shape[1], weight.shape[0], act=act, eps=eps)
    head.load_state_dict({"dense.weight": state[f"{dense}.weight"], "dense.bias": state[f"{dense}.bias"],
                          "norm.weight": state[f"{norm}.weight"], "norm.bias": state[f"{norm}.bias"],
                          "decoder.weight": weight, "decoder.bias": bias})
    return head.float()


def load_sparse_encoder(folder: str | Path) -> ModelParts:
    folder = Path(folder)
    modules = read_json(folder / "modules.json")
    kinds = [_kind(m) for m in modules]
    stack = " + ".join(kinds)
    if len(modules) != 2 or kinds[1] != "SpladePooling" or kinds[0] not in ("MLMTransformer", "Transformer"):
        raise ValueError(f"{folder / 'modules.json'}: packformer runs SparseEncoder folders of MLMTransformer + "
                         f"SpladePooling (SPLADE); this one holds {stack}")
    tpath = folder / modules[0].get("path", "")
    st_cfg_path = tpath / "sentence_bert_config.json"
    st_cfg = read_json(st_cfg_path) if st_cfg_path.exists() else {}
    if kinds[0] == "Transformer" and st_cfg.get("transformer_task", "fill-mask") != "fill-mask":
        raise ValueError(f"{st_cfg_path}: SPLADE needs a fill-mask Transformer, found transformer_task "
                         f"{st_cfg.get('transformer_task')!r}")
    pool_cfg = read_json(folder / modules[1]["path"] / "config.json")
    top = folder / "config_sentence_transformers.json"
    max_active = read_json(top).get("max_active_dims") if top.exists() else None
    check_max_active_dims(max_active)
    parts = load_hf(tpath)
    if parts.config.num_labels:
        raise ValueError(f"{tpath} holds a classification model; SPLADE needs a masked-LM checkpoint")
    mlm = load_mlm_head(tpath)
    if mlm.decoder.out_features != parts.config.vocab_size:
        raise CheckpointError(f"{tpath}: the masked-LM decoder has {mlm.decoder.out_features} rows, the vocabulary "
                              f"{parts.config.vocab_size}")
    parts.outputs = {"splade": SpladeHead(mlm, pool_cfg.get("pooling_strategy", "max"),
                                          pool_cfg.get("activation_function", "relu"), max_active)}
    msl = st_cfg.get("max_seq_length")
    if msl:
        parts.max_seq_length = min(int(msl), parts.config.max_tokens_per_sequence)
    parts.source, parts.format = str(folder), "sparse-encoder"
    return parts
