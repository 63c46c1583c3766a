"""Folders for the sparse and multi-vector tests, built offline from random weights, and FlagEmbedding's
BGEM3FlagModel made importable.

- SPLADE: sentence-transformers SparseEncoder(modules=[MLMTransformer(mlm folder), SpladePooling(...)])
  saved with .save(); the MLM folder is a tiny random BERT / XLM-R / DistilBERT *ForMaskedLM.
- bge-m3: a tiny random XLM-R with sparse_linear.pt and colbert_linear.pt beside its weights.
BERT-vocabulary folders take the built-in model's WordPiece tokenizer; XLM-R ones a sentencepiece model
trained here (tests/test_tokenize.train_spm) and saved by transformers' XLMRobertaTokenizer.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# texts drawn from the sentencepiece corpus's syllables (test_tokenize.train_spm), so XLM-R tokenizes them
TEXTS = ["kato mire su", "hazelu pa qi vo ya ce dru", "ka", "日本語 zedru schü kapa", "no ha ze " * 12,
         "mire tosu nopa lu", "qivo"]
FLAG_STUB = "transformers.modeling_attn_mask_utils"


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves LayerNorms at (1, 0) and biases at 0: perturb them so a swapped or dropped one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def xlmr_tokenizer(folder: Path):
    """A transformers XLMRobertaTokenizer over a sentencepiece model trained into `folder`."""
    from transformers import XLMRobertaTokenizer

    from tests.test_tokenize import train_spm

    train_spm(folder, "unigram", 200)
    return XLMRobertaTokenizer.from_pretrained(str(folder))


def mlm_folder(folder: Path, kind: str = "bert", seed: int = 0) -> Path:
    """A tiny random *ForMaskedLM folder (kind: bert, xlm-roberta, distilbert) with its tokenizer."""
    import transformers

    from packformer.loading import builtin_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    if kind == "xlm-roberta":
        tok = xlmr_tokenizer(folder)
        cfg = transformers.XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=1,
                                            type_vocab_size=1, **TINY)
        cls = transformers.XLMRobertaForMaskedLM
    else:
        tok = transformers.BertTokenizerFast.from_pretrained(str(builtin_model_dir()))
        if kind == "bert":
            cfg, cls = transformers.BertConfig(max_position_embeddings=128, **TINY), transformers.BertForMaskedLM
        elif kind == "distilbert":
            cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
            cls = transformers.DistilBertForMaskedLM
        else:
            raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    perturb(model, seed)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def splade_folder(folder: Path, kind: str = "bert", pooling: str = "max", activation: str = "relu",
                  max_active_dims: int | None = None, seed: int = 0) -> Path:
    """A SparseEncoder (MLMTransformer + SpladePooling) saved by sentence-transformers."""
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling

    mlm = mlm_folder(folder.parent / f"{folder.name}_mlm", kind, seed)
    enc = SparseEncoder(modules=[MLMTransformer(str(mlm)), SpladePooling(pooling, activation)],
                        max_active_dims=max_active_dims)
    enc.save(str(folder))
    return folder


def bge_m3_folder(folder: Path, colbert_dim: int = 32, seed: int = 0) -> Path:
    """A bge-m3-shaped folder: a tiny random XLM-R, its tokenizer, sparse_linear.pt and colbert_linear.pt."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    tok = xlmr_tokenizer(folder)
    cfg = transformers.XLMRobertaConfig(vocab_size=len(tok), max_position_embeddings=130, pad_token_id=1,
                                        type_vocab_size=1, **TINY)
    torch.manual_seed(seed)
    model = transformers.XLMRobertaModel(cfg, add_pooling_layer=False).eval()
    perturb(model, seed)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    sparse = torch.nn.Linear(TINY["hidden_size"], 1)
    with torch.no_grad():
        sparse.weight.mul_(3.0)                # spread the token weights: some relu to 0, others well above
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    torch.save(torch.nn.Linear(TINY["hidden_size"], colbert_dim).state_dict(), folder / "colbert_linear.pt")
    return folder


def _placeholder(name: str):
    def fail(*args, **kwargs):
        raise RuntimeError(f"{FLAG_STUB}.{name} is a test stub (transformers 5 removed the module)")
    return type(name, (), {"__init__": fail, "__call__": fail})


def bgem3_flag_model():
    """FlagEmbedding's BGEM3FlagModel class. FlagEmbedding's package root imports its decoder-only
    rerankers, which import transformers.modeling_attn_mask_utils, removed in transformers 5; BGEM3FlagModel
    never uses it, so a stub module stands in (each name it is asked for is a placeholder that fails if used)."""
    try:
        import transformers.modeling_attn_mask_utils  # noqa: F401
    except ImportError:
        stub = types.ModuleType(FLAG_STUB)
        stub.__getattr__ = _placeholder            # PEP 562: whatever names the rerankers import
        sys.modules[FLAG_STUB] = stub
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel
