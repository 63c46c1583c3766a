"""packformer.optimize(nn.TransformerEncoder): a packed drop-in, specified against torch itself.

Real positions equal the original's in eval mode (fp32 within 1e-5); padded positions are zeros,
never NaN (torch's own output there depends on which of its paths runs); what cannot run packed
runs the original, with one warning per reason.
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import packformer
from packformer.loaders.keymap import CheckpointError
from packformer.loaders.nn_module import PackedTransformerEncoder, layer_config, share_parameters, PackedStack

# torch warns at construction when its own nested-tensor path is off (odd heads, norm_first, ...)
# (and about its nested-tensor prototype when its own nested path runs)
pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")]

B, S = 5, 7


def make_encoder(d_model: int = 64, nhead: int = 4, *, batch_first: bool = True, norm_first: bool = False,
                 activation=F.relu, eps: float = 1e-5, final_norm: bool = False, nested: bool = True,
                 bias: bool = True, num_layers: int = 2, ff: int = 96, seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.1, activation=activation,
                                       layer_norm_eps=eps, batch_first=batch_first, norm_first=norm_first,
                                       bias=bias)
    norm = nn.LayerNorm(d_model, eps=eps, bias=bias) if final_norm else None
    enc = nn.TransformerEncoder(layer, num_layers, norm=norm, enable_nested_tensor=nested)
    with torch.no_grad():   # LayerNorms away from identity, layers different from each other
        for m in enc.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                if m.bias is not None:
                    m.bias.normal_(0.0, 0.3)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0.0, 0.1)
    return enc.eval()


def ragged_mask() -> torch.Tensor:
    """[B, S] True = padding: right-padded rows of mixed length, one full row, one fully padded row."""
    lens = [7, 3, 0, 5, 1]
    return torch.arange(S)[None, :] >= torch.tensor(lens)[:, None]


def masks() -> dict[str, torch.Tensor | None]:
    scattered = torch.zeros(B, S, dtype=torch.bool)
    scattered[0, :2] = True      # padding in front
    scattered[1, 3] = True       # a hole in the middle
    scattered[3, ::2] = True
    return {"ragged": ragged_mask(), "scattered": scattered,
            "no_padding": torch.zeros(B, S, dtype=torch.bool), "none": None}


def call(module: nn.Module, x: torch.Tensor, pad: torch.Tensor | None, batch_first: bool, **kw) -> torch.Tensor:
    """x [B, S, E] -> output [B, S, E], whatever the module's layout."""
    src = x if batch_first else x.transpose(0, 1).contiguous()
    out = module(src, src_key_padding_mask=pad, **kw)
    return out if batch_first else out.transpose(0, 1)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, pad: torch.Tensor | None, atol: float = 1e-5) -> None:
    assert not out.isnan().any(), "packed output has NaN"
    real = torch.ones(out.shape[:2], dtype=torch.bool) if pad is None else ~pad
    torch.testing.assert_close(out[real], ref[real], rtol=0, atol=atol)
    if pad is not None:
        assert torch.equal(out[pad], torch.zeros_like(out[pad])), "padded positions must be zeros"


def optimize_quietly(enc: nn.TransformerEncoder) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # a supported config must not warn
        packed = packformer.optimize(enc)
    assert isinstance(packed, PackedTransformerEncoder)
    return packed


# --------------------------------------------------------------------------------------------------
# Parity matrix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nested", [True, False], ids=["nested", "no_nested"])
@pytest.mark.parametrize("final_norm", [False, True], ids=["no_final_norm", "final_norm"])
@pytest.mark.parametrize("activation", ["relu", F.gelu], ids=["relu", "F.gelu"])
@pytest.mark.parametrize("d_model,nhead", [(60, 5), (64, 4), (48, 3)], ids=["60x5", "64x4", "48x3"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_matches_torch_in_eval(batch_first, norm_first, d_model, nhead, activation, final_norm, nested):
    enc = make_encoder(d_model, nhead, batch_first=batch_first, norm_first=norm_first, activation=activation,
                       final_norm=final_norm, nested=nested)
    packed = optimize_quietly(enc)
    x = torch.randn(B, S, d_model)
    for name, pad in masks().items():
        with torch.no_grad():
            ref = call(enc, x, pad, batch_first)
            out = call(packed, x, pad, batch_first)
        assert out.shape == ref.shape and out.dtype == ref.dtype, name
        assert_matches(out, ref, pad)


@pytest.mark.parametrize("activation", ["gelu", F.relu], ids=["gelu", "F.relu"])
def test_activation_given_as_string_or_function(activation):
    # (the matrix above covers the other two spellings)
    enc = make_encoder(60, 5, activation=activation, final_norm=True)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 60), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad)


@pytest.mark.parametrize("eps", [1e-12, 0.5])
def test_layer_norm_eps_is_kept(eps):
    # eps=0.5 changes the output visibly, so a packed layer that ignored it would fail here
    enc = make_encoder(eps=eps, final_norm=True, norm_first=True)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad)


@pytest.mark.parametrize("final_norm", [False, True])
def test_bias_false_runs_packed(final_norm):
    enc = make_encoder(bias=False, final_norm=final_norm)
    packed = optimize_quietly(enc)
    assert packed.stack.layers[0].qkv.bias is None
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad)


def test_final_norm_without_affine():
    enc = make_encoder()
    enc.norm = nn.LayerNorm(64, eps=1e-3, elementwise_affine=False)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad)


def test_layers_with_different_configs_run_packed():
    enc = make_encoder(d_model=60, nhead=5)
    torch.manual_seed(1)
    enc.layers[1] = nn.TransformerEncoderLayer(60, 3, 40, activation="gelu", layer_norm_eps=1e-3,
                                               batch_first=True, norm_first=True).eval()
    packed = optimize_quietly(enc)
    assert [layer.num_heads for layer in packed.stack.layers] == [5, 3]
    x, pad = torch.randn(B, S, 60), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_half_precision_as_close_as_torch_itself(dtype, batch_first):
    """Against the fp32 original on the same weights, our error is at most about torch's own in `dtype`."""
    enc32 = make_encoder(batch_first=batch_first, final_norm=True)
    enc = make_encoder(batch_first=batch_first, final_norm=True).to(dtype)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with torch.no_grad():
        ref = call(enc32, x, pad, batch_first)
        theirs = call(enc, x.to(dtype), pad, batch_first).float()
        out = call(packed, x.to(dtype), pad, batch_first)
    assert out.dtype == dtype
    out = out.float()
    real = ~pad
    torch_err = (theirs[real] - ref[real]).abs().max().item()
    our_err = (out[real] - ref[real]).abs().max().item()
    assert our_err <= 2 * torch_err + 1e-3, (our_err, torch_err)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))


@pytest.mark.gpu
@pytest.mark.parametrize("d_model,nhead", [(64, 4), (60, 5)], ids=["64x4", "60x5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_runs_on_the_modules_cuda_device(dtype, d_model, nhead):
    # 60 / 5 heads = head_dim 12: half precision must avoid the flash kernel's head_dim % 8 limit
    enc32 = make_encoder(d_model, nhead, final_norm=True).cuda()
    enc = make_encoder(d_model, nhead, final_norm=True).to("cuda", dtype)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, d_model, device="cuda"), ragged_mask().cuda()
    with torch.no_grad():
        ref = call(enc32, x, pad, True)
        theirs = call(enc, x.to(dtype), pad, True).float()
        out = call(packed, x.to(dtype), pad, True)
    assert out.device.type == "cuda" and out.dtype == dtype
    out, real = out.float(), ~pad
    torch_err = (theirs[real] - ref[real]).abs().max().item()
    our_err = (out[real] - ref[real]).abs().max().item()
    assert our_err <= 2 * torch_err + (1e-5 if dtype == torch.float32 else 1e-3), (our_err, torch_err)
    assert not out.isnan().any() and torch.equal(out[pad], torch.zeros_like(out[pad]))


# --------------------------------------------------------------------------------------------------
# Padding and batching
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_a_sequence_is_the_same_alone_and_in_a_batch(batch_first):
    # The drop-in runs the readable layers on the original's own parameters, so its GEMMs are torch's
    # `F.linear`, whose BLAS kernel picks its blocking (and so its summation order) by the row count:
    # a row may differ in its last bits with its neighbours, never by more. 8 ulps of the sequence's
    # largest value bound that (2 layers of sums over 60-96 terms, then LayerNorm); attention across
    # sequences or a mis-packed row would be off by orders of magnitude more.
    enc = make_encoder(60, 5, batch_first=batch_first, final_norm=True)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 60), ragged_mask()
    eps = torch.finfo(torch.float32).eps
    with torch.no_grad():
        together = call(packed, x, pad, batch_first)
        for i, n in enumerate((~pad).sum(1).tolist()):
            alone = call(packed, x[i:i + 1, :n], None, batch_first)
            ulps = 8 * eps * alone.abs().amax().item() if n else 0.0
            torch.testing.assert_close(together[i, :n], alone[0], rtol=0, atol=ulps)


def test_float_padding_mask_is_read_like_torch():
    enc = make_encoder()
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 64), ragged_mask()
    additive = torch.zeros(B, S).masked_fill(pad, float("-inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            out = call(packed, x, additive, True)
            assert torch.equal(out, call(packed, x, pad, True))
            assert_matches(out, call(enc, x, additive, True), pad)


def test_padded_positions_match_torchs_nested_path_without_final_norm():
    # torch's nested-tensor path (batch_first, post-norm, even heads, right padding) also returns zeros
    enc = make_encoder(nested=True)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with torch.no_grad():
        torch.testing.assert_close(call(packed, x, pad, True), call(enc, x, pad, True), rtol=0, atol=1e-5)


def test_all_rows_padded_gives_zeros():
    packed = optimize_quietly(make_encoder(final_norm=True))
    with torch.no_grad():
        out = packed(torch.randn(3, S, 64), src_key_padding_mask=torch.ones(3, S, dtype=torch.bool))
        empty = packed(torch.randn(0, S, 64))
    assert torch.equal(out, torch.zeros(3, S, 64)) and empty.shape == (0, S, 64)


def test_unbatched_input():
    enc = make_encoder(60, 5, final_norm=True)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(S, 60), ragged_mask()[1]
    with torch.no_grad():
        torch.testing.assert_close(packed(x), enc(x), rtol=0, atol=1e-5)
        out = packed(x, src_key_padding_mask=pad)
        ref = enc(x, src_key_padding_mask=pad)
    assert out.shape == (S, 60)
    torch.testing.assert_close(out[~pad], ref[~pad], rtol=0, atol=1e-5)
    assert torch.equal(out[pad], torch.zeros_like(out[pad]))


# --------------------------------------------------------------------------------------------------
# Parameters are shared with the original
# --------------------------------------------------------------------------------------------------

def test_parameters_are_shared_not_copied():
    enc = make_encoder(final_norm=True)
    packed = optimize_quietly(enc)
    assert packed.stack.layers[1].qkv.weight is enc.layers[1].self_attn.in_proj_weight
    assert {id(p) for p in packed.parameters()} == {id(p) for p in enc.parameters()}
    with torch.no_grad():
        enc.layers[0].linear1.weight.mul_(2.0)       # an in-place update (as an optimizer step does)
    packed.to(torch.float64)                          # conversion through the wrapper reaches both
    assert enc.layers[0].linear1.weight.dtype == torch.float64
    x, pad = torch.randn(B, S, 64, dtype=torch.float64), ragged_mask()
    with torch.no_grad():
        assert_matches(call(packed, x, pad, True), call(enc, x, pad, True), pad, atol=1e-10)


def test_a_module_that_does_not_fit_is_reported_by_key():
    one_layer, two_layers = make_encoder(num_layers=1), make_encoder(num_layers=2)
    with torch.device("meta"):
        stack = PackedStack([layer_config(layer) for layer in two_layers.layers], None)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.in_proj_weight"):
        share_parameters(one_layer, stack)


def test_an_unknown_parameter_falls_back_naming_its_key():
    enc = make_encoder()
    enc.layers[0].register_parameter("gate", nn.Parameter(torch.ones(64)))
    with pytest.warns(UserWarning, match=r"unused keys \(1\): layers\.0\.gate"):
        assert packformer.optimize(enc) is enc


# --------------------------------------------------------------------------------------------------
# Fallbacks: one warning per reason, then the original's output exactly
# --------------------------------------------------------------------------------------------------

def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def causal(n: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(n)


@pytest.mark.parametrize("case", ["mask", "is_causal", "bias_mask", "grad", "autocast", "hooks", "nested_input"])
def test_per_call_fallbacks_warn_once_and_equal_the_original(case):
    # torch 2.13's own per-layer fast path (even heads) fails under CPU autocast ("expected scalar type
    # Float but found BFloat16"), so that case uses odd heads, where the original runs
    d, h = (60, 5) if case == "autocast" else (64, 4)
    enc = make_encoder(d, h)
    packed = optimize_quietly(enc)
    x, pad = torch.randn(B, S, d), ragged_mask()
    kw: dict = {"src_key_padding_mask": pad}
    expect = {"mask": "explicit mask", "is_causal": "is_causal", "bias_mask": "additive bias", "grad": "grad",
              "autocast": "autocast", "hooks": "hooks", "nested_input": "nested tensor"}[case]
    grad = case == "grad"
    if case == "mask":
        kw = {"mask": causal(S)}
    elif case == "is_causal":
        kw = {"src_key_padding_mask": pad, "is_causal": True}
    elif case == "bias_mask":
        bias = torch.zeros(B, S)
        bias[:, -2:] = -1.0                           # an additive bias, not a padding mask
        kw = {"src_key_padding_mask": bias}
    elif case == "hooks":
        enc.layers[0].linear1.register_forward_hook(lambda *a: None)
    elif case == "nested_input":
        x, kw = torch.nested.nested_tensor([torch.randn(3, 64), torch.randn(5, 64)]), {}

    def run(m):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if case == "autocast" else contextlib.nullcontext()
        with torch.set_grad_enabled(grad), ctx:
            return m(x, **kw)

    with pytest.warns(UserWarning, match=expect) as record:
        out = run(packed)
        run(packed)                                   # the same reason warns only once
    assert len([w for w in record if "packformer.optimize" in str(w.message)]) == 1
    assert len(str(record[0].message).splitlines()) == 1
    ref = run(enc)
    if case == "nested_input":
        out, ref = out.to_padded_tensor(0.0), ref.to_padded_tensor(0.0)
    assert_same(out, ref)
    if grad:
        out.sum().backward()
        assert enc.layers[0].linear1.weight.grad is not None


def test_training_mode_runs_the_original_with_its_dropout():
    enc = make_encoder().train()                      # a fresh nn.TransformerEncoder is in training mode
    packed = packformer.optimize(enc)
    assert packed.training
    x, pad = torch.randn(B, S, 64), ragged_mask()
    with pytest.warns(UserWarning, match="training mode"):
        torch.manual_seed(3)
        out = packed(x, src_key_padding_mask=pad)
    torch.manual_seed(3)
    assert_same(out, enc(x, src_key_padding_mask=pad))
    packed.eval()                                     # then eval() turns the packed path on
    assert not enc.training
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error")
        assert_matches(packed(x, src_key_padding_mask=pad), enc(x, src_key_padding_mask=pad), pad)


def _swap_activation(enc, fn):
    for layer in enc.layers:
        layer.activation = fn
    return enc


class MyLayer(nn.TransformerEncoderLayer):
    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        return super().forward(src, src_mask, src_key_padding_mask, is_causal) * 2


def _subclass_layer(enc):
    torch.manual_seed(0)
    enc.layers[1] = MyLayer(64, 4, 96, batch_first=True).eval()
    return enc


def _eps_differ(enc):
    enc.layers[0].norm2.eps = 1e-3
    return enc


def _mixed_batch_first(enc):
    enc.layers[1] = nn.TransformerEncoderLayer(64, 4, 96, batch_first=False).eval()
    return enc


def _bias_kv(enc):
    enc.layers[0].self_attn = nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True).eval()
    return enc


def _final_norm(enc):
    enc.norm = nn.RMSNorm(64)
    return enc


STRUCTURES = {
    "silu": (lambda e: _swap_activation(e, F.silu), "activation"),
    "lambda": (lambda e: _swap_activation(e, lambda t: F.relu(t) * 0.5), "activation"),
    "gelu_tanh": (lambda e: _swap_activation(e, nn.GELU(approximate="tanh")), "activation"),
    "subclass": (_subclass_layer, "MyLayer"),
    "eps_differ": (_eps_differ, "norm2.eps"),
    "mixed_batch_first": (_mixed_batch_first, "batch_first"),
    "add_bias_kv": (_bias_kv, "add_bias_kv"),
    "rms_final_norm": (_final_norm, "RMSNorm"),
}


@pytest.mark.parametrize("case", list(STRUCTURES))
def test_unsupported_structures_return_the_original_with_a_warning(case):
    change, expect = STRUCTURES[case]
    enc = change(make_encoder())
    with pytest.warns(UserWarning, match=expect) as record:
        assert packformer.optimize(enc) is enc
    assert len(str(record[0].message).splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# Bad input gets a clear error
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("src,kpm,error", [
    (torch.randn(2, 3, 4, 64), None, r"\[N, S, E\]"),
    (torch.randn(64), None, r"\[N, S, E\]"),
    (torch.randn(2, 3, 32), None, "feature size 32"),
    (torch.randn(2, 3, 64, dtype=torch.float64), None, "dtype torch.float64"),
    (torch.randn(2, 3, 64), torch.zeros(3, 2, dtype=torch.bool), r"shape \(2, 3\)"),
    (torch.randn(2, 3, 64), torch.zeros(2, 3, dtype=torch.long), "dtype torch.int64"),
], ids=["rank4", "rank1", "feature_size", "dtype", "mask_shape", "int_mask"])
def test_bad_input_is_a_value_error(src, kpm, error):
    packed = optimize_quietly(make_encoder())
    with pytest.raises(ValueError, match=error), torch.no_grad():
        packed(src, src_key_padding_mask=kpm)


def test_seq_first_mask_must_be_batch_by_seq():
    packed = optimize_quietly(make_encoder(batch_first=False))
    with pytest.raises(ValueError, match=r"shape \(3, 2\)"), torch.no_grad():
        packed(torch.randn(2, 3, 64), src_key_padding_mask=torch.zeros(2, 3, dtype=torch.bool))


def test_only_transformer_encoders_are_accepted():
    with pytest.raises(TypeError, match="TransformerEncoderLayer"):
        packformer.optimize(nn.TransformerEncoderLayer(64, 4))
