"""ModernBERT against transformers' ModernBertModel / ModernBertForSequenceClassification.

A tiny real-shaped config: 3 layers with global_attn_every_n_layers=3 (layer 0 global, 1 and 2 local),
local_attention=16 (local layers see |i - j| <= 8), distinct global/local rotary bases, so the packed batch's
lengths 1, 7, 8, 9, 10, 17, 40 lie on both sides of the window edge. Two variants: the released models' biases
(none, mean pooling) and every bias on (cls pooling)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import packformer
from packformer.config import preset
from packformer.families import family_of
from packformer.families.modernbert import config_from_hf

from .harness import (check_alone_equals_batched, check_hidden_states, packed_reference, perturb_norms,
                      ragged_ids, run_packed)

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ModernBertConfig"):
    pytest.skip("ModernBERT needs transformers >= 4.48", allow_module_level=True)

LENGTHS = [1, 7, 8, 9, 10, 17, 40]
SPECIALS = {"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "[PAD]": 3, "[MASK]": 4}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            local_attention=16, global_attn_every_n_layers=3, global_rope_theta=160000.0, local_rope_theta=10000.0,
            max_position_embeddings=128, pad_token_id=3, cls_token_id=1, sep_token_id=2, bos_token_id=1,
            eos_token_id=2)
VARIANTS = {
    "released": dict(classifier_pooling="mean"),
    "biased": dict(attention_bias=True, mlp_bias=True, norm_bias=True, classifier_bias=True,
                   classifier_pooling="cls"),
}
TEXTS = ["Hello world", "a", "the quick brown fox jumps over the lazy dog " * 6, "ModernBERT has local windows."]


def hf_config(variant: str, **changes):
    return transformers.ModernBertConfig(**{**TINY, **VARIANTS[variant], **changes})


def random_hf(cls, cfg, seed: int = 0):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    perturb_norms(model, seed=seed)
    with torch.no_grad():                     # sharper attention than the init's: each key's weight shows
        for layer in model.base_model.layers:
            layer.attn.Wqkv.weight.mul_(4.0)
    if hasattr(model, "classifier"):          # logits far enough apart that fp32 noise cannot flip an argmax
        with torch.no_grad():
            model.classifier.weight.mul_(20.0)
    return model


def hf_hidden(model, lengths, impl: str):
    """transformers' output on the padded batch of random ids (attention `impl`), and the id lists."""
    ids, mask, seqs = ragged_ids(lengths, (5, model.config.vocab_size), model.config.pad_token_id)
    model.config._attn_implementation = impl
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    return out, seqs


def bpe_tokenizer(folder: Path) -> None:
    """A ModernBERT-style byte-level BPE (tokenizer.json with [CLS] ... [SEP]) trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"] - 8, special_tokens=list(SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    assert all(tok.token_to_id(t) == i for t, i in SPECIALS.items())
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]",
                                                sep_token="[SEP]", pad_token="[PAD]", mask_token="[MASK]")
    fast.save_pretrained(folder)


@pytest.fixture(scope="module", params=list(VARIANTS))
def encoder_folder(request, tmp_path_factory):
    """(folder, transformers model) of a random ModernBertModel saved with save_pretrained."""
    model = random_hf(transformers.ModernBertModel, hf_config(request.param))
    folder = tmp_path_factory.mktemp(f"modernbert-{request.param}")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module", params=list(VARIANTS))
def classifier_folder(request, tmp_path_factory):
    model = random_hf(transformers.ModernBertForSequenceClassification, hf_config(request.param, num_labels=3))
    folder = tmp_path_factory.mktemp(f"modernbert-cls-{request.param}")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """A sentence-transformers folder: the HF folder (with tokenizer.json) + mean Pooling."""
    folder = tmp_path_factory.mktemp("modernbert-st")
    random_hf(transformers.ModernBertModel, hf_config("released"), seed=3).save_pretrained(folder)
    bpe_tokenizer(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return folder


# ---- the mapping --------------------------------------------------------------------------------------------

def test_released_config_maps_to_the_base_preset():
    """answerdotai/ModernBERT-base's config.json (transformers 4.x keys, BERT-era leftovers included)."""
    d = dict(architectures=["ModernBertForMaskedLM"], model_type="modernbert", vocab_size=50368, hidden_size=768,
             intermediate_size=1152, num_hidden_layers=22, num_attention_heads=12, hidden_activation="gelu",
             max_position_embeddings=8192, norm_eps=1e-5, norm_bias=False, layer_norm_eps=1e-5,
             position_embedding_type="absolute", pad_token_id=50283, attention_bias=False, mlp_bias=False,
             local_attention=128, global_attn_every_n_layers=3, global_rope_theta=160000.0,
             local_rope_theta=10000.0, classifier_pooling="mean", classifier_bias=False, embedding_dropout=0.0,
             reference_compile=True, deterministic_flash_attn=False, sparse_prediction=False, decoder_bias=True)
    assert family_of(d).name == "modernbert"
    assert config_from_hf(d) == preset("modernbert-base", head_pooling="mean")
    cfg = preset("modernbert-base")
    assert [cfg.window_of_layer(i) for i in range(4)] == [0, 64, 64, 0]
    assert [cfg.rotary_of_layer(i).base for i in range(4)] == [160000.0, 10000.0, 10000.0, 160000.0]


def test_transformers5_config_keys_map_the_same():
    """layer_types / rope_parameters (transformers >= 5) state what the 4.x keys state."""
    d = hf_config("released").to_dict()
    cfg = config_from_hf(d)
    old = {k: v for k, v in d.items() if k not in ("layer_types", "rope_parameters")}
    assert config_from_hf(old) == cfg
    assert (cfg.local_window, cfg.global_every, cfg.rotary.base, cfg.rotary_local.base) == (8, 3, 160000.0, 10000.0)


@pytest.mark.parametrize("changes", [{}, dict(global_every=2), dict(global_every=0),
                                     dict(local_window=0, global_every=0, rotary_local=None)])
def test_to_hf_config_round_trips(changes):
    """EncoderConfig -> ModernBertConfig -> config.json -> the same EncoderConfig (every layer pattern)."""
    from packformer.families.modernbert import to_hf_config

    cfg = preset("modernbert-base", **changes)
    assert config_from_hf(to_hf_config(cfg).to_dict()) == cfg


@pytest.mark.parametrize("changes,match", [
    (dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    (dict(classifier_activation="tanh"), "classifier_activation 'tanh'"),
    (dict(classifier_pooling="max"), "classifier_pooling 'max'"),
    (dict(layer_types=["sliding_attention", "full_attention", "sliding_attention"]), "layer_types"),
    (dict(global_attn_every_n_layers=2), "two layer patterns"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
     "rope_type 'linear'"),
    (dict(hidden_activation="gelu_fast"), "hidden_activation 'gelu_fast'"),
])
def test_unsupported_options_are_named(changes, match):
    d = {**hf_config("released").to_dict(), **changes}
    with pytest.raises(ValueError, match=match):
        config_from_hf(d)


# ---- against transformers -----------------------------------------------------------------------------------

def test_hidden_states_match_transformers(encoder_folder):
    folder, model = encoder_folder
    eager, seqs = hf_hidden(model, LENGTHS, "eager")
    sdpa, _ = hf_hidden(model, LENGTHS, "sdpa")
    ref = packed_reference(eager.last_hidden_state, LENGTHS)
    assert (packed_reference(sdpa.last_hidden_state, LENGTHS) - ref).abs().max() < 1e-5
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    print(f"max |ours - transformers| {errs}")


def test_masked_lm_checkpoint_loads_as_its_encoder(tmp_path):
    """The released checkpoints are ModernBertForMaskedLM: `model.*` is the encoder; the prediction head
    (`head.*`) and the tied `decoder` are left out."""
    model = random_hf(transformers.ModernBertForMaskedLM, hf_config("released"), seed=2)
    model.save_pretrained(tmp_path)
    out, seqs = hf_hidden(model.model, LENGTHS, "sdpa")
    check_hidden_states(tmp_path, packed_reference(out.last_hidden_state, LENGTHS), seqs, paths=("reference",))


def test_the_comparison_sees_the_window_edge_and_the_bases(encoder_folder):
    """The same weights with a window one narrower or wider (|i - j| <= 7 or 9), or with one rotary base on
    every layer, miss transformers by far more than the tolerance above."""
    folder, model = encoder_folder
    eager, seqs = hf_hidden(model, LENGTHS, "eager")
    ref = packed_reference(eager.last_hidden_state, LENGTHS)
    tol = 1e-4 * max(1.0, ref.abs().max().item())
    m = packformer.load(folder, device="cpu", fast=False)
    local = [layer for layer in m.encoder.layers if layer.window]
    assert [layer.window for layer in local] == [8, 8]
    for w in (7, 9):
        for layer in local:
            layer.window = w
        assert (run_packed(m, seqs) - ref).abs().max() > 10 * tol, f"window {w} is not told apart from 8"
    for layer in local:
        layer.window = 8
    for rot in (m.config.rotary, m.config.rotary_local):
        for layer in m.encoder.layers:
            layer.rotary = rot
        assert (run_packed(m, seqs) - ref).abs().max() > 10 * tol, f"base {rot.base} on every layer passes"


def test_classifier_logits_match_transformers(classifier_folder):
    folder, model = classifier_folder
    out, seqs = hf_hidden(model, LENGTHS, "eager")
    for fast in (False, True):
        m = packformer.load(folder, device="cpu", fast=fast)
        assert m.head.pooling == model.config.classifier_pooling
        got = m.classify_batch(m.pack_ids(seqs))
        assert torch.equal(got.argmax(-1), out.logits.argmax(-1))
        err = (got - out.logits).abs().max().item()
        assert err <= 1e-4 * max(1.0, out.logits.abs().max().item()), f"fast={fast}: logits off by {err:.3g}"


# ---- tokenizer and sentence-transformers --------------------------------------------------------------------

def test_tokenizer_json_ids_and_positions(st_folder):
    from tokenizers import Tokenizer

    m = packformer.load(st_folder, device="cpu")
    want = [e.ids for e in Tokenizer.from_file(str(st_folder / "tokenizer.json")).encode_batch(TEXTS[:2])]
    assert m.token_ids(TEXTS[:2]) == want and want[0][0] == SPECIALS["[CLS]"] and want[0][-1] == SPECIALS["[SEP]"]
    batch = m.tokenize(TEXTS[:2])
    assert batch.positions.tolist() == list(range(len(want[0]))) + list(range(len(want[1])))
    assert m.encoder.embeddings.token_type is None and m.encoder.embeddings.position is None


def test_sentence_transformers_encode(st_folder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(st_folder), device="cpu").encode(TEXTS)
    for fast in (False, True):
        got = packformer.load(st_folder, device="cpu", fast=fast).encode(TEXTS)
        assert np.abs(got - ref).max() <= 1e-5, f"fast={fast}: {np.abs(got - ref).max():.3g}"


# ---- batching, dtypes, int8 ---------------------------------------------------------------------------------

def test_alone_equals_batched(encoder_folder):
    folder, model = encoder_folder
    _, seqs = hf_hidden(model, LENGTHS, "sdpa")
    check_alone_equals_batched(folder, seqs, fast=True)


def test_bfloat16_and_int8_run(st_folder):
    fp32 = packformer.load(st_folder, device="cpu").encode(TEXTS, convert_to_tensor=True)
    bf16 = packformer.load(st_folder, device="cpu", dtype="bfloat16").encode(TEXTS, convert_to_tensor=True)
    int8 = packformer.load(st_folder, device="cpu", quantize="int8").encode(TEXTS, convert_to_tensor=True)
    for name, got in (("bfloat16", bf16), ("int8", int8)):
        assert torch.isfinite(got).all()
        cos = torch.nn.functional.cosine_similarity(got.float(), fp32, dim=-1)
        assert cos.min() >= 0.99, f"{name}: cosine {cos.min():.4f}"


# ---- random presets and the transformers peer -----------------------------------------------------------------

def test_random_preset_and_its_transformers_peer():
    """random:modernbert-base (the real shapes) and bench.convert.to_hf of it agree on hidden states and
    logits, on lengths both sides of the real window's edge (64: a 66-token sequence has a pair 65 apart)."""
    from packformer.bench.convert import to_hf
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    m = packformer.load("random:modernbert-base", device="cpu", num_labels=2)
    assert m.config.family == "modernbert" and m.encoder.layers[0].norm1 is None
    with no_init_weights():   # to_hf overwrites every weight: skip transformers' slow truncated-normal init
        peer = to_hf(m.encoder, m.head, with_head=True)
    lengths = [3, 65, 66]
    ids, mask, seqs = ragged_ids(lengths, m.config.regular_id_range(), m.config.pad_token_id)
    seen = []
    peer.model.register_forward_hook(lambda mod, args, out: seen.append(out.last_hidden_state))
    with torch.no_grad():
        logits = peer(input_ids=ids, attention_mask=mask).logits
    ref = packed_reference(seen[0], lengths)
    batch = m.pack_ids(seqs)
    got = m.hidden_states(batch)
    assert (got - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert (m.head(got, batch.cu_seqlens) - logits).abs().max() <= 1e-4
    large = preset("modernbert-large")
    assert (large.hidden_size, large.num_layers, large.num_heads, large.intermediate_size) == (1024, 28, 16, 2624)


# ---- CUDA ---------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp16_fast_path_against_the_cpu_reference(tmp_path):
    """fp16 CUDA fast path vs the fp32 CPU reference, on lengths past several of the kernel's key blocks."""
    lengths = LENGTHS + [130, 300]
    cfg = dict(max_position_embeddings=512)
    enc = random_hf(transformers.ModernBertModel, hf_config("released", **cfg))
    enc.save_pretrained(tmp_path / "enc")
    cls = random_hf(transformers.ModernBertForSequenceClassification, hf_config("released", num_labels=3, **cfg))
    cls.save_pretrained(tmp_path / "cls")
    _, _, seqs = ragged_ids(lengths, (5, TINY["vocab_size"]), TINY["pad_token_id"])

    ref = packformer.load(tmp_path / "enc", device="cpu", fast=False)
    gpu = packformer.load(tmp_path / "enc", device="cuda", dtype="float16", fast=True)
    want, got = run_packed(ref, seqs), run_packed(gpu, seqs)
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)                 # [T]
    assert cos.min() >= 0.9995, f"worst token cosine {cos.min():.5f}"

    ref = packformer.load(tmp_path / "cls", device="cpu", fast=False)
    gpu = packformer.load(tmp_path / "cls", device="cuda", dtype="float16", fast=True)
    want = ref.classify_batch(ref.pack_ids(seqs))
    got = gpu.classify_batch(gpu.pack_ids(seqs)).cpu()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
