"""bge-m3 folders: an XLM-R encoder with sparse_linear.pt (Linear(H, 1)) and colbert_linear.pt
(Linear(H, D)) beside its weights, as FlagEmbedding's BGEM3FlagModel reads them.

Three outputs of one forward: dense (CLS pooling, normalized), lexical weights (sparse.LexicalHead) and
ColBERT vectors (multivector.ColbertHead).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..files import read_json
from ..heads import Pooler
from ..multivector import ColbertHead
from ..sparse import LexicalHead
from .hf import load_hf
from .keymap import CheckpointError
from .parts import ModelParts

SPARSE_FILE, COLBERT_FILE = "sparse_linear.pt", "colbert_linear.pt"
# the special tokens FlagEmbedding leaves out of the lexical weights, and XLM-R's spelling of them
SKIPPED_SPECIALS = {"cls_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def is_bge_m3_folder(folder: Path) -> bool:
    return (folder / SPARSE_FILE).exists() and (folder / COLBERT_FILE).exists() and (folder / "config.json").exists()


def _linear(path: Path, hidden: int, out: int | None) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or set(state) != {"weight", "bias"}:
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: expected a Linear state dict with 'weight' and 'bias', found {found}")
    w, b = state["weight"], state["bias"]
    if w.dim() != 2 or w.shape[1] != hidden or (out is not None and w.shape[0] != out) or b.shape != w.shape[:1]:
        raise CheckpointError(f"{path}: expected weight [{out or 'D'}, {hidden}] and bias [{out or 'D'}], found "
                              f"{tuple(w.shape)} and {tuple(b.shape)}")
    return {"weight": w.float(), "bias": b.float()}


def special_ids(folder: Path, tokenizer) -> list[int]:
    """Ids of the tokenizer's cls, eos, pad and unk tokens (as named in the folder's tokenizer files)."""
    names = dict(SKIPPED_SPECIALS)
    for f in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / f
        if p.exists():
            d = read_json(p)
            for k in names:
                v = d.get(k)
                v = v.get("content") if isinstance(v, dict) else v
                if isinstance(v, str):
                    names[k] = v
    rust = getattr(tokenizer, "tok", None)
    if rust is not None:
        ids = [rust.token_to_id(t) for t in names.values()]
        return [i for i in ids if i is not None]
    return [tokenizer.BOS, tokenizer.EOS, tokenizer.PAD, tokenizer.UNK]    # fairseq sentencepiece ids


def load_bge_m3(folder: str | Path) -> ModelParts:
    folder = Path(folder)
    parts = load_hf(folder)
    cfg = parts.config
    if parts.tokenizer is None:
        raise ValueError(f"{folder}: a bge-m3 folder needs its tokenizer (tokenizer.json or sentencepiece.bpe.model) "
                         "to know which tokens are special")
    h = cfg.hidden_size
    sparse_state = _linear(folder / SPARSE_FILE, h, 1)
    colbert_state = _linear(folder / COLBERT_FILE, h, None)
    lexical = LexicalHead(h, cfg.vocab_size, special_ids(folder, parts.tokenizer))
    lexical.linear.load_state_dict(sparse_state)
    colbert = ColbertHead(h, colbert_state["weight"].shape[0])
    colbert.linear.load_state_dict(colbert_state)
    parts.outputs = {"lexical": lexical, "colbert": colbert}
    parts.pooler = Pooler("cls", normalize=True)
    stc = folder / "sentence_bert_config.json"
    msl = read_json(stc).get("max_seq_length") if stc.exists() else None
    if msl:
        parts.max_seq_length = min(int(msl), cfg.max_tokens_per_sequence)
    parts.source, parts.format = str(folder), "bge-m3"
    return parts
