"""GTE v1.5 / mGTE (model_type "new") as specifications.

GTE is remote code with no transformers class for these checkpoints: the peer is a transcription of
Alibaba-NLP/new-impl's modeling.py (ref_gte.py), whose random weights are saved as a real checkpoint
(config.json shaped like gte-base-en-v1.5's, model.safetensors with the checkpoint's key names) and loaded
by packformer."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import packformer
from packformer.bench import convert
from packformer.bench.run import run_bench
from packformer.config import preset
from packformer.families import family_of
from packformer.families.gte import config_from_hf
from packformer.heads import ClassificationHead
from packformer.loading import builtin_model_dir, load_parts
from packformer.ops.rotary import RotaryConfig
from tests.families import ref_gte as ref
from tests.families.harness import (check_alone_equals_batched, check_hidden_states, ragged_ids, reference_folders,
                                    reference_hidden, run_packed)

SMALL = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64, vocab_size=30528,
             max_position_embeddings=96)
VARIANTS = {
    "base-en-v1.5": {},                      # no token types, rope_theta 500000 with NTK factor 2
    # gte-large-en-v1.5 / mGTE-like: token types, another base, another NTK factor or none, tanh GELU
    "token_types_ntk_3": dict(type_vocab_size=2, rope_theta=160000, rope_scaling={"type": "ntk", "factor": 3.0}),
    "no_scaling_gelu_new": dict(type_vocab_size=1, rope_theta=10000, rope_scaling=None, hidden_act="gelu_new",
                                unpad_inputs=True, use_memory_efficient_attention=True),
}
LENGTHS = [1, 2, 7, 31, 64, 96]
VOCAB = (1000, 30522)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> (folder, padded reference model, its config.json)."""
    return reference_folders(ref, SMALL, VARIANTS, tmp_path_factory)


def _reference(model, lengths, seed=1):
    return reference_hidden(ref, model, lengths, VOCAB, seed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_equal_the_remote_code_on_both_cpu_paths(folders, variant):
    folder, model, _ = folders[variant]
    want, seqs = _reference(model, LENGTHS)
    errs = check_hidden_states(folder, want, seqs, atol=1e-4)
    assert max(errs.values()) < 1e-4, errs


def test_the_transcription_agrees_with_transformers_own_port(folders, tmp_path):
    """Recent transformers ship their own GteModel (model_type "gte"), which reads the remote-code checkpoints
    through a key conversion (qkv_proj -> q/k/v, up_gate_proj -> up/gate, ...): an independent reading of the
    same modeling file. It has no NTK scaling, so the comparison runs on the variant without it."""
    import transformers

    if not hasattr(transformers, "GteModel"):
        pytest.skip(f"transformers {transformers.__version__} has no GteModel")
    src, model, _ = folders["no_scaling_gelu_new"]
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    transformers.GteConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=30528,
        max_position_embeddings=96, type_vocab_size=1, layer_norm_eps=1e-12, pad_token_id=0, hidden_act="gelu_new",
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}).save_pretrained(tmp_path)
    port = transformers.GteModel.from_pretrained(tmp_path).eval()
    ids, mask, _ = ragged_ids([1, 7, 40, 96], VOCAB, pad_id=0, seed=4)
    with torch.no_grad():
        theirs = port(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = ref.padded_forward(model, ids, mask)
    assert (theirs - ours)[mask.bool()].abs().max() < 1e-4


def test_the_checkpoint_keys_are_those_of_the_released_model(folders):
    from safetensors.torch import load_file

    keys = set(load_file(str(folders["base-en-v1.5"][0] / "model.safetensors")))
    layer0 = {k for k in keys if k.startswith("encoder.layer.0.")}
    assert layer0 == {"encoder.layer.0." + k for k in (
        "attention.qkv_proj.weight", "attention.qkv_proj.bias", "attention.o_proj.weight", "attention.o_proj.bias",
        "mlp.up_gate_proj.weight", "mlp.down_proj.weight", "mlp.down_proj.bias", "attn_ln.weight", "attn_ln.bias",
        "mlp_ln.weight", "mlp_ln.bias")}
    assert {k for k in keys if not k.startswith("encoder.")} == {
        "embeddings.word_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias"}


def test_config_maps_to_what_the_remote_code_builds(folders):
    cfg = packformer.load(folders["base-en-v1.5"][0], fast=False).config
    assert cfg.rotary == RotaryConfig(base=500000.0, scaling="ntk", scaling_factor=2.0)
    assert cfg.type_vocab_size == 0 and cfg.position_embedding == "none" and cfg.ffn_kind == "glu"
    assert cfg.activation == "gelu" and cfg.linear_bias and not cfg.norm_first and cfg.max_position_embeddings == 96
    enc = packformer.load(folders["base-en-v1.5"][0], fast=False).encoder
    assert all(torch.equal(layer.ffn1.bias, torch.zeros(2 * 64)) for layer in enc.layers)  # up_gate_proj has none


def test_a_masked_lm_checkpoint_under_new_loads_without_its_head(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    src, model, cfg = folders["base-en-v1.5"]
    state = {"new." + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    state["new.embeddings.position_ids"] = torch.arange(96)
    state["lm_head.dense.weight"] = torch.zeros(32, 32)
    state["lm_head.decoder.weight"] = state["new.embeddings.word_embeddings.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["NewForMaskedLM"]}))
    want, seqs = _reference(model, [5, 17])
    assert (run_packed(packformer.load(tmp_path, fast=False), seqs) - want).abs().max() < 1e-4


def test_classifier_logits_equal_the_remote_code(tmp_path):
    cfg = ref.config_json(**SMALL)
    model = ref.build(cfg, num_labels=3)
    folder = ref.save(model, cfg, tmp_path)
    ids, mask, seqs = ragged_ids([1, 4, 19, 60, 96], VOCAB, pad_id=0, seed=3)
    want = ref.padded_forward(model, ids, mask)                                        # [B, 3]
    for fast in (False, True):
        m = packformer.load(folder, fast=fast)
        got = m.classify_batch(m.pack_ids(seqs))
        assert (got - want).abs().max() < 1e-4, (fast, got, want)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_sentence_transformers_folder_encodes_as_the_remote_code_pools(folders, tmp_path):
    # sentence-transformers would need the remote code (trust_remote_code) to build this model, so the
    # pooled reference is computed here: the folder's tokenizer, the transcription, CLS pooling (as
    # gte-base-en-v1.5's 1_Pooling), Normalize
    from transformers import AutoTokenizer

    src, model, _ = folders["base-en-v1.5"]
    st = tmp_path / "st"
    shutil.copytree(src, st)
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (builtin_model_dir() / f).exists():
            shutil.copy(builtin_model_dir() / f, st / f)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    texts = ["what is packing?", "sequences share one row of tokens, and no padding is computed", "x"]
    enc = AutoTokenizer.from_pretrained(str(st))(texts, padding=True, return_tensors="pt")
    h = ref.padded_forward(model, enc["input_ids"], enc["attention_mask"])             # [B, L, H]
    want = torch.nn.functional.normalize(h[:, 0], dim=-1)
    for fast in (False, True):
        got = packformer.load(st, fast=fast).encode(texts)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_a_sequence_alone_equals_it_in_a_batch_and_low_precision_runs(folders):
    folder, model, _ = folders["token_types_ntk_3"]
    _, seqs = _reference(model, LENGTHS)
    check_alone_equals_batched(folder, seqs)
    fp32 = packformer.load(folder)
    want = fp32.embed_batch(fp32.pack_ids(seqs))
    bf16 = packformer.load(folder, dtype="bfloat16")
    assert torch.isfinite(bf16.embed_batch(bf16.pack_ids(seqs))).all()
    int8 = packformer.load(folder, quantize="int8")
    got = int8.embed_batch(int8.pack_ids(seqs))
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99


def test_the_presets_are_the_released_shapes_and_load_at_random():
    assert preset("gte-base-en-v1.5") == config_from_hf(ref.config_json())     # gte-base-en-v1.5's config.json
    large = ref.config_json(hidden_size=1024, num_attention_heads=16, num_hidden_layers=24, intermediate_size=4096,
                            rope_theta=160000, type_vocab_size=2)
    assert preset("gte-large-en-v1.5") == config_from_hf(large)
    m = packformer.load("random:gte-base-en-v1.5", fast=False)
    h = m.hidden_states(m.pack_ids([[101, 2054, 102], [101, 102]]))
    assert h.shape == (5, 768) and torch.isfinite(h).all()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_bench_peer_is_transformers_own_port_on_the_same_weights(folders, variant):
    """bench.convert.to_hf builds transformers' GteModel from packformer's weights, GTE's NTK scaling stated
    as its "linear" rope type on base x factor: it equals the remote code on every variant."""
    folder, model, _ = folders[variant]
    peer = convert.to_hf(load_parts(folder).encoder, attn_implementation="eager")
    ids, mask, _ = ragged_ids(LENGTHS, VOCAB, pad_id=0, seed=4)
    with torch.no_grad():
        theirs = peer(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = ref.padded_forward(model, ids, mask)
    assert (theirs - ours)[mask.bool()].abs().max() < 1e-4


def test_bench_runs_transformers_port_as_the_peer(folders, monkeypatch):
    parts = load_parts(folders["base-en-v1.5"][0])
    result = run_bench(parts, workloads="tutorial_small", peers=["hf_sdpa", "bt_nested", "packformer_ref"],
                       iterations=1, warmup=0, floor=False, log=None)
    peers = result["workloads"][0]["peers"]
    for name in ("packformer", "packformer_ref", "hf_sdpa"):
        assert peers[name]["status"] == "ok" and peers[name]["agreement"]["agrees"], peers[name]
    assert peers["bt_nested"]["status"] == "skipped" and "GLU" in peers["bt_nested"]["reason"]
    with pytest.raises(ValueError, match="no transformers classification model of the gte family"):
        convert.to_hf(parts.encoder, ClassificationHead(parts.config.hidden_size, 2), with_head=True)
    # a transformers from before GteModel (5.17 has none): the peer is skipped, saying so
    import packformer.families.gte as gte_family
    from packformer.families.base import transformers_class

    monkeypatch.setattr(gte_family, "transformers_class", lambda name: transformers_class(name + "FromTheFuture"))
    result = run_bench(parts, workloads="tutorial_small", peers=["hf_sdpa"], iterations=1, warmup=0, floor=False,
                       log=None)
    skipped = result["workloads"][0]["peers"]["hf_sdpa"]
    assert skipped["status"] == "skipped", skipped
    assert re.search(r"no transformers peer for this model: transformers \S+ has no GteConfigFromTheFuture",
                     skipped["reason"]), skipped


@pytest.mark.parametrize("changes, match", [
    (dict(logn_attention_scale=True), "logn_attention_scale"),
    (dict(layer_norm_type="rms_norm"), "layer_norm_type"),
    (dict(position_embedding_type="absolute"), "position_embedding_type"),
    (dict(pack_qkv=False), "pack_qkv"),
    (dict(rope_scaling={"type": "ntk", "factor": 2.0, "mixed_b": 0.5}), "rope_scaling"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(hidden_act="quick_gelu"), "hidden_act"),
])
def test_unsupported_options_are_refused_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(ref.config_json(**{**SMALL, **changes}))


@pytest.mark.gpu
def test_cuda_fp16_fast_path_agrees_with_the_cpu_reference(folders, tmp_path):
    folder, model, _ = folders["base-en-v1.5"]
    _, seqs = _reference(model, LENGTHS)
    want = run_packed(packformer.load(folder, fast=False), seqs)
    got = run_packed(packformer.load(folder, device="cuda", dtype="float16"), seqs)
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.9995
    cfg = ref.config_json(**SMALL)
    clf = ref.save(ref.build(cfg, num_labels=3), cfg, tmp_path / "clf")
    cpu, gpu = packformer.load(clf, fast=False), packformer.load(clf, device="cuda", dtype="float16")
    assert torch.equal(cpu.classify_batch(cpu.pack_ids(seqs)).argmax(-1),
                       gpu.classify_batch(gpu.pack_ids(seqs)).argmax(-1).cpu())
