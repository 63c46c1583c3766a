"""The peers: what a user would run instead of packformer, each built from the same weights.

Every peer is an `Engine` that turns one workload into one zero-argument call (timed by the bench)
and turns that call's raw output into something comparable with the fp32 reference: hidden states at
the real tokens [T, H] for token-id batches, pooled embeddings [N, D] for text workloads.

A peer whose package is missing is skipped with a line saying how to install it; a peer that does
not apply (wrong device, ids vs texts) is skipped with the reason. The embedding engines (Infinity,
FastEmbed) have modules of their own: peer_infinity.py, peer_fastembed.py, and peer_folders.py for the
model folder they load.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..batch import PackedBatch
from ..engine import Model
from ..loaders.parts import ModelParts
from . import convert
from .workloads import pad_ids


class NotApplicable(Exception):
    """This peer does not run this kind of workload (the message says why); it is skipped, not failed."""


@dataclass
class IdInputs:
    """One standard batch, ready for every peer: padded on the device, packed on the host (packformer
    moves its packed batch itself, so its host-to-device copy is inside its timing)."""

    padded: torch.Tensor        # [B, L] int64 on the device, right-padded with the pad id
    mask: torch.Tensor          # [B, L] int64 on the device, 1 = real token
    packed: PackedBatch         # on CPU, same ids in the same order
    padded_cpu: torch.Tensor    # [B, L] on CPU (for peers that run on the host: ONNX Runtime)
    mask_cpu: torch.Tensor


@dataclass
class TextInputs:
    texts: list[str]
    batch_size: int             # sequences per padded batch for the peers that take a DataLoader view


@dataclass
class PeerContext:
    parts: ModelParts           # fp32 CPU weights; engines copy them and never mutate them
    device: torch.device
    dtype: torch.dtype
    workdir: Path               # scratch space (ONNX export, a sentence-transformers folder)
    threads: int
    batch_size: int = 32        # texts per batch on text workloads, for peers that fix it when built


def _copy_parts(parts: ModelParts) -> ModelParts:
    return dataclasses.replace(parts, encoder=copy.deepcopy(parts.encoder), head=copy.deepcopy(parts.head))


class Engine:
    name: str = ""
    dtype: torch.dtype = torch.float32
    notes: str = ""
    int8: bool = False           # int8 / fp8 Linear layers: agreement judged by compare(..., int8=True)
    quantized: str = "int8"      # which of the two, for the criterion's label
    unit_norm: bool = False      # always L2-normalizes its embeddings: judged against the normalized reference

    def prepare(self, inputs: IdInputs | TextInputs) -> Callable[[], Any]:
        raise NotImplementedError

    def result(self, raw: Any, inputs: IdInputs | TextInputs) -> torch.Tensor:
        """Raw output -> fp32 CPU tensor: [T, H] (ids, packed order) or [N, D] (texts, input order)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class PackformerEngine(Engine):
    def __init__(self, model: Model, name: str):
        self.model, self.name, self.dtype = model, name, model.dtype
        runner = model.runner
        self.notes = ("reference encoder (model.py)" if runner is model.encoder
                      else f"fast path: {getattr(runner, '__qualname__', type(runner).__name__)}")

    def prepare(self, inputs):
        if isinstance(inputs, TextInputs):
            texts = inputs.texts
            return lambda: self.model.encode(texts, convert_to_tensor=True, show_progress_bar=False)
        packed = inputs.packed
        return lambda: self.model.hidden_states(packed)

    def result(self, raw, inputs):
        return raw.float().cpu()

    def close(self):
        del self.model


PaddedCall = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # (ids [B, L], mask [B, L]) -> [B, L, H]


class PaddedEngine(Engine):
    """Any peer that takes right-padded [B, L] ids (transformers, Better Transformer, ONNX Runtime).
    Text workloads: tokenized by the model's tokenizer inside the timed call, then batches of
    `batch_size` in input order, padded per batch, pooled like the model (a plain DataLoader loop)."""

    def __init__(self, name: str, call: PaddedCall, parts: ModelParts, device: torch.device, dtype: torch.dtype,
                 grad: bool = False, host: bool = False, notes: str = "", keep: Any = None):
        self.name, self.call, self.dtype, self.notes = name, call, dtype, notes
        self.parts, self.device, self.grad, self.host = parts, device, grad, host
        self.keep = keep            # the module(s) behind `call`, freed on close()

    def _ctx(self):
        return torch.enable_grad() if self.grad else torch.inference_mode()

    def prepare(self, inputs):
        if isinstance(inputs, TextInputs):
            return self._prepare_texts(inputs)
        ids, mask = (inputs.padded_cpu, inputs.mask_cpu) if self.host else (inputs.padded, inputs.mask)

        def run():
            with self._ctx():
                return self.call(ids, mask)
        return run

    def _prepare_texts(self, inputs: TextInputs):
        tok = self.parts.tokenizer
        if tok is None:
            raise NotApplicable("text workloads need the model's tokenizer")
        pad, mode, normalize = tok.pad_id, self.parts.pooler.mode, self.parts.pooler.normalize
        dev = torch.device("cpu") if self.host else self.device
        texts, bs, max_len = inputs.texts, inputs.batch_size, self.parts.max_seq_length

        def run():
            ids = tok.encode(texts, max_len)
            outs = []
            with self._ctx():
                for i in range(0, len(ids), bs):
                    p, m = pad_ids(ids[i:i + bs], pad)
                    p, m = p.to(dev, non_blocking=True), m.to(dev, non_blocking=True)
                    h = self.call(p, m)                                            # [b, L, H]
                    outs.append(pool_padded(h, m, mode, normalize).detach().float().cpu())
            return torch.cat(outs)
        return run

    def result(self, raw, inputs):
        if isinstance(inputs, TextInputs):
            return raw
        mask = inputs.mask_cpu.bool()
        return raw.detach().float().cpu()[mask]                                     # [T, H]

    def close(self):
        self.call = self.keep = None


def pool_padded(h: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """[B, L, H] + mask [B, L] -> [B, H] in fp32, pooled over real tokens only (like sentence-transformers)."""
    h, m = h.float(), mask.to(h.device).unsqueeze(-1).float()
    if mode == "cls":
        out = h[:, 0]
    elif mode == "mean":
        out = (h * m).sum(1) / m.sum(1).clamp(min=1)
    elif mode == "max":
        out = h.masked_fill(m == 0, float("-inf")).max(1).values
    else:
        raise ValueError(f"unknown pooling mode {mode!r}")
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out


class SentenceTransformersEngine(Engine):
    def __init__(self, st, dtype: torch.dtype, notes: str):
        self.st, self.dtype, self.notes, self.name = st, dtype, notes, "sentence_transformers"

    def prepare(self, inputs):
        if not isinstance(inputs, TextInputs):
            raise NotApplicable("sentence_transformers runs end to end on texts: use a text workload "
                                "(texts_1500, texts_20000) or --texts FILE")
        texts, bs = inputs.texts, inputs.batch_size
        return lambda: self.st.encode(texts, batch_size=bs, convert_to_tensor=True, show_progress_bar=False)

    def result(self, raw, inputs):
        return raw.float().cpu()

    def close(self):
        del self.st


# -- builders ------------------------------------------------------------------------------------------------

def _require_transformers_class(ctx: PeerContext, built_from: str = "") -> None:
    """Peers built through `convert.to_hf` need a transformers model class for the family; families whose
    checkpoints run remote code (NomicBERT, GTE) have none, and such a peer is skipped saying so."""
    from ..families import family_named

    fam = family_named(ctx.parts.config.family)
    if fam.to_hf_config is None:
        raise NotApplicable(f"no transformers peer for this model: the {fam.name} family has no transformers model "
                            f"class (its checkpoints run remote code){built_from}")


def _hf(ctx: PeerContext, attn: str, dtype: torch.dtype):
    _require_transformers_class(ctx)
    try:            # a family's transformers class may not state every variant (NomicBERT with biases)
        convert.hf_config(ctx.parts.config)
    except ValueError as e:
        raise NotApplicable(f"no transformers peer for this model: {e}") from None
    parts = ctx.parts
    return convert.to_hf(parts.encoder, attn_implementation=attn).to(ctx.device, dtype)


def _hf_call(model) -> PaddedCall:
    return lambda ids, mask: model(input_ids=ids, attention_mask=mask).last_hidden_state


def build_packformer(ctx: PeerContext, fast: bool) -> Engine:
    model = Model(_copy_parts(ctx.parts), device=ctx.device, dtype=ctx.dtype, fast=None if fast else False)
    return PackformerEngine(model, "packformer" if fast else "packformer_ref")


def build_packformer_int8(ctx: PeerContext) -> Engine:
    if ctx.dtype != torch.float32:
        raise NotApplicable("packformer_int8 quantizes an fp32 model: run bench with --dtype float32")
    eng = PackformerEngine(Model(_copy_parts(ctx.parts), device=ctx.device, quantize="int8"), "packformer_int8")
    eng.int8, eng.notes = True, "packformer, quantize='int8' (per-token activation scales, lossy)"
    return eng


def build_packformer_fp8(ctx: PeerContext) -> Engine:
    """fp8 GEMMs (dtype='float8'), forced past the load-time accuracy check so that its speed is measured
    on any weights; the check's figures go into the notes and the agreement is judged like int8's."""
    model = Model(_copy_parts(ctx.parts), device=ctx.device, dtype="float8", force_fp8=True)
    eng = PackformerEngine(model, "packformer_fp8")
    rep = model.fp8_report
    eng.int8, eng.quantized = True, "fp8"
    eng.notes = (f"packformer, dtype='float8' (e4m3 GEMMs, per-token scales, lossy); load check: "
                 f"min cosine {rep['min_cosine']} vs {rep['against']} on {rep['calibration']}")
    return eng


def build_hf_eager(ctx):
    m = _hf(ctx, "eager", torch.float32)
    return PaddedEngine("hf_eager_fp32", _hf_call(m), ctx.parts, ctx.device, torch.float32, keep=m,
                        notes="transformers, attn_implementation=eager, fp32")


def _no_sdpa(e: ValueError) -> bool:
    return "sdpa" in str(e).lower() or "scaled_dot_product" in str(e).lower()


def build_hf_sdpa(ctx):
    try:
        m = _hf(ctx, "sdpa", ctx.dtype)
    except ValueError as e:
        if not _no_sdpa(e):
            raise
        raise NotApplicable(f"transformers has no SDPA attention for the {ctx.parts.config.family} family "
                            "(peer hf_best runs its fastest one)") from None
    return PaddedEngine("hf_sdpa", _hf_call(m), ctx.parts, ctx.device, ctx.dtype, keep=m,
                        notes="transformers, attn_implementation=sdpa")


def build_hf_best(ctx):
    """transformers with the fastest attention it offers for the family, in the bench's dtype: SDPA where
    the family's model class supports it, else eager (MPNet, DeBERTa-v2)."""
    try:
        m, attn = _hf(ctx, "sdpa", ctx.dtype), "sdpa"
    except ValueError as e:
        if not _no_sdpa(e):
            raise
        m, attn = _hf(ctx, "eager", ctx.dtype), "eager"
    return PaddedEngine("hf_best", _hf_call(m), ctx.parts, ctx.device, ctx.dtype, keep=m,
                        notes=f"transformers, attn_implementation={attn} (the fastest this family offers)")


def build_hf_sdpa_compiled(ctx):
    m = _hf(ctx, "sdpa", ctx.dtype)
    cm = torch.compile(m)
    return PaddedEngine("hf_sdpa_compiled", _hf_call(cm), ctx.parts, ctx.device, ctx.dtype, keep=(m, cm),
                        notes="transformers sdpa under torch.compile (compile time is in first_call_ms)")


def build_hf_int8(ctx):
    from torch.ao.quantization import quantize_dynamic

    m = _hf(ctx, "sdpa", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8)
    eng = PaddedEngine("hf_int8_dynamic", _hf_call(q), ctx.parts, ctx.device, torch.float32, keep=q,
                       notes="transformers sdpa, torch dynamic int8 quantization of every nn.Linear (lossy)")
    eng.int8 = True
    return eng


def _bt(ctx: PeerContext, nested: bool, grad: bool, name: str, notes: str) -> Engine:
    c = ctx.parts.config
    if c.position_embedding != "absolute" or c.rotary is not None or c.ffn_kind != "mlp" or c.relative_bias is not None \
            or c.local_window:
        raise NotApplicable("nn.TransformerEncoder runs learned absolute positions, full attention and a plain MLP "
                            "only; this model has " + ", ".join(f"{k} {v}" for k, v in c.architecture().items()))
    bt = convert.to_better_transformer(ctx.parts.encoder).to(ctx.device, ctx.dtype)
    bt.set_sparsity(nested)
    bt.requires_grad_(grad)

    def call(ids, mask):
        with warnings.catch_warnings():   # torch's "nested tensors are a prototype" warning, once per call
            warnings.simplefilter("ignore")
            return bt.features(ids)
    return PaddedEngine(name, call, ctx.parts, ctx.device, ctx.dtype, grad=grad, keep=bt, notes=notes)


def build_bt_nested(ctx):
    return _bt(ctx, True, False, "bt_nested", "nn.TransformerEncoder fast path, use_nested_tensor=True, eval + "
               "inference_mode")


def build_bt_dense(ctx):
    return _bt(ctx, False, False, "bt_dense", "nn.TransformerEncoder fast path, use_nested_tensor=False (fused MHA "
               "only)")


def build_bt_slowpath(ctx):
    return _bt(ctx, True, True, "bt_slowpath", "the same modules, eval mode, autograd recording (torch takes its "
               "slow path)")


def build_onnxruntime(ctx: PeerContext) -> Engine:
    from .onnx_export import export_session

    _require_transformers_class(ctx, ", and the ONNX graph is exported from that model")
    sess, notes = export_session(ctx.parts.encoder, ctx.workdir / "onnx", ctx.threads)

    def call(ids, mask):
        out = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        return torch.from_numpy(out)
    return PaddedEngine("onnxruntime", call, ctx.parts, torch.device("cpu"), torch.float32, host=True, keep=sess,
                        notes=notes)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints load reports and progress bars while sentence-transformers builds: silence them."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def build_sentence_transformers(ctx: PeerContext) -> Engine:
    with _quiet_transformers():
        return _build_sentence_transformers(ctx)


def _build_sentence_transformers(ctx: PeerContext) -> Engine:
    from sentence_transformers import SentenceTransformer

    parts = ctx.parts
    try:
        from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    except ImportError:  # older sentence-transformers
        from sentence_transformers.models import Normalize, Pooling, Transformer
    if parts.format == "sentence-transformers":
        st, how = SentenceTransformer(parts.source, device=str(ctx.device)), f"SentenceTransformer({parts.source})"
    else:
        if parts.format == "huggingface":
            folder = parts.source
        elif parts.tokenizer is not None and parts.config.vocab_size == 30522 and parts.format == "random":
            from ..loading import builtin_model_dir
            folder = ctx.workdir / "st_model"
            convert.to_hf(parts.encoder).save_pretrained(folder)
            for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
                if (builtin_model_dir() / f).exists():
                    shutil.copy(builtin_model_dir() / f, folder / f)
        else:
            raise NotApplicable(f"sentence_transformers needs a model folder with a tokenizer; {parts.source} has none")
        mods = [Transformer(str(folder), max_seq_length=parts.max_seq_length),
                Pooling(parts.config.hidden_size, pooling_mode=parts.pooler.mode)]
        if parts.pooler.normalize:
            mods.append(Normalize())
        st, how = SentenceTransformer(modules=mods, device=str(ctx.device)), "SentenceTransformer(modules=...)"
    if ctx.dtype != torch.float32:
        st = st.to(ctx.dtype)
    return SentenceTransformersEngine(st.eval(), ctx.dtype, f"{how}.encode(texts, batch_size=...) end to end")


def build_infinity_torch(ctx: PeerContext) -> Engine:
    from .peer_infinity import build_infinity
    return build_infinity(ctx, "torch")


def build_infinity_onnx(ctx: PeerContext) -> Engine:
    from .peer_infinity import build_infinity
    return build_infinity(ctx, "optimum")


def build_fastembed(ctx: PeerContext) -> Engine:
    from .peer_fastembed import build_fastembed as build
    return build(ctx)


@dataclass(frozen=True)
class PeerSpec:
    name: str
    build: Callable[[PeerContext], Engine]
    requires: tuple[str, ...] = ()          # importable modules
    install: str = ""
    devices: tuple[str, ...] = ("cpu", "cuda")
    description: str = ""


_TF = ("transformers",)
INFINITY_INSTALL = 'pip install "infinity-emb[server,torch,optimum]" (or pip install -e ".[peers]")'
FASTEMBED_INSTALL = 'pip install fastembed (or pip install -e ".[peers]")'
PEERS: dict[str, PeerSpec] = {p.name: p for p in [
    PeerSpec("packformer", lambda c: build_packformer(c, True), description="packformer, fast path (model.runner)"),
    PeerSpec("packformer_ref", lambda c: build_packformer(c, False),
             description="packformer, readable reference encoder (fast=False)"),
    PeerSpec("packformer_int8", build_packformer_int8, devices=("cpu",),
             description="packformer with quantize='int8' (CPU; lossy, judged by cosine >= 0.99)"),
    PeerSpec("packformer_fp8", build_packformer_fp8, devices=("cuda",),
             description="packformer with dtype='float8' (GPU fp8 GEMMs; lossy, judged by cosine like int8)"),
    PeerSpec("hf_eager_fp32", build_hf_eager, _TF, "pip install transformers", description="transformers eager, fp32"),
    PeerSpec("hf_sdpa", build_hf_sdpa, _TF, "pip install transformers", description="transformers sdpa"),
    PeerSpec("hf_best", build_hf_best, _TF, "pip install transformers",
             description="transformers, its fastest attention for the family (sdpa, else eager)"),
    PeerSpec("hf_sdpa_compiled", build_hf_sdpa_compiled, _TF, "pip install transformers",
             description="transformers sdpa + torch.compile"),
    PeerSpec("hf_int8_dynamic", build_hf_int8, _TF, "pip install transformers", devices=("cpu",),
             description="transformers + torch dynamic int8 quantization (CPU)"),
    PeerSpec("bt_nested", build_bt_nested, description="Better Transformer fast path with sparsity (nested tensors)"),
    PeerSpec("bt_dense", build_bt_dense, description="Better Transformer fast path without sparsity"),
    PeerSpec("bt_slowpath", build_bt_slowpath, description="nn.TransformerEncoder slow path (autograd recording)"),
    PeerSpec("sentence_transformers", build_sentence_transformers, ("sentence_transformers", "transformers"),
             "pip install sentence-transformers", description="SentenceTransformer.encode, end to end (texts)"),
    PeerSpec("onnxruntime", build_onnxruntime, ("onnxruntime", "onnx", "transformers"),
             "pip install onnxruntime onnx transformers", devices=("cpu",),
             description="ONNX export of the transformers model, ONNX Runtime (CPU)"),
    # the embedding engines, end to end on texts (pip install -e ".[peers]", in an environment of their own)
    PeerSpec("infinity_torch", build_infinity_torch, ("infinity_emb", "sentence_transformers"), INFINITY_INSTALL,
             description="Infinity's AsyncEmbeddingEngine, torch engine, end to end (texts)"),
    PeerSpec("infinity_onnx", build_infinity_onnx, ("infinity_emb", "optimum", "onnxruntime", "onnx", "transformers"),
             INFINITY_INSTALL, devices=("cpu",),
             description="Infinity's AsyncEmbeddingEngine, optimum (ONNX Runtime) engine, end to end (texts, CPU)"),
    PeerSpec("fastembed", build_fastembed, ("fastembed", "onnxruntime", "onnx", "transformers"),
             FASTEMBED_INSTALL, devices=("cpu",),
             description="FastEmbed TextEmbedding.embed on the ONNX export, end to end (texts, CPU)"),
]}
ALIASES = {"hf_eager": "hf_eager_fp32", "hf": "hf_sdpa", "int8": "packformer_int8", "fp8": "packformer_fp8",
           "bt": "bt_nested", "ort": "onnxruntime", "st": "sentence_transformers", "onnx": "onnxruntime",
           "infinity": "infinity_torch"}
DEFAULT_PEERS = {
    "cpu": ["hf_eager_fp32", "hf_sdpa", "hf_int8_dynamic", "bt_nested", "onnxruntime", "sentence_transformers"],
    "cuda": ["hf_eager_fp32", "hf_sdpa", "hf_sdpa_compiled", "bt_nested", "bt_dense", "bt_slowpath",
             "sentence_transformers"],
}


# distributions whose versions a result records for the peers that run on them (machine_info has the rest)
PEER_DISTS = {"infinity_torch": ("infinity-emb", "sentence-transformers", "numpy"),
              "infinity_onnx": ("infinity-emb", "optimum", "optimum-onnx", "onnxruntime", "numpy"),
              "fastembed": ("fastembed", "onnxruntime", "numpy")}


def package_versions(names: list[str]) -> dict[str, str | None]:
    """Installed versions of the distributions behind peers `names` (None where not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for dist in dict.fromkeys(d for n in names for d in PEER_DISTS.get(n, ())):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def canonical_peers(names: list[str] | str) -> list[str]:
    """Peer names (aliases allowed; a list or a comma-separated string) -> canonical names, in order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out = []
    for n in names:
        n = ALIASES.get(n, n)
        if n not in PEERS:
            raise ValueError(f"unknown peer {n!r}; known: {', '.join(PEERS)} (aliases: {', '.join(ALIASES)})")
        if n not in out:
            out.append(n)
    return out


def resolve_peers(names: list[str] | str | None, device: torch.device) -> list[str]:
    """The peers of a bench run: the given ones (None = the device's defaults), packformer always first."""
    out = canonical_peers(DEFAULT_PEERS[device.type] if names is None else names)
    return ["packformer"] + [n for n in out if n != "packformer"]


def unavailable(name: str, device: torch.device) -> str | None:
    """Why peer `name` cannot run here (missing package, wrong device), or None."""
    spec = PEERS[name]
    missing = [m for m in spec.requires if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed ({', '.join(missing)} missing): {spec.install}"
    if device.type not in spec.devices:
        return f"runs on {', '.join(spec.devices)} only, not {device.type}"
    return None


@contextlib.contextmanager
def built(name: str, ctx: PeerContext):
    """Build peer `name`, yield its Engine, and free it (and the GPU cache) afterwards."""
    eng = PEERS[name].build(ctx)
    try:
        yield eng
    finally:
        eng.close()
        del eng
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
