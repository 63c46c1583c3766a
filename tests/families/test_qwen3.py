"""Qwen3 (Qwen3-Embedding) against transformers' Qwen3Model and sentence-transformers.

A tiny real-shaped config: 2 layers, 4 query heads sharing 2 kv heads (grouped-query attention), head size
24 (not hidden / heads = 16), causal attention, q/k RMSNorms, SwiGLU, rotary base 1e6. The sentence-
transformers folder pools the last token (the EOS the tokenizer appends) and normalizes, as Qwen3-Embedding's."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import packformer
from packformer.config import preset
from packformer.families import family_of
from packformer.families.qwen3 import config_from_hf
from packformer.model import Encoder

from .harness import check_alone_equals_batched, check_hidden_states, packed_reference, perturb_norms, ragged_ids

transformers = pytest.importorskip("transformers")

LENGTHS = [1, 2, 9, 17, 40, 3]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=24, max_position_embeddings=128, rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=0)
CORPUS = ["Hello world", "What is the capital of China?", "The capital of China is Beijing.", "yes", "no",
          "Explain gravity", "Gravity is a force that attracts two bodies towards each other.", "yes no yes no"]
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:"
TEXTS = ["What is the capital of China?", "a", "Gravity is a force that attracts two bodies " * 8, "Explain gravity"]


def random_qwen3(cls=None, seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = (cls or transformers.Qwen3Model)(transformers.Qwen3Config(**{**TINY, **changes})).eval()
    perturb_norms(model, seed=seed)
    with torch.no_grad():                      # sharper attention than the init's: each key's weight shows
        for layer in model.base_model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def bpe_tokenizer(folder: Path, eos: bool = True) -> None:
    """A Qwen-style byte-level BPE whose post-processor appends <|endoftext|> (as Qwen3-Embedding's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"] - 8, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>", pair="$A $B <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", 0)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")
    fast.save_pretrained(folder)


def st_folder(folder: Path, model, max_seq_length: int = 20) -> Path:
    """A Qwen3-Embedding-style sentence-transformers folder: lasttoken Pooling + Normalize, prompts."""
    model.save_pretrained(folder)
    bpe_tokenizer(folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                                  "do_lower_case": False}))
    (folder / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None,
         "similarity_fn_name": "cosine"}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": TINY["hidden_size"], "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": True,
         "include_prompt": True}))
    (folder / "2_Normalize").mkdir()
    return folder


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    model = random_qwen3()
    folder = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def embedding_folder(tmp_path_factory):
    return st_folder(tmp_path_factory.mktemp("qwen3-st"), random_qwen3(seed=3))


def hf_reference(model, lengths):
    ids, mask, seqs = ragged_ids(lengths, (5, model.config.vocab_size), pad_id=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    return packed_reference(out, lengths), seqs


# ---- the mapping -------------------------------------------------------------------------------------------
def test_config_states_causal_gqa_rms_layers_with_their_own_head_size():
    cfg = config_from_hf(transformers.Qwen3Config(**TINY).to_dict())
    assert (cfg.family, cfg.causal, cfg.norm_kind, cfg.qk_norm, cfg.ffn_kind, cfg.activation) == \
        ("qwen3", True, "rms", True, "glu", "silu")
    assert (cfg.head_dim, cfg.kv_heads, cfg.qkv_size) == (24, 2, (4 + 2 * 2) * 24)
    assert cfg.rotary.base == 1_000_000.0 and not cfg.linear_bias and cfg.position_embedding == "none"
    assert family_of({"model_type": "qwen3"}).name == "qwen3"


@pytest.mark.parametrize("key,value,match", [
    ("use_sliding_window", True, "use_sliding_window"),
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}, "rope_type 'yarn'"),
    ("architectures", ["Qwen3ForSequenceClassification"], "architectures"),
])
def test_unsupported_options_are_named(key, value, match):
    d = transformers.Qwen3Config(**TINY).to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=match):
        config_from_hf(d)


# ---- hidden states -----------------------------------------------------------------------------------------
def test_hidden_states_equal_transformers_on_both_cpu_paths(encoder_folder):
    folder, model = encoder_folder
    ref, seqs = hf_reference(model, LENGTHS)
    errs = check_hidden_states(folder, ref, seqs, atol=1e-4)
    assert max(errs.values()) < 1e-4


def test_attention_bias_variant_loads_and_matches(tmp_path):
    model = random_qwen3(seed=5, attention_bias=True)
    model.save_pretrained(tmp_path)
    ref, seqs = hf_reference(model, [4, 11])
    check_hidden_states(tmp_path, ref, seqs, atol=1e-4)


def test_causal_lm_folder_loads_the_base_model_and_ignores_the_lm_head(tmp_path):
    lm = random_qwen3(transformers.Qwen3ForCausalLM, seed=2, tie_word_embeddings=False)
    lm.save_pretrained(tmp_path)
    ref, seqs = hf_reference(lm.model, [5, 12])
    check_hidden_states(tmp_path, ref, seqs, atol=1e-4, paths=("fast",))


def test_alone_equals_batched_in_fp32_bf16_and_int8(encoder_folder):
    folder, _ = encoder_folder
    _, _, seqs = ragged_ids(LENGTHS, (5, TINY["vocab_size"]), pad_id=0)
    check_alone_equals_batched(folder, seqs)
    check_alone_equals_batched(folder, seqs, dtype="bfloat16")
    check_alone_equals_batched(folder, seqs, quantize="int8")


def test_long_sequences_give_the_same_bits_alone_and_batched(encoder_folder):
    """Batches of thousands of FFN elements per row split ATen's elementwise kernels between threads:
    the GLU activation must still give a row the same bits alone and batched."""
    folder, _ = encoder_folder
    _, _, seqs = ragged_ids([127, 101, 88, 128, 119, 98], (5, TINY["vocab_size"]), pad_id=0, seed=2)
    check_alone_equals_batched(folder, seqs)


def test_bf16_and_int8_stay_close_to_fp32(embedding_folder):
    ref = packformer.load(embedding_folder).encode(TEXTS)
    for kw in ({"dtype": "bfloat16"}, {"quantize": "int8"}):
        got = packformer.load(embedding_folder, **kw).encode(TEXTS)
        assert (got * ref).sum(1).min() >= 0.99, kw


# ---- sentence-transformers ---------------------------------------------------------------------------------
def test_encode_equals_sentence_transformers_with_last_token_pooling(embedding_folder):
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(embedding_folder), device="cpu").encode(TEXTS)
    for fast in (False, True):
        m = packformer.load(embedding_folder, fast=fast)
        assert m.pooler.mode == "last" and m.pooler.normalize
        got = m.encode(TEXTS)
        assert np.abs(got - ref).max() <= 1e-4, fast


def test_over_long_inputs_keep_their_eos_as_sentence_transformers_truncates(embedding_folder):
    st = pytest.importorskip("sentence_transformers")
    m = packformer.load(embedding_folder)
    eos = m.tokenizer.tok.token_to_id("<|endoftext|>")
    ids = m.token_ids([TEXTS[2]])[0]
    assert len(ids) == m.max_seq_length == 20 and ids[-1] == eos
    ref_model = st.SentenceTransformer(str(embedding_folder), device="cpu")
    assert ref_model.tokenize([TEXTS[2]])["input_ids"][0].tolist() == ids
    assert np.abs(m.encode([TEXTS[2]]) - ref_model.encode([TEXTS[2]])).max() <= 1e-4


def test_query_prompt_from_the_folder_equals_sentence_transformers(embedding_folder):
    st = pytest.importorskip("sentence_transformers")
    m = packformer.load(embedding_folder)
    ref = st.SentenceTransformer(str(embedding_folder), device="cpu").encode(TEXTS, prompt_name="query")
    got = m.encode(TEXTS, prompt_name="query")
    assert np.abs(got - ref).max() <= 1e-4
    assert np.abs(got - m.encode([QUERY_PROMPT + t for t in TEXTS])).max() <= 1e-6


def test_server_embeds_with_prompts_over_tei_and_openai_as_encode(embedding_folder):
    """A real `packformer serve` on the Qwen3 embedding folder: TEI's /embed (with the folder's query prompt)
    and OpenAI's /v1/embeddings through the openai client give encode()'s vectors."""
    import httpx
    openai = pytest.importorskip("openai", reason="pip install openai (the [dev] extra has it)")
    from packformer.bench.launch import ServerProcess

    m = packformer.load(embedding_folder)
    with ServerProcess([str(embedding_folder), "--max-batch-tokens", "256", "--auto-truncate", "--log-level",
                        "warning"]) as srv:                # TEXTS[2] is over the folder's max_seq_length
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            assert http.get("/info").json()["model_type"] == "embedding"
            got = np.array(http.post("/embed", json={"inputs": TEXTS}).json())
            assert np.abs(got - m.encode(TEXTS)).max() <= 1e-5
            got = np.array(http.post("/embed", json={"inputs": TEXTS, "prompt_name": "query"}).json())
            assert np.abs(got - m.encode(TEXTS, prompt_name="query")).max() <= 1e-5
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", timeout=60)
        res = client.embeddings.create(model="qwen3", input=TEXTS)
        got = np.array([d.embedding for d in res.data])
        assert np.abs(got - m.encode(TEXTS)).max() <= 1e-5


# ---- presets and the benchmark peer --------------------------------------------------------------------------
def test_preset_has_qwen3_embedding_0_6b_shapes():
    cfg = preset("qwen3-embedding-0.6b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.intermediate_size,
            cfg.vocab_size, cfg.rotary.base, cfg.layer_norm_eps) == (1024, 28, 16, 8, 128, 3072, 151669, 1e6, 1e-6)
    hf = family_of({"model_type": "qwen3"}).to_hf_config(cfg)
    assert config_from_hf(hf.to_dict()).replace(pad_token_id=cfg.pad_token_id,
                                                max_position_embeddings=cfg.max_position_embeddings) == cfg


def test_to_hf_of_a_random_preset_reproduces_our_hidden_states():
    from packformer.bench.convert import to_hf
    from packformer.loaders.parts import ModelParts
    from packformer.heads import Pooler

    cfg = preset("qwen3-embedding-0.6b", vocab_size=512, num_layers=2, pad_token_id=0)
    torch.manual_seed(0)
    enc = Encoder(cfg).eval()
    with torch.no_grad():                 # norms off the identity; the family's absent biases stay zero
        for n, p in enc.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model = packformer.engine.Model(ModelParts(cfg, enc, None, Pooler("last", True), None, 64, "random", "random"))
    hf = to_hf(model.encoder)
    ids, mask, seqs = ragged_ids([3, 17, 30], (4, 511), pad_id=0)
    with torch.no_grad():
        ref = packed_reference(hf(input_ids=ids, attention_mask=mask).last_hidden_state, [3, 17, 30])
    got = model.hidden_states(model.pack_ids(seqs))
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


# ---- GPU ---------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_bf16_fast_path_matches_the_fp32_cpu_reference(encoder_folder):
    folder, _ = encoder_folder
    _, _, seqs = ragged_ids(LENGTHS + [128, 64, 65], (5, TINY["vocab_size"]), pad_id=0)   # max 128 positions
    ref = packformer.load(folder, device="cpu", fast=False)
    want = ref.hidden_states(ref.pack_ids(seqs)).float()
    gpu = packformer.load(folder, device="cuda")
    assert gpu.dtype == torch.bfloat16                     # the decoder families' GPU default
    got = gpu.hidden_states(gpu.pack_ids(seqs)).float().cpu()
    cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cos.min().item() >= 0.999, cos.min().item()
