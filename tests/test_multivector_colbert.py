"""ColBERT-style multi-vector folders (sentence-transformers MultiVectorEncoder, PyLate v3) against
MultiVectorEncoder.encode_query / encode_document on the same random weights."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch

import packformer
from packformer.colbert import MultiVectorModel
from packformer.ops.attention import AttentionMeta, varlen_attention, varlen_attention_ref
from tests.output_folders import TINY, perturb

QUERIES = ["hello world", "what is the capital of france, and why?", "x",
           "a much longer query with many words that goes past the expansion length of the model"]
DOCS = ["Paris is the capital of France.", "x", "some document text; with: punctuation!! (and brackets)",
        "word " * 40]


def bert_folder(root):
    import transformers

    from packformer.loading import builtin_model_dir

    path = root / "bert"
    if not path.exists():
        tok = transformers.BertTokenizerFast.from_pretrained(str(builtin_model_dir()))
        torch.manual_seed(0)
        m = transformers.BertModel(transformers.BertConfig(max_position_embeddings=128, **TINY)).eval()
        perturb(m, 0)
        m.save_pretrained(str(path))
        tok.save_pretrained(str(path))
    return path


def mve_folder(root, name, expansion=None, document_length=24, query_length=None, skiplist=True, dense_bias=False,
               prompts=None):
    """A MultiVectorEncoder(Transformer + Dense + MultiVectorMask + Normalize) saved by sentence-transformers."""
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    t = Transformer(str(bert_folder(root)), document_length=document_length, query_length=query_length,
                    query_expansion=expansion)
    torch.manual_seed(1)
    d = Dense(32, 16, bias=dense_bias, activation_function=torch.nn.Identity(), module_input_name="token_embeddings")
    enc = MultiVectorEncoder(modules=[t, d, MultiVectorMask(skiplist_words=list(string.punctuation) if skiplist else None),
                                      Normalize(module_input_name="token_embeddings")],
                             prompts={"query": "[Q] ", "document": "[D] "} if prompts is None else prompts)
    enc.save(str(root / name))
    return root / name


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("colbert")


def _compare(folder, queries=QUERIES, docs=DOCS, exact=True, **load_kw):
    from sentence_transformers import MultiVectorEncoder

    ref = MultiVectorEncoder(str(folder), device="cpu")
    ours = packformer.load(folder, **load_kw)
    assert isinstance(ours, MultiVectorModel)
    worst = 0.0
    for fn, texts in (("encode_query", queries), ("encode_document", docs)):
        want, got = getattr(ref, fn)(texts), getattr(ours, fn)(texts)
        assert len(want) == len(got) == len(texts)
        for w, g in zip(want, got):
            assert tuple(g.shape) == tuple(w.shape), (fn, g.shape, w.shape)
            worst = max(worst, (g - w).abs().max().item())
        for i, t in enumerate(texts):     # alone == batched: bit for bit on the CPU fast path
            alone = getattr(ours, fn)(t)
            assert torch.equal(alone, got[i]) if exact else (alone - got[i]).abs().max().item() <= 1e-6
    assert worst <= 1e-5, worst
    return ours, ref


CONFIGS = {
    "fixed_no_attend": dict(expansion={"strategy": "fixed", "attend": False, "length": 12}),
    "fixed_attend": dict(expansion={"strategy": "fixed", "attend": True, "length": 12}),
    "min_no_attend": dict(expansion={"strategy": "min", "attend": False, "length": 10}, query_length=20),
    "no_expansion": dict(expansion=None, query_length=8),
    "dense_bias_no_skiplist": dict(expansion={"strategy": "fixed", "attend": False, "length": 16}, dense_bias=True,
                                   skiplist=False),
}


def modernbert_colbert_folder(root):
    """GTE-ModernColBERT's shape in small: a ModernBERT backbone (a +-4 window on two layers of three) under
    Dense + MultiVectorMask + Normalize, with BERT's WordPiece ids."""
    import transformers
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    from packformer.loading import builtin_model_dir

    tok = transformers.BertTokenizerFast.from_pretrained(str(builtin_model_dir()))
    cfg = transformers.ModernBertConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                        num_attention_heads=2, max_position_embeddings=128, local_attention=8,
                                        global_attn_every_n_layers=3, pad_token_id=0, cls_token_id=101,
                                        sep_token_id=102, bos_token_id=101, eos_token_id=102)
    torch.manual_seed(0)
    m = transformers.ModernBertModel(cfg).eval()
    perturb(m, 0)
    m.save_pretrained(str(root / "modernbert"))
    tok.save_pretrained(str(root / "modernbert"))
    t = Transformer(str(root / "modernbert"), document_length=24,
                    query_expansion={"strategy": "fixed", "attend": False, "length": 12})
    torch.manual_seed(1)
    d = Dense(32, 16, bias=False, activation_function=torch.nn.Identity(), module_input_name="token_embeddings")
    enc = MultiVectorEncoder(modules=[t, d, MultiVectorMask(skiplist_words=list(string.punctuation)),
                                      Normalize(module_input_name="token_embeddings")],
                             prompts={"query": "[Q] ", "document": "[D] "})
    enc.save(str(root / "modernbert-colbert"))
    return root / "modernbert-colbert"


def test_a_modernbert_backbone_equals_multivectorencoder(root):
    """Local windows, rotary positions and the expansion tokens' visible-key prefix together."""
    _compare(modernbert_colbert_folder(root))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_outputs_equal_multivectorencoder(root, name):
    _compare(mve_folder(root, name, **CONFIGS[name]))


def test_reference_path_equals_multivectorencoder(root):
    # the readable reference encoder runs torch's GEMMs, whose rounding may move with the batch's rows
    _compare(mve_folder(root, "ref_path", **CONFIGS["fixed_no_attend"]), exact=False, fast=False)


def test_query_expansion_fills_to_length_and_document_drops_punctuation(root):
    m = packformer.load(mve_folder(root, "shapes", **CONFIGS["fixed_no_attend"]))
    q = m.encode_query(["hi"], convert_to_numpy=True)[0]
    assert q.shape == (12, 16) and isinstance(q, np.ndarray)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    # [CLS] [ d ] hello , world . [SEP]: the brackets, comma and full stop are dropped
    assert len(m.encode_document("hello, world.")) == len(m.tokenizer.encode(["[D] hello, world."], 64)[0]) - 4


def test_pylate_v3_folder_matches_multivectorencoder(root):
    """PyLate <= 3: Transformer + pylate Dense listed, the lengths, prefixes and expansion at the top."""
    import shutil

    src = mve_folder(root, "for_pylate", **CONFIGS["fixed_no_attend"])
    dst = root / "pylate"
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "2_MultiVectorMask")
    shutil.rmtree(dst / "3_Normalize")
    mods = json.loads((dst / "modules.json").read_text())[:2]
    mods[1]["type"] = "pylate.models.Dense.Dense"
    (dst / "modules.json").write_text(json.dumps(mods))
    st = json.loads((dst / "sentence_bert_config.json").read_text())
    for k in ("query_expansion", "document_length", "query_length"):
        st.pop(k, None)
    (dst / "sentence_bert_config.json").write_text(json.dumps(st))
    top = json.loads((dst / "config_sentence_transformers.json").read_text())
    top.update(model_type="ColBERT", prompts={}, query_prefix="[unused0]", document_prefix="[unused1]",
               query_length=10, document_length=20, attend_to_expansion_tokens=False, do_query_expansion=True)
    (dst / "config_sentence_transformers.json").write_text(json.dumps(top))
    ours, _ = _compare(dst)
    assert ours.colbert.expansion == {"strategy": "fixed", "attend": False, "token": None, "length": 10}
    assert ours.encode_query("hi").shape == (10, 16)


def test_truncate_dim_and_encode_task_none(root):
    from sentence_transformers import MultiVectorEncoder

    folder = mve_folder(root, "trunc", **CONFIGS["fixed_attend"])
    ref, ours = MultiVectorEncoder(str(folder)), packformer.load(folder)
    for w, g in zip(ref.encode(DOCS, truncate_dim=8), ours.encode(DOCS, truncate_dim=8)):
        assert g.shape == w.shape and (g - w).abs().max().item() <= 1e-5
    for w, g in zip(ref.encode_query(QUERIES, prompt="query: "), ours.encode_query(QUERIES, prompt="query: ")):
        assert g.shape == w.shape and (g - w).abs().max().item() <= 1e-5


def test_key_lens_attention_matches_masked_reference():
    """Rows after each sequence's key_lens attend to its first key_lens rows only; nothing attends to them."""
    torch.manual_seed(0)
    lens, keys = [5, 7, 5, 3], [3, 7, 2, 3]
    t = sum(lens)
    q, k, v = (torch.randn(t, 2, 8) for _ in range(3))
    cu = torch.tensor([0, *np.cumsum(lens)], dtype=torch.int32)
    got = varlen_attention(q, k, v, AttentionMeta.build(cu, max(lens), lens, key_lens=keys))
    start = 0
    for n, kl in zip(lens, keys):
        s = slice(start, start + n)
        scores = torch.einsum("qhd,khd->hqk", q[s], k[start:start + kl]) / 8 ** 0.5
        want = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:start + kl])
        assert (got[s] - want).abs().max() <= 1e-5
        start += n
    full = varlen_attention(q, k, v, AttentionMeta.build(cu, max(lens), lens, key_lens=lens))
    assert (full - varlen_attention_ref(q, k, v, cu)).abs().max() <= 1e-5


def test_errors_name_what_is_wrong(root):
    folder = mve_folder(root, "errors", **CONFIGS["fixed_no_attend"])
    m = packformer.load(folder)
    with pytest.raises(ValueError, match="convert_to_tensor"):
        m.encode_query(["a"], convert_to_tensor=True)
    with pytest.raises(ValueError, match="output_value"):
        m.encode_query(["a"], output_value=None)
    with pytest.raises(ValueError, match="task"):
        m.encode(["a"], task="passage")
    with pytest.raises(ValueError, match="token_pooling"):
        m.encode_document(["a"], token_pooling=object())
    with pytest.raises(ValueError, match="batch_size"):
        m.encode_document(["a"], batch_size=0)
    with pytest.raises(ValueError, match="key_lens"):
        AttentionMeta.build(torch.tensor([0, 3], dtype=torch.int32), 3, [3], key_lens=[4])
    dense_cfg = folder / "1_Dense" / "config.json"
    cfg = json.loads(dense_cfg.read_text())
    dense_cfg.write_text(json.dumps({**cfg, "activation_function": "torch.nn.modules.activation.Tanh"}))
    with pytest.raises(ValueError, match="activation_function"):
        packformer.load(folder)
    dense_cfg.write_text(json.dumps(cfg))
    st = folder / "sentence_bert_config.json"
    good = st.read_text()
    st.write_text(json.dumps({**json.loads(good), "query_expansion": {"strategy": "grow", "length": 8}}))
    with pytest.raises(ValueError, match="strategy"):
        packformer.load(folder)
    st.write_text(good)
    mods = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps([*mods, {"idx": 4, "name": "4", "path": "",
                                                              "type": "x.HierarchicalTokenPooling"}]))
    with pytest.raises(ValueError, match="HierarchicalTokenPooling"):
        packformer.load(folder)


@pytest.mark.gpu
def test_cuda_query_expansion_matches_cpu(root):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    folder = mve_folder(root, "gpu", **CONFIGS["fixed_no_attend"])
    cpu, gpu = packformer.load(folder), packformer.load(folder, device="cuda", dtype="float32")
    for fn, texts in (("encode_query", QUERIES), ("encode_document", DOCS)):
        for a, b in zip(getattr(cpu, fn)(texts), getattr(gpu, fn)(texts)):
            assert a.shape == b.shape and (a - b.cpu()).abs().max().item() <= 1e-4


def test_cpu_fast_path_keeps_key_lens_when_it_reorders_sequences(root):
    """Equal lengths that are not adjacent are sorted by the CPU runner: key_lens follow their sequences."""
    from packformer.batch import pack

    folder = mve_folder(root, "reorder", **CONFIGS["fixed_no_attend"])
    fast, ref = packformer.load(folder), packformer.load(folder, fast=False)
    ids = [[101, 7592, 2088, 102, 103], [101, 2023, 2003, 1037, 2936, 102, 103, 103], [101, 1060, 102, 103, 103]]
    keys = [4, 6, 3]
    batch = pack(ids, 0, order=range(3))
    meta = AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, [5, 8, 5], key_lens=keys)
    got = fast.runner(batch, meta)
    want = ref.encoder(batch, AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, [5, 8, 5], key_lens=keys))
    assert (got - want).abs().max().item() <= 1e-5
    plain = ref.encoder(batch, AttentionMeta.build(batch.cu_seqlens, batch.max_seqlen, [5, 8, 5]))
    assert (plain - want).abs().max().item() > 1e-3          # the visible keys do change the result
