"""Gemma 3 text layers (EmbeddingGemma) against transformers' Gemma3TextModel and sentence-transformers.

A tiny real-shaped config: 3 layers typed [sliding, sliding, full] (the global layer is not layer 0:
global_offset 2), sliding_window 16 (bidirectional: |i - j| <= 8), 4 query heads sharing 2 kv heads, head
size 24, query_pre_attn_scalar 32 (not the head size), sandwich norms with (1 + w) weights, embeddings
times sqrt(hidden), two rotary bases. Lengths 1, 8, 9, 10, 17, 40 lie on both sides of the window edge."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import packformer
from packformer.config import preset
from packformer.families import family_of
from packformer.families.gemma3 import config_from_hf
from packformer.model import Encoder

from .harness import check_alone_equals_batched, check_hidden_states, packed_reference, perturb_norms, ragged_ids

transformers = pytest.importorskip("transformers")

LENGTHS = [1, 8, 9, 10, 17, 40, 3]
ROPE = {"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=128, sliding_window=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"], query_pre_attn_scalar=32,
            use_bidirectional_attention=True, rope_parameters=ROPE, pad_token_id=0, eos_token_id=1, bos_token_id=2)
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
TEXTS = ["Hello world", "a", "the quick brown fox jumps over the lazy dog " * 6, "EmbeddingGemma pools the mean."]


def random_gemma(seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = transformers.Gemma3TextModel(transformers.Gemma3TextConfig(**{**TINY, **changes})).eval()
    perturb_norms(model, scale=0.3, seed=seed)
    return model


def hf_reference(model, lengths, impl="eager"):
    ids, mask, seqs = ragged_ids(lengths, (4, model.config.vocab_size), pad_id=0)
    model.config._attn_implementation = impl
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return packed_reference(out, lengths), seqs


@pytest.fixture(scope="module", params=["bidirectional", "causal"])
def encoder_folder(request, tmp_path_factory):
    model = random_gemma(use_bidirectional_attention=request.param == "bidirectional")
    folder = tmp_path_factory.mktemp(f"gemma3-{request.param}")
    model.save_pretrained(folder)
    return folder, model


def bpe_tokenizer(folder: Path) -> None:
    """A BPE tokenizer that writes <bos> ... <eos>, as EmbeddingGemma's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"] - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                         pad_token="<pad>", unk_token="<unk>").save_pretrained(folder)


def _dense(folder: Path, din: int, dout: int, seed: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    (folder / "config.json").write_text(json.dumps({"in_features": din, "out_features": dout, "bias": False,
                                                    "activation_function": "torch.nn.modules.linear.Identity"}))
    save_file({"linear.weight": torch.randn(dout, din, generator=g) / din ** 0.5}, str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory):
    """EmbeddingGemma's layout: Transformer, mean Pooling, Dense 64 -> 96, Dense 96 -> 64, Normalize."""
    folder = tmp_path_factory.mktemp("gemma3-st")
    random_gemma(seed=3).save_pretrained(folder)
    bpe_tokenizer(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"},
        {"idx": 4, "name": "4", "path": "4_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 24, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False, "include_prompt": True}))
    _dense(folder / "2_Dense", 64, 96, 1)
    _dense(folder / "3_Dense", 96, 64, 2)
    (folder / "4_Normalize").mkdir()
    return folder


# ---- the mapping -------------------------------------------------------------------------------------------
def test_config_states_the_window_edge_layer_pattern_and_scales():
    cfg = config_from_hf(transformers.Gemma3TextConfig(**TINY).to_dict())
    assert cfg.family == "gemma3" and not cfg.causal and cfg.sandwich_norm and cfg.qk_norm
    assert cfg.local_window == 8                       # sliding_window 16, bidirectional: |i - j| <= 8
    assert [cfg.is_local(i) for i in range(3)] == [True, True, False]
    assert cfg.rotary.base == 1e6 and cfg.rotary_local.base == 1e4
    assert cfg.scale == 32 ** -0.5 and cfg.embedding_scale == 64 ** 0.5 and cfg.activation == "gelu_tanh"
    causal = config_from_hf(transformers.Gemma3TextConfig(**{**TINY, "use_bidirectional_attention": False}).to_dict())
    assert causal.causal and causal.local_window == 15  # i - 16 < j <= i
    released = config_from_hf({**transformers.Gemma3TextConfig(**TINY).to_dict(), "num_hidden_layers": 24,
                                "layer_types": None, "sliding_window_pattern": 6})
    assert [i for i in range(24) if not released.is_local(i)] == [5, 11, 17, 23]


@pytest.mark.parametrize("key,value,match", [
    ("attn_logit_softcapping", 50.0, "attn_logit_softcapping"),
    ("layer_types", ["full_attention", "full_attention", "sliding_attention"], "evenly spaced"),
    ("rope_scaling", {"rope_type": "linear", "factor": 8.0}, "rope_scaling"),
])
def test_unsupported_options_are_named(key, value, match):
    d = transformers.Gemma3TextConfig(**TINY).to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=match):
        config_from_hf(d)


# ---- hidden states -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_hidden_states_equal_transformers_on_both_cpu_paths(encoder_folder, impl):
    folder, model = encoder_folder
    ref, seqs = hf_reference(model, LENGTHS, impl)
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    assert max(errs.values()) < 1e-4 * max(1.0, ref.abs().max().item())


def test_a_bf16_checkpoint_folds_one_plus_w_in_fp32(tmp_path):
    """Gemma scales by 1 + w.float(): folded at load in fp32, not in the checkpoint's bf16 (where 1 + w keeps
    8 bits), so the fp32 model equals transformers' run of the same bf16 weights."""
    model = random_gemma(seed=5).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    m = packformer.load(tmp_path)
    w = model.layers[0].input_layernorm.weight
    assert torch.equal(m.encoder.layers[0].norm1.weight, 1.0 + w.float())
    hf32 = transformers.Gemma3TextModel.from_pretrained(tmp_path, dtype=torch.float32).eval()   # bf16 weights, fp32 math
    ref, seqs = hf_reference(hf32, LENGTHS)
    errs = check_hidden_states(tmp_path, ref, seqs, atol=1e-4)
    assert max(errs.values()) < 1e-4 * max(1.0, ref.abs().max().item())


def test_window_edge_is_told_apart(tmp_path):
    """A window one token wider changes the outputs of sequences longer than the window."""
    model = random_gemma(seed=4)
    model.save_pretrained(tmp_path)
    m = packformer.load(tmp_path)
    _, _, seqs = ragged_ids([17, 40], (4, 320), pad_id=0)
    base = m.hidden_states(m.pack_ids(seqs))
    m2 = packformer.load(tmp_path, fast=False)
    for layer in m2.encoder.layers:
        layer.window = layer.window + 1 if layer.window else 0
    wider = m2.hidden_states(m2.pack_ids(seqs))
    assert (wider - base).abs().max() > 1e-3


def test_alone_equals_batched_in_fp32_bf16_and_int8(encoder_folder):
    folder, _ = encoder_folder
    _, _, seqs = ragged_ids(LENGTHS, (4, TINY["vocab_size"]), pad_id=0)
    check_alone_equals_batched(folder, seqs)
    check_alone_equals_batched(folder, seqs, dtype="bfloat16")
    check_alone_equals_batched(folder, seqs, quantize="int8")


# ---- sentence-transformers ---------------------------------------------------------------------------------
def test_encode_with_dense_layers_equals_sentence_transformers(st_folder):
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(st_folder), device="cpu")
    ref = ref_model.encode(TEXTS)
    for fast in (False, True):
        m = packformer.load(st_folder, fast=fast)
        assert m.dim == 64 and len(m.pooler.dense) == 2 and m.pooler.normalize
        assert np.abs(m.encode(TEXTS) - ref).max() <= 1e-4, fast
    ids = packformer.load(st_folder).token_ids([TEXTS[2]])[0]
    assert ids == ref_model.tokenize([TEXTS[2]])["input_ids"][0].tolist() and len(ids) == 24


def test_bf16_and_int8_stay_close_to_fp32(st_folder):
    ref = packformer.load(st_folder).encode(TEXTS)
    for kw in ({"dtype": "bfloat16"}, {"quantize": "int8"}):
        got = packformer.load(st_folder, **kw).encode(TEXTS)
        assert (got * ref).sum(1).min() >= 0.99, kw


def test_dense_module_after_normalize_is_refused(st_folder, tmp_path):
    import shutil
    folder = Path(shutil.copytree(st_folder, tmp_path / "bad"))
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([modules[0], modules[1], modules[4], modules[2]]))
    with pytest.raises(ValueError, match="Dense modules must follow Pooling"):
        packformer.load(folder)


# ---- presets and the benchmark peer --------------------------------------------------------------------------
def test_preset_has_embeddinggemma_300m_shapes():
    cfg = preset("embeddinggemma-300m")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, cfg.local_window) == (768, 24, 3, 1, 256, 1152, 262144, 256)
    assert [i for i in range(24) if not cfg.is_local(i)] == [5, 11, 17, 23]
    hf = family_of({"model_type": "gemma3_text"}).to_hf_config(cfg)
    assert hf.sliding_window == 257 and hf.use_bidirectional_attention        # transformers' exclusive bound
    assert config_from_hf(hf.to_dict()) == cfg.replace(max_position_embeddings=hf.max_position_embeddings)


def test_to_hf_of_a_random_preset_reproduces_our_hidden_states():
    from packformer.bench.convert import to_hf
    from packformer.heads import Pooler
    from packformer.loaders.parts import ModelParts

    cfg = preset("embeddinggemma-300m", vocab_size=512, num_layers=6, local_window=8)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    with torch.no_grad():
        for n, p in enc.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model = packformer.engine.Model(ModelParts(cfg, enc, None, Pooler("mean", True), None, 64, "random", "random"))
    hf = to_hf(model.encoder, attn_implementation="eager")
    lengths = [3, 17, 30]
    ids, mask, seqs = ragged_ids(lengths, (4, 511), pad_id=0)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    got = model.hidden_states(model.pack_ids(seqs))
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_fast_path_matches_the_fp32_cpu_reference(encoder_folder, st_folder):
    """Hidden states of the HF folder (bidirectional windows, and causal) on lengths across the window and
    the kernel's 32-key blocks; then the sentence-transformers folder's embeddings (its inputs are cut at 24)."""
    folder = encoder_folder[0] if isinstance(encoder_folder, tuple) else encoder_folder
    _, _, seqs = ragged_ids(LENGTHS + [100, 64, 65], (4, TINY["vocab_size"]), pad_id=0)
    ref = packformer.load(folder, device="cpu", fast=False)
    want = ref.hidden_states(ref.pack_ids(seqs)).float()
    gpu = packformer.load(folder, device="cuda")
    assert gpu.dtype == torch.bfloat16                     # the decoder families' GPU default
    got = gpu.hidden_states(gpu.pack_ids(seqs)).float().cpu()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() >= 0.999, cos.min().item()
    st_ref, st_gpu = packformer.load(st_folder, device="cpu", fast=False), packformer.load(st_folder, device="cuda")
    emb = torch.nn.functional.cosine_similarity(torch.from_numpy(st_gpu.encode(TEXTS)),
                                                torch.from_numpy(st_ref.encode(TEXTS)), dim=-1)
    assert emb.min().item() >= 0.999
