"""Hugging Face model folders of every family packformer knows (families/: BERT, RoBERTa, XLM-R,
MPNet, ...) and their *ForSequenceClassification heads: config.json's model_type picks the family."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import EncoderConfig
from ..families import family_of
from ..families.bert import BERT_LIKE, ROBERTA_LIKE, hf_keymap
from ..files import ModelFileError, read_json, read_safetensors
from ..heads import Pooler
from ..model import Encoder
from ..tokenize import HFTokenizer, SentencePieceTokenizer
from .keymap import CheckpointError, rename_legacy_layernorm, strip_prefix
from .parts import ModelParts, assemble

log = logging.getLogger(__name__)


def config_from_hf(d: dict) -> EncoderConfig:
    """config.json (as a dict) -> EncoderConfig, through the family its model_type names."""
    return family_of(d).config_from_hf(d)


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors (single or sharded), else pytorch_model.bin loaded with weights_only=True."""
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            state.update(read_safetensors(folder / shard))
        return state
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no weights in {folder}: expected model.safetensors, model.safetensors.index.json "
                            f"or pytorch_model.bin; found {sorted(p.name for p in folder.iterdir())}")


def load_tokenizer(folder: Path, cfg: EncoderConfig):
    if (folder / "tokenizer.json").exists() or (folder / "vocab.txt").exists():
        lower = True
        tc = folder / "tokenizer_config.json"
        if tc.exists():
            lower = bool(read_json(tc).get("do_lower_case", True))
        return HFTokenizer.from_folder(folder, pad_id=cfg.pad_token_id, position_offset=cfg.position_offset,
                                       lowercase=lower)
    if (folder / "sentencepiece.bpe.model").exists():
        return SentencePieceTokenizer(folder / "sentencepiece.bpe.model")
    if (folder / "spm.model").exists():   # DeBERTa-v2/v3 folders as released: sentencepiece, no tokenizer.json
        log.warning("%s has spm.model but no tokenizer.json, which packformer reads: loaded without a tokenizer "
                    "(token ids only). Write tokenizer.json with transformers: "
                    "AutoTokenizer.from_pretrained(folder).save_pretrained(folder)", folder)
    return None


def load_hf(folder: str | Path, with_tokenizer: bool = True) -> ModelParts:
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{folder} is not a Hugging Face model folder: config.json is missing")
    d = read_json(cfg_path)
    family = family_of(d)
    try:
        cfg = family.config_from_hf(d)
    except KeyError as e:           # a field the family needs, absent
        raise ModelFileError(f"{cfg_path} lacks {e.args[0]!r}, which a {family.name} config needs") from None
    except (TypeError, ValueError) as e:
        raise ModelFileError(f"{cfg_path}: {e}") from None
    state = rename_legacy_layernorm(read_state_dict(folder))
    state, _ = strip_prefix(state, family.anchor)
    if cfg.type_vocab_size and "embeddings.token_type_embeddings.weight" not in state and family.name == "bert":
        cfg = cfg.replace(type_vocab_size=0)
    encoder, head = assemble(lambda: (Encoder(cfg), family.make_head(cfg)), family.keymap(cfg, bool(cfg.num_labels)),
                             state, cfg.num_layers, what=f"checkpoint {folder}")
    tok = load_tokenizer(folder, cfg) if with_tokenizer else None
    max_len = cfg.max_tokens_per_sequence
    mode, normalize = family.embedding_pooling(d) if family.embedding_pooling is not None else ("mean", False)
    return ModelParts(config=cfg, encoder=encoder, head=head, pooler=Pooler(mode, normalize=normalize),
                      tokenizer=tok, max_seq_length=max_len, source=str(folder), format="huggingface")


__all__ = ["load_hf", "config_from_hf", "hf_keymap", "read_state_dict", "CheckpointError"]
