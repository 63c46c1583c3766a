"""`packformer.optimize(module)`: a `torch.nn.TransformerEncoder` that runs on packed tokens.

The returned module keeps the encoder's `forward(src, mask=None, src_key_padding_mask=None,
is_causal=None)`. It unpads `src` once with `src_key_padding_mask` (True = padding), runs packformer
`EncoderLayer`s on [T, H] with `varlen_attention`, applies the encoder's final `norm` (if any) and
pads once on exit. The packed layers *share* the original's parameters (mapped by a declarative
KeyMap, so a module that does not fit is reported key by key): nothing is copied, and later in-place
updates, `.to()` or `.half()` keep both views in step.

Padded positions. Real positions equal the original's in eval mode; padded positions have no single
"original" value. In torch 2.13 (CPU) the encoder returns, at padded positions:
  - zeros on its nested-tensor path (batch_first, post-norm, even heads, right-padded mask, eval,
    no grad), but the final `norm` is applied *after* re-padding, so with a final norm they hold
    `norm.bias`;
  - NaN for fully padded rows and arbitrary values elsewhere on its per-layer fast path (even heads,
    batch_first, eval, no grad, but nested tensors off or not applicable);
  - arbitrary finite values on the plain path (odd heads, seq-first, grad enabled).
We always return zeros at padded positions (a fully padded row is all zeros), never NaN.

What cannot run packed falls back to the original module with a one-line warning naming why: an
unsupported structure at `optimize()` time (the module itself is returned), and per call an explicit
`mask`/`is_causal`, training mode, autograd through required parameters, a float padding mask that is
an additive bias rather than 0/-inf, nested-tensor input, autocast, or forward hooks on the original.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import pad_input
from ..config import EncoderConfig
from ..dataflow import Context, run_layers
from ..model import EncoderLayer, ReferencePrimitives
from ..ops.attention import AttentionMeta
from .keymap import CheckpointError, KeyMap, Rule

_L = "layers.{i}."
LAYER_RULES = [
    Rule.of(_L + "qkv.weight", _L + "self_attn.in_proj_weight"),   # rows [q; k; v], as ours
    Rule.of(_L + "qkv.bias", _L + "self_attn.in_proj_bias"),
    Rule.of(_L + "out.weight", _L + "self_attn.out_proj.weight"),
    Rule.of(_L + "out.bias", _L + "self_attn.out_proj.bias"),
    Rule.of(_L + "norm1.weight", _L + "norm1.weight"),
    Rule.of(_L + "norm1.bias", _L + "norm1.bias"),
    Rule.of(_L + "ffn1.weight", _L + "linear1.weight"),
    Rule.of(_L + "ffn1.bias", _L + "linear1.bias"),
    Rule.of(_L + "ffn2.weight", _L + "linear2.weight"),
    Rule.of(_L + "ffn2.bias", _L + "linear2.bias"),
    Rule.of(_L + "norm2.weight", _L + "norm2.weight"),
    Rule.of(_L + "norm2.bias", _L + "norm2.bias"),
]
FINAL_NORM_RULES = [Rule.of("final_norm.weight", "norm.weight"), Rule.of("final_norm.bias", "norm.bias")]


def _warn(reason: str, stacklevel: int) -> None:
    warnings.warn(f"packformer.optimize: running the original nn.TransformerEncoder because {reason}",
                  stacklevel=stacklevel)


# --------------------------------------------------------------------------------------------------
# What the module is made of
# --------------------------------------------------------------------------------------------------

def _activation_name(fn) -> str | None:
    """The EncoderConfig activation that computes exactly what `fn` does, or None."""
    if fn is F.relu or type(fn) is nn.ReLU:
        return "relu"
    if fn is F.gelu or (type(fn) is nn.GELU and fn.approximate == "none"):
        return "gelu"
    # nn.GELU(approximate="tanh") is left out on purpose: torch's own fast path computes exact GELU
    # for it, so "the original's output" depends on which torch path runs.
    return None


def _is_plain(obj, cls: type) -> bool:
    """`obj` is a `cls` whose forward is `cls.forward` (a subclass that overrides it may compute anything)."""
    return isinstance(obj, cls) and type(obj).forward is cls.forward and "forward" not in vars(obj)


def why_not_packed(module: nn.TransformerEncoder) -> str | None:
    """Why this encoder's structure cannot run packed, or None when it can."""
    if not _is_plain(module, nn.TransformerEncoder):
        return f"{type(module).__name__} overrides forward()"
    if len(module.layers) == 0:
        return "it has no layers"
    d = module.layers[0].self_attn.embed_dim if hasattr(module.layers[0], "self_attn") else None
    batch_first = getattr(getattr(module.layers[0], "self_attn", None), "batch_first", None)
    for i, layer in enumerate(module.layers):
        where = f"layers[{i}]"
        if type(layer) is not nn.TransformerEncoderLayer or "forward" in vars(layer):
            return f"{where} is a {type(layer).__name__} with its own forward, not an nn.TransformerEncoderLayer"
        attn = layer.self_attn
        if not _is_plain(attn, nn.MultiheadAttention):
            return f"{where}.self_attn is a {type(attn).__name__}"
        if not attn._qkv_same_embed_dim:
            return f"{where}.self_attn has kdim/vdim different from embed_dim"
        if attn.bias_k is not None or attn.add_zero_attn:
            return f"{where}.self_attn uses add_bias_kv or add_zero_attn"
        if attn.embed_dim != d:
            return f"{where} has d_model {attn.embed_dim} but layers[0] has {d}"
        if attn.batch_first != batch_first:
            return f"{where} has batch_first={attn.batch_first} but layers[0] has {batch_first}"
        for name in ("linear1", "linear2"):
            if not _is_plain(getattr(layer, name), nn.Linear):
                return f"{where}.{name} is a {type(getattr(layer, name)).__name__}, not an nn.Linear"
        if not _is_plain(attn.out_proj, nn.Linear):
            return f"{where}.self_attn.out_proj is a {type(attn.out_proj).__name__}, not an nn.Linear"
        for name in ("norm1", "norm2"):
            norm = getattr(layer, name)
            if not _is_plain(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (d,):
                return f"{where}.{name} is not an nn.LayerNorm over d_model"
        if layer.norm1.eps != layer.norm2.eps:
            return f"{where}.norm1.eps ({layer.norm1.eps}) differs from norm2.eps ({layer.norm2.eps})"
        if _activation_name(layer.activation) is None:
            return f"{where}.activation {getattr(layer.activation, '__name__', layer.activation)!r} is not relu or gelu"
    norm = module.norm
    if norm is not None and (not _is_plain(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (d,)):
        return f"its final norm is a {type(norm).__name__}, not an nn.LayerNorm over d_model"
    return None


def layer_config(layer: nn.TransformerEncoderLayer) -> EncoderConfig:
    """The packformer EncoderConfig of one torch layer (each layer gets its own, so stacks whose
    layers differ in heads, feed-forward size, activation, eps or norm placement still run packed)."""
    attn = layer.self_attn
    return EncoderConfig(hidden_size=attn.embed_dim, num_layers=1, num_heads=attn.num_heads,
                         intermediate_size=layer.linear1.out_features, layer_norm_eps=layer.norm1.eps,
                         activation=_activation_name(layer.activation), norm_first=layer.norm_first,
                         final_layer_norm=False)


# --------------------------------------------------------------------------------------------------
# The packed stack: layers + final norm on [T, H], sharing the original's parameters
# --------------------------------------------------------------------------------------------------

class PackedStack(nn.Module):
    """packformer EncoderLayers and an optional final LayerNorm over packed tokens [T, H]."""

    def __init__(self, configs: list[EncoderConfig], final_norm_eps: float | None):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for cfg in configs)
        h = configs[0].hidden_size
        self.final_norm = nn.LayerNorm(h, eps=final_norm_eps) if final_norm_eps is not None else None

    def forward(self, x: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
        return run_layers(ReferencePrimitives(self), self.layers, x, Context(meta), self.final_norm)   # [T, H]


def keymap(source: nn.Module, stack: PackedStack) -> KeyMap:
    """The torch-name -> packformer-name map for this pair. Targets whose torch parameter is None
    (bias=False, LayerNorm without affine) are optional, and `share_parameters` drops them on our side."""
    rules = LAYER_RULES + (FINAL_NORM_RULES if stack.final_norm is not None else [])
    km = KeyMap(rules)
    optional = []
    for rule in km.expand(len(stack.layers)):
        (src,) = rule.sources
        owner, leaf = src.rsplit(".", 1)
        try:
            module = source.get_submodule(owner)
        except AttributeError:      # not there at all: convert() reports the key as missing
            continue
        if leaf in module._parameters and module._parameters[leaf] is None:
            optional.append(rule.target)
    return KeyMap(rules, optional=optional)


def share_parameters(source: nn.Module, stack: PackedStack) -> None:
    """Point every parameter of `stack` at the original's Parameter object (no copy). Raises
    CheckpointError naming every torch key that is missing or unused and every shape that differs."""
    km = keymap(source, stack)
    for target in km.optional:                       # torch has None here: so do we (exact, no +0)
        owner, leaf = target.rsplit(".", 1)
        setattr(stack.get_submodule(owner), leaf, None)
    state = source.state_dict(keep_vars=True)        # the Parameter objects themselves
    for target, param in km.convert(state, stack, len(stack.layers), what="nn.TransformerEncoder").items():
        owner, leaf = target.rsplit(".", 1)
        setattr(stack.get_submodule(owner), leaf, param)


def packed_stack(module: nn.TransformerEncoder) -> PackedStack:
    """Build the packed layers of a supported encoder (see `why_not_packed`) on its parameters."""
    configs = [layer_config(layer) for layer in module.layers]
    with torch.device("meta"):                       # no init work: every parameter is replaced
        stack = PackedStack(configs, module.norm.eps if module.norm is not None else None)
    share_parameters(module, stack)
    return stack


# --------------------------------------------------------------------------------------------------
# The drop-in module
# --------------------------------------------------------------------------------------------------

class PackedTransformerEncoder(nn.Module):
    """Drop-in for an nn.TransformerEncoder: same forward, runs packed, falls back when it must."""

    def __init__(self, original: nn.TransformerEncoder, stack: PackedStack):
        super().__init__()
        self.original = original             # a submodule: .train()/.eval()/.to() reach it too
        self.stack = stack
        self.batch_first = bool(original.layers[0].self_attn.batch_first)
        self.d_model = int(original.layers[0].self_attn.embed_dim)
        self._warned: set[str] = set()
        self.train(original.training)

    # -- input -------------------------------------------------------------------------------------

    def _check_input(self, src: torch.Tensor, kpm: torch.Tensor | None) -> None:
        if not isinstance(src, torch.Tensor):
            raise TypeError(f"src must be a torch.Tensor, got {type(src).__name__}")
        layout = "[N, S, E]" if self.batch_first else "[S, N, E]"
        if src.dim() not in (2, 3):
            raise ValueError(f"src must be {layout} (batch_first={self.batch_first}) or unbatched [S, E], "
                             f"got shape {tuple(src.shape)}")
        if src.shape[-1] != self.d_model:
            raise ValueError(f"src has feature size {src.shape[-1]} but the encoder's d_model is {self.d_model}")
        weight = self.stack.layers[0].qkv.weight
        if not src.is_floating_point() or src.dtype != weight.dtype:
            raise ValueError(f"src has dtype {src.dtype} but the encoder's parameters are {weight.dtype}")
        if src.device != weight.device:
            raise ValueError(f"src is on {src.device} but the encoder's parameters are on {weight.device}")
        if kpm is None:
            return
        if not isinstance(kpm, torch.Tensor):
            raise TypeError(f"src_key_padding_mask must be a torch.Tensor, got {type(kpm).__name__}")
        if kpm.dtype != torch.bool and not kpm.is_floating_point():
            raise ValueError(f"src_key_padding_mask must be bool (True = padding) or float (-inf = padding), "
                             f"got dtype {kpm.dtype}")
        if src.dim() == 3:
            want = (src.shape[0], src.shape[1]) if self.batch_first else (src.shape[1], src.shape[0])
        else:
            want = (src.shape[0],)
        if tuple(kpm.shape) != want:
            raise ValueError(f"src_key_padding_mask must have shape {want} for src of shape {tuple(src.shape)} "
                             f"(batch_first={self.batch_first}), got {tuple(kpm.shape)}")

    @staticmethod
    def _padding(kpm: torch.Tensor | None) -> tuple[torch.Tensor | None, str | None]:
        """The mask as bool (True = padding), or a reason it is not a padding mask."""
        if kpm is None or kpm.dtype == torch.bool:
            return kpm, None
        pad = torch.isneginf(kpm)
        if not bool((pad | (kpm == 0)).all()):
            return None, "src_key_padding_mask is a float mask with values other than 0 and -inf (an additive bias)"
        return pad, None

    def _why_not_now(self, src: torch.Tensor, mask, is_causal) -> str | None:
        if mask is not None:
            return "an explicit mask was given"
        if is_causal:
            return "is_causal=True was given"
        if self.training or self.original.training:
            return "it is in training mode (call .eval() for the packed path)"
        if torch.is_grad_enabled() and (src.requires_grad or any(p.requires_grad for p in self.original.parameters())):
            return "grad is enabled and a parameter or src requires grad (use torch.no_grad() for the packed path)"
        if torch.is_autocast_enabled(src.device.type):
            return "autocast is enabled"
        if any(m._forward_hooks or m._forward_pre_hooks for m in self.original.modules()):
            return "forward hooks are attached to the original module"
        return None

    def _fallback(self, reason: str, src, mask, kpm, is_causal) -> torch.Tensor:
        if reason not in self._warned:
            self._warned.add(reason)
            _warn(reason, stacklevel=6)
        return self.original(src, mask=mask, src_key_padding_mask=kpm, is_causal=is_causal)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, src: torch.Tensor, mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None, is_causal: bool | None = None) -> torch.Tensor:
        kpm = src_key_padding_mask
        if isinstance(src, torch.Tensor) and src.is_nested:
            return self._fallback("src is a nested tensor", src, mask, kpm, is_causal)
        self._check_input(src, kpm)
        pad, reason = self._padding(kpm)
        reason = reason or self._why_not_now(src, mask, is_causal)
        if reason:
            return self._fallback(reason, src, mask, kpm, is_causal)
        if src.dim() == 2:                           # unbatched [S, E]: one sequence
            out = self._packed(src.unsqueeze(0), None if pad is None else pad.unsqueeze(0), batch_first=True)
            return out.squeeze(0)
        return self._packed(src, pad, self.batch_first)

    def _packed(self, src: torch.Tensor, pad: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
        """src [B, S, E] (batch_first) or [S, B, E]; pad [B, S] bool or None -> same shape as src."""
        if batch_first:
            b, s = src.shape[:2]
        else:
            s, b = src.shape[:2]
        flat = src.reshape(b * s, self.d_model)                                   # [B*S, E] or [S*B, E]
        if pad is None and batch_first:              # nothing to unpad: the rows already are [T, H]
            lens = [s] * b
            x, indices = flat, None
        else:
            keep = torch.ones(b, s, dtype=torch.bool, device=src.device) if pad is None else ~pad.to(src.device)
            seq, pos = keep.nonzero(as_tuple=True)                                # [T], grouped by sequence
            indices = seq * s + pos if batch_first else pos * b + seq             # [T] rows of `flat`
            lens = keep.sum(dim=1).tolist()
            x = flat[indices]                                                     # [T, H]
        cu = torch.zeros(b + 1, dtype=torch.int32)
        if b:
            cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        meta = AttentionMeta.build(cu.to(src.device), max(lens, default=0), lens)
        y = self.stack(x, meta) if x.shape[0] else x                              # [T, H]
        if indices is None:
            return y.view(b, s, self.d_model)
        return pad_input(y, indices, b, s) if batch_first else pad_input(y, indices, s, b)


def optimize(module: nn.TransformerEncoder) -> nn.Module:
    """A packed drop-in for `module` (eval-mode outputs equal at real positions, zeros at padding).

    When the module's structure cannot run packed (see `why_not_packed`, or parameters that the key
    map does not account for, named key by key), `module` itself is returned with a one-line warning
    naming why. Raises TypeError for something that is not an nn.TransformerEncoder.
    """
    if isinstance(module, PackedTransformerEncoder):
        return module
    if not isinstance(module, nn.TransformerEncoder):
        raise TypeError(f"packformer.optimize expects a torch.nn.TransformerEncoder, got {type(module).__name__}")
    reason = why_not_packed(module)
    if reason is None:
        try:
            return PackedTransformerEncoder(module, packed_stack(module))
        except CheckpointError as e:   # e.g. an extra parameter we do not know what to do with
            reason = "its parameters do not fit the packed layers: " + "; ".join(str(e).splitlines()[1:]).strip()
    _warn(reason, stacklevel=4)
    return module
