"""`Model`: a loaded encoder with its tokenizer, pooling and head, on a device and dtype.

Text goes: tokenizer -> id lists -> length-sorted chunks under `max_batch_tokens` -> PackedBatch ->
encoder [T, H] -> pooling / head in fp32 -> results scattered back to input order.

Models with task adapters (Jina v3, lora.py) run each task through its own runner, built over a merged copy
of the weights on the task's first use and kept; `task` (at load: the default; per call: an override)
also prepends the task's instruction to every text. No task: the base weights, no instruction.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .batch import PackedBatch, pack, pack_padded_ids, pad_input
from .fast import describe_runner, select_runner
from . import outputs
from .loaders.parts import ModelParts
from .ops.attention import AttentionMeta
from .pipeline import RunStats, run_texts   # tokenization of the next chunk overlaps the model's work
from .runtime import DEFAULT_MAX_BATCH_TOKENS, is_fp8, resolve_device
from .tokenize import check_texts

log = logging.getLogger(__name__)


class _TaskView:
    """What select_runner reads of a Model (device, dtype, options), with a task's merged encoder."""

    def __init__(self, model: "Model", encoder: nn.Module):
        self._model, self.encoder = model, encoder

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class Model(nn.Module):
    def __init__(self, parts: ModelParts, device: str | torch.device | None = "cpu",
                 dtype: str | torch.dtype | None = None, max_batch_tokens: int | None = None,
                 fast: bool | None = None, quantize: str | None = None, threads: int | None = None,
                 task: str | None = None, truncate_dim: int | None = None, force_fp8: bool = False):
        super().__init__()
        if fast not in (None, True, False):
            raise TypeError(f"fast must be True, False or None (the device's default), got {fast!r}")
        self.device_ = resolve_device(device)
        # dtype="float8": e4m3 GEMMs on the CUDA fast path, everything else in the family's half dtype
        self.fp8 = is_fp8(dtype)
        if self.fp8:
            from .fast.fp8 import check_device
            check_device(self.device_, fast)
            dtype = None
        from .families import model_dtype         # dtype None: fp32 on CPU, the family's gpu_dtype on CUDA
        self.dtype = model_dtype(parts.config, self.device_, dtype)
        self.config = parts.config
        self.encoder = parts.encoder.to(self.device_, self.dtype).eval()
        # pooling and heads stay fp32: they are tiny and fp32 keeps classification argmax stable
        self.head = parts.head.to(self.device_, torch.float32).eval() if parts.head is not None else None
        self.pooler = parts.pooler.to(self.device_, torch.float32)   # fp32 too (its Dense layers, if any)
        from .multivector import place_outputs      # sparse / multi-vector heads (SPLADE, bge-m3), if any
        self.outputs = place_outputs(getattr(parts, "outputs", None), self.device_, self.dtype)
        self.tokenizer = parts.tokenizer
        self.max_seq_length = parts.max_seq_length
        self.source, self.format = parts.source, parts.format
        # the default budget grows to one sequence of the model's maximum length (8,192-token ModernBERT on CPU)
        self.max_batch_tokens = max_batch_tokens if max_batch_tokens is not None else max(
            DEFAULT_MAX_BATCH_TOKENS[self.device_.type], self.max_seq_length)      # 0 is refused below, not the default
        # The function that runs the encoder on a packed batch already on the device. Fast paths
        # (packformer.fast.cuda / packformer.fast.cpu) replace it; the reference `self.encoder` stays.
        self.fast = fast is not False
        # CPU fast-path options (packformer.fast.cpu reads them): int8 Linear layers, intra-op threads
        self.quantize, self.threads = quantize, threads
        if quantize is not None and (fast is False or self.device_.type != "cpu"):
            raise ValueError(f"quantize={quantize!r} is an option of the CPU fast path; it needs device='cpu' "
                             "and fast left on")
        self.adapters = getattr(self.config, "adapters", None)
        self._fast_arg = fast
        self._task_runners: dict[str, tuple[nn.Module, Any]] = {}     # task -> (merged encoder, runner)
        self._task_lock = threading.Lock()
        # Launches are serialized, so threads may share a model (embed-dataset runs several shards per
        # replica at once): each thread's tokenization and host work overlaps the others' device work.
        self._launch_lock = threading.Lock()
        self.task: str | None = None
        self.task = self.resolve_task(task)
        # sentence-transformers' prompts and Matryoshka default (outputs.py); the folder's, else none
        oc = parts.output_config
        self.prompts, self.default_prompt_name = oc.prompts, oc.default_prompt_name
        self.include_prompt = oc.include_prompt
        self.truncate_dim = outputs.check_truncate_dim(oc.truncate_dim if truncate_dim is None else truncate_dim,
                                                       self.dim)
        if self.task is None:
            self.runner = select_runner(self, fast)
            if self.adapters is not None:
                log.info("%s has task adapters (%s) and runs its base weights: pass task=... for one",
                         self.source, ", ".join(self.adapters.tasks))
        else:   # the default task's runner; the base weights get none (no call can ask for them)
            self.runner = self.runner_for(self.task)
        if self.max_batch_tokens < self.max_seq_length:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must hold at least one sequence of the "
                             f"model's maximum length ({self.max_seq_length})")
        self.fp8_report: dict | None = None
        if self.fp8:        # fp8 vs fp16/bf16 on a fixed calibration set; refused below the threshold
            from .fast.fp8 import guard, release_half_weights
            self.fp8_report = guard(self, force=force_fp8)
            if self.adapters is None:   # (another task's adapter is merged into the base weights later)
                self.fp8_report["released_half_weight_bytes"] = release_half_weights(self.runner)

    # ---- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.device_

    @property
    def dim(self) -> int:
        """The embedding size: the hidden size, or the last Dense layer's output (sentence-transformers)."""
        return getattr(self.pooler, "out_features", None) or self.config.hidden_size

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task adapters this model has (empty for models without)."""
        return self.adapters.tasks if self.adapters is not None else ()

    @property
    def num_labels(self) -> int:
        return self.config.num_labels

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id if self.tokenizer is not None else self.config.pad_token_id

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "source": self.source, "format": self.format, "model_type": c.model_type, "family": c.family,
            "architecture": c.architecture(),
            "layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_heads, "ffn": c.intermediate_size,
            "vocab": c.vocab_size, "parameters": sum(p.numel() for p in self.parameters()),
            "memory_bytes": self.weight_bytes(),
            "dim": self.dim, "max_seq_length": self.max_seq_length, "pooling": self.pooler.mode,
            "normalize": self.pooler.normalize, "num_labels": c.num_labels, "labels": c.labels(),
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "gemm_dtype": "float8_e4m3fn" if self.fp8 else str(self.dtype).replace("torch.", ""),
            "fp8_accuracy": self.fp8_report,
            "max_batch_tokens": self.max_batch_tokens,
            "runner": describe_runner(self.runner, self.task_encoder(self.task)),
            "tasks": list(self.tasks), "task": self.task,
            "prompts": dict(self.prompts), "default_prompt_name": self.default_prompt_name,
            "include_prompt": self.include_prompt, "truncate_dim": self.truncate_dim,
        }

    def weight_bytes(self) -> int:
        """Bytes of the weights as loaded (parameters and buffers, each storage once: tied weights count once),
        in their dtype: the encoder's (fp32 / fp16 / bf16), fp32 heads; with fp8, the e4m3 GEMM weights and
        their scales in place of the half-precision ones released after the load-time check."""
        seen, total = set(), 0
        for t in (*self.parameters(), *self.buffers()):
            if t.device.type == "meta":          # released (fp8: the e4m3 copies are counted below)
                continue
            key = (t.untyped_storage().data_ptr(), t.device) if t.numel() else id(t)
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes() if t.numel() else 0
        if self.fp8:
            from .fast.fp8 import fp8_weight_bytes
            total += fp8_weight_bytes(self.runner)
        return total

    # ---- tasks ------------------------------------------------------------------------------
    def resolve_task(self, task: str | None) -> str | None:
        """`task` checked against the model's adapters; None gives the model's default task (None: base
        weights). ValueError naming the model's tasks for an unknown one, or for any task on a model
        without adapters."""
        if task is None:
            return self.task
        if self.adapters is None:
            raise ValueError(f"model {self.source} has no task adapters, so it takes no task (got {task!r}); "
                             "tasks are LoRA adapters of models such as jina-embeddings-v3")
        self.adapters.index(task)              # raises, listing the tasks
        return task

    def instruction(self, task: str | None = None) -> str:
        """The text prepended to every input of `task` (the default task if None): "" for most tasks."""
        task = self.resolve_task(task)
        return self.adapters.instruction(task) if self.adapters is not None else ""

    def task_encoder(self, task: str | None) -> nn.Module:
        """The encoder a task runs: the base one for None, else its merged copy (built with its runner)."""
        if task is None:
            return self.encoder
        return self._task_entry(task)[0]

    def runner_for(self, task: str | None = None):
        """The runner of `task` (the default task if None), built on first use: the task's adapter merged
        into a copy of the weights (lora.merged_encoder), then the same path selection as at load."""
        task = self.resolve_task(task)
        if task is None:
            return self.runner
        return self._task_entry(task)[1]

    def _task_entry(self, task: str) -> tuple[nn.Module, Any]:
        entry = self._task_runners.get(task)
        if entry is None:
            with self._task_lock:       # the server's worker and an encode() call may both ask first
                entry = self._task_runners.get(task)
                if entry is None:
                    from .lora import merged_encoder

                    # built as at load (outside inference mode), though first asked for inside a forward
                    with torch.inference_mode(False), torch.no_grad():
                        enc = merged_encoder(self.encoder, self.resolve_task(task))
                        entry = (enc, select_runner(_TaskView(self, enc), self._fast_arg))
                    self._task_runners[task] = entry
        return entry

    # ---- tokenization -----------------------------------------------------------------------
    def _require_tokenizer(self):
        if self.tokenizer is None:
            hint = ("pass spm='sentencepiece.bpe.model' to load() (--spm on the command line)"
                    if self.format == "torchtext" else
                    "load a folder with tokenizer.json / vocab.txt / sentencepiece.bpe.model")
            raise RuntimeError(f"model {self.source} has no tokenizer: pass token ids, or {hint}")
        return self.tokenizer

    def text_prefix(self, task: str | None = None, prompt: str | None = None, prompt_name: str | None = None) -> str:
        """The text put before every input: the prompt (`prompt`, else `prompt_name`'s, else the default
        prompt: SentenceTransformer.encode's rules), else `task`'s instruction (the default task's if None).
        A prompt replaces the instruction: both are the text a model was trained to see first."""
        p = outputs.resolve_prompt(outputs.OutputConfig(self.prompts, self.default_prompt_name), prompt, prompt_name)
        return p if p is not None else self.instruction(task)

    def pool_skip(self, prefix: str) -> int:
        """Leading tokens left out of pooling for inputs starting with `prefix`: the prompt's (as ST counts
        them) when the Pooling module says include_prompt=False, else 0."""
        if self.include_prompt or not prefix:
            return 0
        return outputs.prompt_length(self._require_tokenizer(), prefix, self.max_seq_length)

    def with_instruction(self, texts: Sequence[str], task: str | None = None, prompt: str | None = None,
                         prompt_name: str | None = None) -> list[str]:
        """The texts as the model reads them: text_prefix(task, prompt, prompt_name) first."""
        texts = check_texts(texts)
        prefix = self.text_prefix(task, prompt, prompt_name)
        return [prefix + t for t in texts] if prefix else texts

    def token_ids(self, texts: Sequence[str], truncate: bool = True, task: str | None = None,
                  prompt: str | None = None, prompt_name: str | None = None) -> list[list[int]]:
        """Token ids (special tokens included, truncated to max_seq_length unless truncate=False), of the
        texts with their prefix (text_prefix: the prompt, else `task`'s instruction) prepended."""
        return self._require_tokenizer().encode(self.with_instruction(texts, task, prompt, prompt_name),
                                                self.max_seq_length, truncate)

    def tokenize(self, texts: Sequence[str], truncate: bool = True, task: str | None = None,
                 prompt: str | None = None, prompt_name: str | None = None) -> PackedBatch:
        ids = self.token_ids(texts, truncate, task, prompt, prompt_name)
        return pack(ids, self.config.position_offset, order=range(len(ids)))

    def pack_ids(self, ids: Sequence[Sequence[int]]) -> PackedBatch:
        """Packed batch from pre-tokenized id lists (or integer arrays / tensors); ids are checked to be
        integers (a float would be cut to one without a word) inside the vocabulary."""
        for i, seq in enumerate(ids):
            if len(seq) > self.max_seq_length:
                raise ValueError(f"input {i} has {len(seq)} tokens, more than the model's maximum of "
                                 f"{self.max_seq_length}")
            a = np.asarray(seq.cpu() if isinstance(seq, torch.Tensor) else seq)
            if a.size and a.dtype.kind not in "iu":
                raise TypeError(f"input {i} has token ids of type {a.dtype}, expected integers: {a.ravel()[:5].tolist()}")
            bad = a[(a < 0) | (a >= self.config.vocab_size)]
            if bad.size:
                raise ValueError(f"input {i} has token ids outside the vocabulary [0, {self.config.vocab_size}): "
                                 f"{bad[:5].tolist()}")
        return pack(ids, self.config.position_offset, order=range(len(ids)))

    # ---- the packed core --------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, batch: PackedBatch, task: str | None = None) -> torch.Tensor:
        """PackedBatch (any device) -> hidden states [T, H] on the model's device and dtype, with `task`'s
        adapter (the default task's if None). Ids are taken as given: no instruction is added here."""
        runner = self.runner if task is None else self.runner_for(task)
        seqlens = np.diff(batch.cu_seqlens.numpy()).tolist() if batch.device.type == "cpu" else None
        with self._launch_lock:
            if seqlens is not None and self.device.type != "cpu" and hasattr(runner, "run_host"):
                return runner.run_host(batch, seqlens)      # CUDA graphs: host rows go straight to the graph
            if batch.device != self.device:
                batch = batch.to(self.device, non_blocking=True)
            meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, seqlens)
            return runner(batch, meta)

    @torch.inference_mode()
    def embed_batch(self, batch: PackedBatch, normalize: bool | None = None, task: str | None = None,
                    skip: int = 0) -> torch.Tensor:
        """PackedBatch -> pooled embeddings [B, D], fp32, in the batch's own order; each sequence's first
        `skip` tokens (a prompt, pool_skip) are left out of pooling."""
        h = self.hidden_states(batch, task)
        h, cu = outputs.drop_prompt(h, batch.cu_seqlens.to(h.device, non_blocking=True), skip, self.pooler.mode)
        return self.pooler(h, cu, normalize=normalize)

    @torch.inference_mode()
    def classify_batch(self, batch: PackedBatch) -> torch.Tensor:
        """PackedBatch -> logits [B, C], fp32."""
        if self.head is None:
            raise RuntimeError(f"model {self.source} has no classification head; use encode()")
        h = self.hidden_states(batch)
        return self.head(h, batch.cu_seqlens.to(h.device, non_blocking=True))

    # ---- user API ---------------------------------------------------------------------------
    def encode(self, texts: str | Sequence[str], batch_size: int | None = None,
               normalize_embeddings: bool | None = None, convert_to_numpy: bool = True,
               show_progress_bar: bool | None = None, truncate: bool = True,
               convert_to_tensor: bool = False, task: str | None = None,
               output_value: str = "sentence_embedding", convert_to_sparse_tensor: bool = True,
               max_active_dims: int | None = None, prompt_name: str | None = None, prompt: str | None = None,
               truncate_dim: int | None = None, precision: str = "float32", ranges: np.ndarray | None = None,
               calibration_embeddings: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        """Texts -> embeddings [N, D] in input order (a single str gives [D]).

        normalize_embeddings=None follows the model folder (a Normalize module); batch_size caps the
        sequences per batch on top of the token budget. `task` (models with adapters): the task's adapter
        and instruction, instead of the default task given at load.
        output_value="token_embeddings": one [Li, H] array per text (multivector.encode_tokens). SPLADE
        models give sparse vectors (sparse.encode_sparse: convert_to_sparse_tensor, max_active_dims).
        prompt / prompt_name: the text put before every input (text_prefix; the folder's default prompt if
        neither). truncate_dim (default: the model's): keep the leading dimensions, normalized again
        where the embeddings are normalized (the folder's Normalize, or normalize_embeddings=True). precision: int8 / uint8 /
        binary / ubinary as sentence-transformers quantizes (int8 ranges from `ranges`, else
        `calibration_embeddings`, else this call's own embeddings). All as SentenceTransformer.encode (outputs.py).
        """
        if output_value != "sentence_embedding" or "splade" in self.outputs or max_active_dims is not None:
            if truncate_dim is not None or precision != "float32":
                raise ValueError("truncate_dim and precision apply to dense sentence embeddings, not to "
                                 f"{'token embeddings' if output_value == 'token_embeddings' else 'sparse vectors'}")
            from .multivector import encode_output
            return encode_output(self, texts, output_value, batch_size=batch_size,
                                 normalize_embeddings=normalize_embeddings, convert_to_numpy=convert_to_numpy,
                                 convert_to_tensor=convert_to_tensor, truncate=truncate,
                                 show_progress_bar=show_progress_bar, task=task,
                                 convert_to_sparse_tensor=convert_to_sparse_tensor, max_active_dims=max_active_dims,
                                 prompt=prompt, prompt_name=prompt_name)
        single = isinstance(texts, str)
        precision = outputs.check_precision(precision)
        truncate_dim = outputs.check_truncate_dim(self.truncate_dim if truncate_dim is None else truncate_dim, self.dim)
        out = self.embed_texts(texts, normalize_embeddings, truncate, task, prompt, prompt_name,
                               batch_size=batch_size, show_progress_bar=show_progress_bar)
        # a cut vector of a normalizing model is renormalized (Matryoshka: cosine-ready, as
        # SentenceTransformer.encode(truncate_dim=..., normalize_embeddings=True) gives it)
        renorm = truncate_dim is not None and (normalize_embeddings if normalize_embeddings is not None
                                               else self.pooler.normalize)
        out = outputs.apply(out, truncate_dim, renorm, precision, ranges, calibration_embeddings)  # [N, D']
        if single:
            out = out[0]
        if isinstance(out, np.ndarray):
            return torch.from_numpy(out) if convert_to_tensor else out
        return out if (convert_to_tensor or not convert_to_numpy) else out.numpy()

    def embed_texts(self, texts: str | Sequence[str], normalize: bool | None = None, truncate: bool = True,
                    task: str | None = None, prompt: str | None = None, prompt_name: str | None = None, *,
                    batch_size: int | None = None, show_progress_bar: bool | None = None,
                    stats: RunStats | None = None) -> torch.Tensor:
        """Texts -> pooled embeddings [N, D] fp32 on the host, in input order: the core of encode() (its
        prompt, adapter and pooling), without encode's output options. `stats` (pipeline.RunStats) is
        filled in with the tokens run and the time the device waited for the tokenizer."""
        task = self.resolve_task(task)
        prefix = self.text_prefix(task, prompt, prompt_name)
        skip = self.pool_skip(prefix)
        texts = self.with_instruction(texts, prompt=prefix)
        return run_texts(self, texts, lambda b: self.embed_batch(b, normalize, task, skip), self.dim,
                         batch_size=batch_size, truncate=truncate, show_progress_bar=show_progress_bar, stats=stats)

    def encode_sparse(self, texts: str | Sequence[str], **kwargs):
        """Texts -> sparse vectors (SPLADE, or bge-m3's lexical weights): packformer.sparse.encode_sparse."""
        from .sparse import encode_sparse
        return encode_sparse(self, texts, **kwargs)

    def encode_all(self, texts: str | Sequence[str], **kwargs):
        """bge-m3: dense, sparse and ColBERT outputs of one forward: packformer.multivector.encode_all."""
        from .multivector import encode_all
        return encode_all(self, texts, **kwargs)

    def decode(self, vectors, top_k: int | None = None):
        """Sparse vector(s) -> [(token, weight)] by descending weight, as SparseEncoder.decode."""
        from .sparse import decode
        return decode(self, vectors, top_k)

    def classify(self, texts: str | Sequence[str], batch_size: int | None = None, truncate: bool = True,
                 show_progress_bar: bool | None = None) -> np.ndarray:
        """Texts -> logits [N, num_labels] (numpy, fp32) in input order."""
        if self.head is None:
            raise RuntimeError(f"model {self.source} has no classification head; use encode()")
        return run_texts(self, check_texts(texts), self.classify_batch, self.num_labels, batch_size=batch_size,
                         truncate=truncate, show_progress_bar=show_progress_bar).numpy()

    @torch.inference_mode()
    def forward(self, token_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The tutorial's drop-in: right-padded ids [B, L] (pad id = the tokenizer's) -> logits [B, C]
        with a head, else hidden states [B, L, H] (zeros at padded positions). Unpadded once, padded once."""
        if token_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
        b, l = token_ids.shape if token_ids.dim() == 2 else (None, None)
        if l is not None and l > self.config.max_tokens_per_sequence:
            raise ValueError(f"token_ids has {l} positions, more than the model's maximum of "
                             f"{self.config.max_tokens_per_sequence}")
        batch, indices = pack_padded_ids(token_ids.cpu(), self.pad_id, self.config.position_offset,
                                         None if token_type_ids is None else token_type_ids.cpu())
        if self.head is not None:
            return self.classify_batch(batch).to(token_ids.device)
        h = self.hidden_states(batch)
        return pad_input(h, indices.to(h.device), b, l).to(token_ids.device)
