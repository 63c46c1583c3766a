"""Peers built from our weights compute our function: transformers (eager/sdpa, bare and with a head)
and the Better Transformer model on padded ids, in every path torch can take."""
import pytest
import torch

from packformer.bench import convert
from packformer.bench.profile import profile_calls
from packformer.bench.workloads import build_workload
from packformer.config import EncoderConfig, preset
from packformer.heads import ClassificationHead
from packformer.loaders.parts import param_view
from packformer.model import Encoder

pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")

SHAPES = {
    "bert": EncoderConfig(vocab_size=2000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    "xlmr": preset("xlmr-base", vocab_size=2000, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
}


def make(kind: str, act: str = "tanh"):
    """An encoder and head with every parameter random (biases and norms too, so a misplaced one shows)."""
    cfg = SHAPES[kind].replace(num_labels=3)
    torch.manual_seed(0)
    enc, head = Encoder(cfg).eval(), ClassificationHead(cfg.hidden_size, 3, act=act).eval()
    with torch.no_grad():
        for p in [*enc.parameters(), *head.parameters()]:
            p.normal_(0, 0.2 if p.dim() == 1 else 0.05)
    return enc, head


def batch(enc):
    cfg = enc.config
    w = build_workload("tutorial_big", cfg)
    ids, mask = w.padded(cfg.pad_token_id)
    packed = w.packed(cfg.position_offset)
    with torch.no_grad():
        ref = enc(packed)                                                     # [T, H]
    return ids, mask, packed, ref


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_peer_matches_the_reference(kind, attn):
    enc, _ = make(kind)
    ids, mask, _, ref = batch(enc)
    hf = convert.to_hf(enc, attn_implementation=attn)
    assert not hf.training and hf.config._attn_implementation == attn
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask).last_hidden_state[mask.bool()]
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
def test_transformers_classifier_peer_matches_our_head(kind):
    enc, head = make(kind, act="tanh")
    ids, mask, packed, ref = batch(enc)
    hf = convert.to_hf(enc, head, with_head=True)
    with torch.no_grad():
        logits = hf(input_ids=ids, attention_mask=mask).logits
        ours = head(ref, packed.cu_seqlens)
    assert logits.shape == (3, 3) and (logits - ours).abs().max() < 1e-5


def test_a_relu_head_has_no_transformers_equivalent():
    enc, head = make("xlmr", act="relu")
    with pytest.raises(ValueError, match="relu"):
        convert.to_hf(enc, head, with_head=True)


def test_pre_norm_models_have_no_transformers_equivalent():
    enc = Encoder(SHAPES["bert"].replace(norm_first=True))
    with pytest.raises(ValueError, match="norm_first=True"):
        convert.to_hf(enc)


@pytest.mark.parametrize("kind", ["bert", "xlmr"])
@pytest.mark.parametrize("path", ["slow", "dense", "nested"])
def test_better_transformer_peer_matches_the_reference_on_every_path(kind, path):
    enc, head = make(kind, act="relu")
    ids, mask, packed, ref = batch(enc)
    bt = convert.to_better_transformer(enc, head)
    bt.set_sparsity(path == "nested")
    bt.requires_grad_(path == "slow")
    ctx = torch.enable_grad if path == "slow" else torch.no_grad

    prof = profile_calls(lambda: bt.features(ids), "cpu", 1, context=ctx)
    # torch really takes the path the run is named after
    assert ("aten::_transformer_encoder_layer_fwd" in prof.op_names) == (path != "slow")
    assert ("aten::_nested_tensor_from_mask" in prof.op_names) == (path == "nested")
    with ctx():
        feats = bt.features(ids)[mask.bool()]
        logits = bt(ids)
    assert (feats - ref).abs().max() < 1e-5
    with torch.no_grad():
        assert (logits - head(ref, packed.cu_seqlens)).abs().max() < 1e-5


def test_better_transformer_weights_round_trip_through_the_key_map():
    enc, _ = make("xlmr")
    bt = convert.to_better_transformer(enc)
    view = param_view(Encoder(enc.config), None)
    back = convert.bt_keymap().convert(bt.state_dict(), view, enc.config.num_layers)
    ours = enc.state_dict()
    assert set(ours) == set(back)
    assert all(torch.equal(back[k], ours[k]) for k in back)


def test_peers_hold_copies_not_views():
    enc, head = make("bert")
    hf = convert.to_hf(enc)
    bt = convert.to_better_transformer(enc, head)
    with torch.no_grad():
        enc.layers[0].qkv.weight.zero_()
    assert hf.encoder.layer[0].attention.self.query.weight.abs().sum() > 0
    assert bt.transformer.layers[0].self_attn.in_proj_weight.abs().sum() > 0


def test_sparsity_with_an_odd_head_count_is_refused_clearly():
    cfg = SHAPES["bert"].replace(hidden_size=24, num_heads=3)
    bt = convert.to_better_transformer(Encoder(cfg))
    bt.set_sparsity(False)
    with pytest.raises(ValueError, match="even number of heads"):
        bt.set_sparsity(True)
