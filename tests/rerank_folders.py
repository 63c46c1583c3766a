"""Cross-encoder folders for the rerank tests, built offline from random weights: a tiny BERT (the built-in
model's WordPiece tokenizer) and a tiny XLM-R (a sentencepiece model trained here), saved the way each
sentence-transformers generation saved a CrossEncoder:

- "st6": CrossEncoder.save_pretrained (config_sentence_transformers.json + modules.json),
- "st4": a Hugging Face folder with config.json "sentence_transformers": {"activation_fn": ...} (ST 4/5),
- "st3": config.json "sbert_ce_default_activation_function" (ST < 4),
- "hf": a plain *ForSequenceClassification folder with one label.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

MAX_LENGTH = 48          # tokens per pair: short, so the tests exercise truncation
SIGMOID = "torch.nn.modules.activation.Sigmoid"
IDENTITY = "torch.nn.modules.linear.Identity"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Untrained heads give near-equal scores: spread them so rankings and activations are exercised,
    and perturb LayerNorms so a swapped weight shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() == 2 and ("classifier" in n or "pooler" in n):
                p.mul_(20.0)


def bert_hf(folder: Path, num_labels: int = 1, seed: int = 0) -> Path:
    """A tiny random BertForSequenceClassification with the built-in model's tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification

    from packformer.loading import builtin_model_dir

    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=512, num_labels=num_labels)
    torch.manual_seed(seed)
    m = BertForSequenceClassification(cfg).eval()
    _perturb(m, seed)
    m.save_pretrained(folder)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(builtin_model_dir() / name, folder / name)
    _set_json(folder / "tokenizer_config.json", model_max_length=MAX_LENGTH)
    return folder


def xlmr_hf(folder: Path, spm_file: Path, seed: int = 0) -> Path:
    """A tiny random XLMRobertaForSequenceClassification (one label) with a tokenizer.json converted from
    `spm_file`; the sentencepiece file is kept too (sentencepiece.bpe.model)."""
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification, XLMRobertaTokenizer

    tok = XLMRobertaTokenizer.from_pretrained(str(spm_file.parent))
    tok.model_max_length = MAX_LENGTH
    tok.save_pretrained(folder)
    shutil.copy(spm_file, folder / "sentencepiece.bpe.model")
    cfg = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=MAX_LENGTH + 2, num_labels=1,
                           type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    m = XLMRobertaForSequenceClassification(cfg).eval()
    _perturb(m, seed)
    m.save_pretrained(folder)
    return folder


def save_as(hf_folder: Path, out: Path, fmt: str, activation: str | None = None) -> Path:
    """The model of `hf_folder` written as a cross-encoder folder of format `fmt` (see the module doc)."""
    if fmt == "st6":
        from sentence_transformers import CrossEncoder

        act = None
        if activation is not None:
            from sentence_transformers.util import import_from_string
            act = import_from_string(activation)()
        CrossEncoder(str(hf_folder), activation_fn=act, device="cpu").save_pretrained(str(out))
        return out
    shutil.copytree(hf_folder, out)
    if fmt == "st4":
        _set_json(out / "config.json", sentence_transformers={"activation_fn": activation or SIGMOID,
                                                              "version": "4.1.0"})
    elif fmt == "st3":
        _set_json(out / "config.json", sbert_ce_default_activation_function=activation or SIGMOID)
    elif fmt != "hf":
        raise ValueError(f"unknown cross-encoder folder format {fmt!r}")
    return out


def _set_json(path: Path, **items) -> None:
    d = json.loads(path.read_text())
    d.update(items)
    path.write_text(json.dumps(d, indent=2))


def bert_cross_encoder(folder: Path, fmt: str = "st6", activation: str | None = None, num_labels: int = 1) -> Path:
    """A tiny BERT cross-encoder in `folder` (built in `folder`.parent)."""
    hf = bert_hf(folder.parent / f"{folder.name}-hf", num_labels=num_labels)
    return save_as(hf, folder, fmt, activation)


# query / document texts over the sentencepiece model's syllables (tests/test_tokenize.train_spm), so both
# tokenizers see known pieces; some are long enough to be truncated at MAX_LENGTH
QUERIES = ["kato mire", "sudo haze", "ka", "zedru schü 日本語 kapa " * 6]
DOCUMENTS = ["kato mire sulu", "haze vo ya ce", "", "dru sch pa " * 20, "mi re su no ha ze lu pa qi", "ka",
             "to mi re su no " * 8, "日本語"]
