"""NomicBERT (nomic-embed-text-v1 / v1.5) as specifications.

NomicBERT is remote code: the reference is a transcription of its modeling file (ref_nomic_bert.py), whose
random weights are saved as a real checkpoint (config.json shaped like nomic-embed-text-v1.5's,
model.safetensors with the checkpoint's key names) and loaded by packformer. transformers' own port
(NomicBertModel) is the bench peer where it can state the model."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import packformer
from packformer.bench import convert
from packformer.bench.run import run_bench
from packformer.config import preset
from packformer.families import family_of
from packformer.families.nomic_bert import config_from_hf
from packformer.loading import builtin_model_dir, load_parts
from tests.families import ref_nomic_bert as ref
from tests.families.harness import (check_alone_equals_batched, check_hidden_states, ragged_ids, reference_folders,
                                    reference_hidden, run_packed)

# Tiny but shaped like the release: 30522 ids padded to a multiple of 64 (30528), n_inner 80 rounded up to
# 256 by the gated MLP, 4 heads of 8 dims.
SMALL = dict(n_embd=32, n_head=4, n_layer=2, n_inner=80, vocab_size=30522, n_positions=96, max_trained_positions=48)
VARIANTS = {
    "v1.5": {},                                                    # the release: no biases, swiglu, full rotary
    "biases_half_rotary_interleaved_geglu": dict(qkv_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True,
                                                 rotary_emb_fraction=0.5, rotary_emb_interleaved=True,
                                                 activation_function="geglu"),
    "absolute_positions_gelu_mlp": dict(rotary_emb_fraction=0.0, activation_function="gelu_new", n_inner=48,
                                        qkv_proj_bias=True, mlp_fc1_bias=True, mlp_fc2_bias=True),
    # dynamic NTK only past max_trained_positions: packformer stops there
    "rotary_scaling_factor": dict(rotary_scaling_factor=2.0),
}
LENGTHS = [1, 2, 7, 31, 48, 96]
VOCAB = (1000, 30522)


def _lengths(variant: str) -> list[int]:
    return [n for n in LENGTHS if n <= 48] if variant == "rotary_scaling_factor" else LENGTHS


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> (folder, padded reference model, its config.json)."""
    return reference_folders(ref, SMALL, VARIANTS, tmp_path_factory)


def _reference(model, lengths, seed=1):
    return reference_hidden(ref, model, lengths, VOCAB, seed)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hidden_states_equal_the_remote_code_on_both_cpu_paths(folders, variant):
    folder, model, _ = folders[variant]
    want, seqs = _reference(model, _lengths(variant))
    errs = check_hidden_states(folder, want, seqs, atol=1e-4)
    assert max(errs.values()) < 1e-4, errs


def test_the_transcription_agrees_with_transformers_own_port(folders, tmp_path):
    """Recent transformers ship their own NomicBertModel, which reads the remote-code checkpoints through a key
    conversion (Wqkv -> q/k/v, fc11 -> up, fc12 -> gate, ...): an independent reading of the same modeling
    file. Where it is installed, it computes what the transcription computes (full rotary, no biases)."""
    import transformers

    if not hasattr(transformers, "NomicBertModel"):
        pytest.skip(f"transformers {transformers.__version__} has no NomicBertModel")
    src, model, _ = folders["v1.5"]
    shutil.copy(src / "model.safetensors", tmp_path / "model.safetensors")
    transformers.NomicBertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=30528,
        max_position_embeddings=96, type_vocab_size=2, layer_norm_eps=1e-12,
        rope_parameters={"rope_type": "default", "rope_theta": 1000.0}).save_pretrained(tmp_path)
    port = transformers.NomicBertModel.from_pretrained(tmp_path).eval()
    ids, mask, _ = ragged_ids([1, 7, 40, 96], VOCAB, pad_id=0, seed=4)
    with torch.no_grad():
        theirs = port(input_ids=ids, attention_mask=mask).last_hidden_state
    ours = ref.padded_forward(model, ids, mask)
    assert (theirs - ours)[mask.bool()].abs().max() < 1e-4


def test_the_checkpoint_keys_are_those_of_the_released_model(folders):
    from safetensors.torch import load_file

    keys = set(load_file(str(folders["v1.5"][0] / "model.safetensors")))
    layer0 = {k for k in keys if k.startswith("encoder.layers.0.")}
    assert layer0 == {"encoder.layers.0." + k for k in (
        "attn.Wqkv.weight", "attn.out_proj.weight", "mlp.fc11.weight", "mlp.fc12.weight", "mlp.fc2.weight",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias")}
    assert {k for k in keys if not k.startswith("encoder.")} == {
        "embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight", "emb_ln.weight",
        "emb_ln.bias"}


def test_config_maps_to_what_the_remote_code_builds(folders):
    cfg = packformer.load(folders["v1.5"][0], fast=False).config
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.max_position_embeddings) == (30528, 256, 96)
    assert cfg.ffn_kind == "glu" and cfg.activation == "silu" and not cfg.linear_bias and not cfg.norm_first
    assert cfg.rotary.base == 1000.0 and cfg.rotary.dim is None and cfg.position_embedding == "none"
    scaled = packformer.load(folders["rotary_scaling_factor"][0], fast=False)
    assert scaled.config.max_position_embeddings == 48 and scaled.max_seq_length == 48
    with pytest.raises(ValueError, match="more than the model's maximum of 48"):
        scaled.pack_ids([[1000] * 49])


def test_a_pretraining_checkpoint_under_bert_loads_without_its_mlm_head(folders, tmp_path):
    from safetensors.torch import load_file, save_file

    src, model, cfg = folders["v1.5"]
    state = {"bert." + k: v for k, v in load_file(str(src / "model.safetensors")).items()}
    state["cls.predictions.transform.dense.weight"] = torch.zeros(32, 32)
    state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "architectures": ["NomicBertForPreTraining"]}))
    want, seqs = _reference(model, [5, 17])
    assert (run_packed(packformer.load(tmp_path, fast=False), seqs) - want).abs().max() < 1e-4


def test_classifier_logits_equal_the_remote_code(tmp_path):
    cfg = ref.config_json(**SMALL)
    model = ref.build(cfg, num_labels=3)
    folder = ref.save(model, cfg, tmp_path)
    lengths = [1, 4, 19, 60, 96]
    ids, mask, seqs = ragged_ids(lengths, VOCAB, pad_id=0, seed=3)
    want = ref.padded_forward(model, ids, mask)                                        # [B, 3]
    for fast in (False, True):
        m = packformer.load(folder, fast=fast)
        assert m.config.labels() == ["LABEL_0", "LABEL_1", "LABEL_2"]
        got = m.classify_batch(m.pack_ids(seqs))
        assert (got - want).abs().max() < 1e-4, (fast, got, want)
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_sentence_transformers_folder_encodes_as_the_remote_code_pools(folders, tmp_path):
    # sentence-transformers would need the remote code (trust_remote_code) to build this model, so the
    # pooled reference is computed here: the folder's tokenizer, the transcription, mean pooling, Normalize
    from transformers import AutoTokenizer

    src, model, _ = folders["v1.5"]
    shutil.copytree(src, tmp_path / "st")
    for f in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (builtin_model_dir() / f).exists():
            shutil.copy(builtin_model_dir() / f, tmp_path / "st" / f)
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (tmp_path / "st" / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    texts = ["search_query: what is packing?", "search_document: sequences share one row of tokens, "
             "and no padding is computed", "x"]
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "st"))
    enc = tok(texts, padding=True, return_tensors="pt")
    h = ref.padded_forward(model, enc["input_ids"], enc["attention_mask"])             # [B, L, H]
    m = enc["attention_mask"][..., None].float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    for fast in (False, True):
        got = packformer.load(tmp_path / "st", fast=fast).encode(texts)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_a_sequence_alone_equals_it_in_a_batch_and_low_precision_runs(folders):
    folder, model, _ = folders["v1.5"]
    _, seqs = _reference(model, LENGTHS)
    check_alone_equals_batched(folder, seqs)
    fp32 = packformer.load(folder)
    want = fp32.embed_batch(fp32.pack_ids(seqs))
    bf16 = packformer.load(folder, dtype="bfloat16")
    assert torch.isfinite(bf16.embed_batch(bf16.pack_ids(seqs))).all()
    int8 = packformer.load(folder, quantize="int8")
    got = int8.embed_batch(int8.pack_ids(seqs))
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99


def test_the_preset_is_the_released_shape_and_loads_at_random():
    released = config_from_hf(ref.config_json())          # nomic-embed-text-v1.5's config.json shape
    assert preset("nomic-embed-text-v1.5") == released.replace(max_position_embeddings=2048)  # the trained length
    m = packformer.load("random:nomic-embed-text-v1.5", fast=False)
    h = m.hidden_states(m.pack_ids([[101, 2054, 102], [101, 102]]))
    assert h.shape == (5, 768) and torch.isfinite(h).all()


def test_the_bench_peer_is_transformers_own_port_where_it_states_the_model(folders):
    """bench.convert.to_hf builds transformers' NomicBertModel from packformer's weights for the released
    layout (no biases, SwiGLU, full rotary): it equals the remote code; the bench runs it as the hf peer.
    Variants the port cannot state (biases, partial or interleaved rotary) are skipped with the reason."""
    folder, model, _ = folders["v1.5"]
    parts = load_parts(folder)
    peer = convert.to_hf(parts.encoder, attn_implementation="eager")
    ids, mask, _ = ragged_ids([1, 7, 40, 96], VOCAB, pad_id=0, seed=4)
    with torch.no_grad():
        theirs = peer(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (theirs - ref.padded_forward(model, ids, mask))[mask.bool()].abs().max() < 1e-4
    result = run_bench(parts, workloads="tutorial_small", peers=["hf_sdpa", "bt_nested", "packformer_ref"],
                       iterations=1, warmup=0, floor=False, log=None)
    peers = result["workloads"][0]["peers"]
    for name in ("packformer", "packformer_ref", "hf_sdpa"):
        assert peers[name]["status"] == "ok" and peers[name]["agreement"]["agrees"], peers[name]
    assert peers["bt_nested"]["status"] == "skipped" and "rotary" in peers["bt_nested"]["reason"]
    other = load_parts(folders["biases_half_rotary_interleaved_geglu"][0])
    with pytest.raises(ValueError, match="no NomicBertConfig states this model"):
        convert.to_hf(other.encoder)
    result = run_bench(other, workloads="tutorial_small", peers=["hf_sdpa"], iterations=1, warmup=0,
                       floor=False, log=None)
    skipped = result["workloads"][0]["peers"]["hf_sdpa"]
    assert skipped["status"] == "skipped" and "no NomicBertConfig states this model" in skipped["reason"], skipped


@pytest.mark.parametrize("changes, match", [
    (dict(prenorm=True), "prenorm"),
    (dict(rotary_emb_scale_base=512), "rotary_emb_scale_base"),
    (dict(activation_function="glu"), "activation_function 'glu'"),
    (dict(qkv_proj_bias=True), "bias mix"),
    (dict(num_heads_kv=2), "num_heads_kv"),
    (dict(rotary_emb_fraction=0.3), "rotary_emb_fraction"),
    (dict(moe_every_n_layers=2), "moe_every_n_layers"),
])
def test_unsupported_options_are_refused_by_name(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(ref.config_json(**{**SMALL, **changes}))


def test_a_config_written_for_transformers_own_class_is_refused():
    with pytest.raises(ValueError, match="hidden_size instead of n_embd"):
        config_from_hf({"model_type": "nomic_bert", "hidden_size": 768, "num_hidden_layers": 12})


@pytest.mark.gpu
def test_cuda_fp16_fast_path_agrees_with_the_cpu_reference(folders, tmp_path):
    folder, model, _ = folders["v1.5"]
    _, seqs = _reference(model, LENGTHS)
    want = run_packed(packformer.load(folder, fast=False), seqs)
    got = run_packed(packformer.load(folder, device="cuda", dtype="float16"), seqs)
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.9995
    cfg = ref.config_json(**SMALL)
    clf = ref.save(ref.build(cfg, num_labels=3), cfg, tmp_path / "clf")
    cpu, gpu = packformer.load(clf, fast=False), packformer.load(clf, device="cuda", dtype="float16")
    assert torch.equal(cpu.classify_batch(cpu.pack_ids(seqs)).argmax(-1),
                       gpu.classify_batch(gpu.pack_ids(seqs)).argmax(-1).cpu())
