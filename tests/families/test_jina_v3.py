"""Jina Embeddings v3: the remote-code checkpoint (rotary XLM-R with per-task LoRA adapters) against a
transcription of its code (ref_jina_v3.py), and transformers' JinaEmbeddingsV3Model format against
transformers; tasks through the API, the server and the command line.

The tiny remote-code checkpoint is real-shaped: the released config.json with 2 layers of width 64 (4 heads
of 16), the five released tasks and instructions, rank-4 factors on every Linear and embedding table, the
`roberta.` / `parametrizations.weight.original` / `lora_A` keys, an XLM-R style Unigram tokenizer.json.
Every LoRA factor is random and non-zero, so each task's outputs differ from the others'."""
from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import packformer
from packformer.config import preset
from packformer.families import BY_MODEL_TYPE, family_of
from packformer.families.jina_v3 import config_from_hf
from packformer.loaders.keymap import CheckpointError

from . import ref_jina_v3 as ref
from .harness import check_alone_equals_batched, check_hidden_states, packed_reference, perturb_norms, ragged_ids

transformers = pytest.importorskip("transformers")

VOCAB = 320
TINY = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
TASKS = [None] + ref.TASKS
LENGTHS = [1, 2, 5, 16, 17, 17, 33, 64]        # repeated lengths: the CPU path groups equal ones
TEXTS = ["How is the weather today?", "What is the current weather like today?", "a",
         "Packed batches never pad, so a long text costs only its own tokens. " * 4, "Über naïve café"]
CORPUS = TEXTS + list(ref.INSTRUCTIONS.values()) + ["the quick brown fox jumps over the lazy dog"] * 3


def xlmr_tokenizer(folder: Path) -> Path:
    """An XLM-R style tokenizer.json: Unigram over Metaspace, <s>=0 <pad>=1 </s>=2 <unk>=3, <s> ... </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=VOCAB - 20, unk_token="<unk>",
                                                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"]))
    assert [tok.token_to_id(t) for t in ("<s>", "<pad>", "</s>", "<unk>")] == [0, 1, 2, 3]
    assert tok.get_vocab_size() <= VOCAB
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(folder)
    return folder


def ref_tokenizer(folder: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return xlmr_tokenizer(tmp_path_factory.mktemp("xlmr-tokenizer"))


@pytest.fixture(scope="module")
def jina(tmp_path_factory, tok_dir):
    """(folder, reference model, tokenizer) of a random remote-code checkpoint."""
    model = ref.random_model(ref.released_config(**TINY))
    folder = ref.save_folder(model, tmp_path_factory.mktemp("jina-v3"), tok_dir)
    return folder, model, ref_tokenizer(folder)


def ref_hidden(model, lengths, task=None, tasks=None):
    """The reference's hidden states of a padded batch as packed rows [T, H], and our id lists. `tasks`:
    one task per row (a mixed adapter_mask), else `task` for every row."""
    ids, mask, seqs = ragged_ids(lengths, (4, VOCAB - 1), pad_id=1)
    if tasks is not None:
        adapter = torch.tensor([model.tasks.index(t) for t in tasks], dtype=torch.int32)
    else:
        adapter = model.adapter_mask(task, len(lengths))
    with torch.no_grad():
        return packed_reference(model(ids, mask, adapter), lengths), seqs


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.float() - want).abs().max().item() / max(1.0, want.abs().max().item())


# ---- the mapping ------------------------------------------------------------------------------------------------

def test_released_config_maps_to_the_preset_and_is_claimed_from_bert():
    d = ref.released_config()
    assert family_of(d).name == "jina_v3"
    assert config_from_hf(d) == preset("jina-embeddings-v3")
    cfg = preset("jina-embeddings-v3")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.intermediate_size, cfg.vocab_size,
            cfg.max_position_embeddings) == (1024, 24, 16, 4096, 250002, 8194)
    assert cfg.rotary.base == 20000.0 and not cfg.rotary.interleaved and cfg.position_embedding == "none"
    assert cfg.adapters.tasks == tuple(ref.TASKS) and cfg.adapters.rank == 4 and cfg.adapters.scaling == 0.25
    assert cfg.adapters.instruction("retrieval.query") == ref.INSTRUCTIONS["retrieval.query"]
    assert cfg.architecture()["adapters"] == "LoRA rank 4 x 5 tasks"
    # plain XLM-R stays with the bert family, by config and by model_type
    assert family_of({"model_type": "xlm-roberta", "position_embedding_type": "absolute"}).name == "bert"
    assert BY_MODEL_TYPE["xlm-roberta"].name == "bert" and BY_MODEL_TYPE["jina_embeddings_v3"].name == "jina_v3"
    assert family_of({"model_type": "xlm-roberta", "lora_adaptations": ["a"]}).name == "jina_v3"


def test_config_variants_map_as_the_remote_code_reads_them():
    cfg = config_from_hf(ref.released_config(hidden_act="gelu_fast", rotary_emb_dim=32, rotary_emb_interleaved=True,
                                             pad_vocab_size_multiple=8, task_instructions=None))
    assert cfg.activation == "gelu_tanh"          # the remote code's MLP: F.gelu(approximate="tanh")
    assert cfg.rotary.dim == 32 and cfg.rotary.interleaved
    assert cfg.vocab_size == 250008               # padded to a multiple of 8, as XLMRobertaModel pads it
    assert cfg.adapters.instruction("retrieval.query") == ""
    plain = config_from_hf({k: v for k, v in ref.released_config().items() if not k.startswith(("lora", "task"))})
    assert plain.adapters is None and plain.rotary.base == 20000.0
    from packformer.families.jina_v3 import embedding_pooling
    assert embedding_pooling(ref.released_config()) == ("mean", True)
    assert embedding_pooling(ref.released_config(emb_pooler="cls")) == ("cls", True)


@pytest.mark.parametrize("changes, match", [
    (dict(position_embedding_type="alibi"), "position_embedding_type 'alibi'"),
    (dict(position_embedding_type="absolute"), "position_embedding_type 'absolute'"),
    (dict(rotary_emb_scale_base=512), "rotary_emb_scale_base 512"),
    (dict(truncate_dim=256), "truncate_dim 256"),
    (dict(load_trained_adapters=False), "load_trained_adapters false"),
    (dict(lora_adaptations="retrieval.query"), "lora_adaptations 'retrieval.query'"),
    (dict(task_instructions={"summarize": "x"}), "task_instructions"),
    (dict(hidden_act="quick_gelu"), "hidden_act 'quick_gelu'"),
    (dict(architectures=["XLMRobertaForSequenceClassification"], num_labels=2), "classification head"),
])
def test_unsupported_options_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(ref.released_config(**changes))


def test_checkpoint_keys_are_the_remote_codes_and_each_one_is_checked(jina, tmp_path):
    folder, model, _ = jina
    state = model.state_dict()
    assert state["roberta.encoder.layers.1.mixer.Wqkv.parametrizations.weight.0.lora_A"].shape == (5, 4, 64)
    assert state["roberta.encoder.layers.1.mixer.Wqkv.parametrizations.weight.0.lora_B"].shape == (5, 192, 4)
    assert state["roberta.embeddings.word_embeddings.parametrizations.weight.0.lora_A"].shape == (5, VOCAB, 4)
    assert state["roberta.embeddings.word_embeddings.parametrizations.weight.0.lora_B"].shape == (5, 4, 64)
    assert "roberta.emb_ln.weight" in state and not any("position_embeddings" in k for k in state)
    # one factor missing: the loader names it
    from safetensors.torch import save_file
    broken = tmp_path / "broken"
    ref.save_folder(model, broken)
    key = "roberta.encoder.layers.0.mlp.fc2.parametrizations.weight.0.lora_B"
    save_file({k: v.contiguous() for k, v in state.items() if k != key}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="encoder.layers.0.mlp.fc2.parametrizations.weight.0.lora_B"):
        packformer.load(broken)


# ---- hidden states per task -------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["reference", "fast"])
def test_hidden_states_match_the_remote_code_for_every_task(jina, path):
    """Each task loaded as the model's default task, fp32, against the remote code's adapter_mask forward."""
    folder, model, _ = jina
    outs = {}
    for task in TASKS:
        want, seqs = ref_hidden(model, LENGTHS, task)
        m = packformer.load(folder, fast=path == "fast", task=task)
        assert m.task == task and m.info()["runner"]["path"] == ("reference" if path == "reference" else "cpu")
        got = m.hidden_states(m.pack_ids(seqs))
        assert rel_err(got, want) <= 1e-4, f"{task}: {rel_err(got, want):.3g}"
        outs[task] = got
    for a in TASKS:      # the adapters matter: every task differs from every other and from the base
        for b in TASKS:
            if a != b:
                assert (outs[a] - outs[b]).abs().max() > 0.05, (a, b)


def test_one_model_switches_tasks_per_call_like_a_mixed_adapter_mask(jina):
    """The remote code runs a batch whose rows have different tasks; packformer runs each task's rows in
    that task's own forward on one loaded model, with the same results."""
    folder, model, _ = jina
    lengths = [3, 17, 9, 17, 30, 4]
    row_tasks = ["retrieval.query", "separation", "retrieval.passage", "retrieval.query", "text-matching",
                 "classification"]
    want, seqs = ref_hidden(model, lengths, tasks=row_tasks)
    m = packformer.load(folder)                          # no default task: base weights
    starts = np.cumsum([0] + lengths)
    for i, (s, task) in enumerate(zip(seqs, row_tasks)):
        got = m.hidden_states(m.pack_ids([s]), task=task)
        assert rel_err(got, want[starts[i]:starts[i + 1]]) <= 1e-4
    assert m.hidden_states(m.pack_ids(seqs)).shape == want.shape
    assert set(m._task_runners) == set(row_tasks)       # one merged runner per task used, kept


def test_a_partial_interleaved_rotary_config_matches_too(tmp_path):
    c = ref.released_config(**TINY, rotary_emb_dim=8, rotary_emb_interleaved=True, rotary_emb_base=1000.0,
                            hidden_act="gelu_pytorch_tanh")
    model = ref.random_model(c, seed=5)
    folder = ref.save_folder(model, tmp_path / "variant")
    for task in (None, "separation"):
        want, seqs = ref_hidden(model, LENGTHS, task)
        for fast in (False, True):
            m = packformer.load(folder, fast=fast, task=task)
            assert rel_err(m.hidden_states(m.pack_ids(seqs)), want) <= 1e-4


# ---- encode: instructions, pooling, normalization ---------------------------------------------------------------

def test_encode_equals_the_remote_codes_encode_with_its_instructions(jina):
    folder, model, tok = jina
    m = packformer.load(folder)
    assert m.pooler.mode == "mean" and m.pooler.normalize          # as XLMRobertaLoRA.encode
    for task in TASKS:
        want = model.encode(TEXTS, tok, task=task).numpy()
        got = m.encode(TEXTS, task=task)
        assert np.abs(got - want).max() <= 1e-5, task
        if task == "retrieval.query":           # the same as the default task given at load
            assert np.abs(packformer.load(folder, task=task).encode(TEXTS) - want).max() <= 1e-5
    query = ref.INSTRUCTIONS["retrieval.query"]
    assert m.token_ids(["hi"], task="retrieval.query") == [tok.encode(query + "hi").ids]
    assert m.token_ids(["hi"], task="separation") == m.token_ids(["hi"]) == [tok.encode("hi").ids]
    assert m.instruction("retrieval.passage") == ref.INSTRUCTIONS["retrieval.passage"]


def test_unknown_task_or_a_task_without_adapters_is_a_clear_error(jina, tmp_path):
    folder, _, _ = jina
    every = ", ".join(ref.TASKS)
    with pytest.raises(ValueError, match=f"unknown task 'retrieval'; this model's tasks are: {every}"):
        packformer.load(folder, task="retrieval")
    m = packformer.load(folder)
    with pytest.raises(ValueError, match=f"unknown task 'query'; this model's tasks are: {every}"):
        m.encode(["x"], task="query")
    plain = native_folder(tmp_path / "native")
    with pytest.raises(ValueError, match="has no task adapters, so it takes no task"):
        packformer.load(plain, task="retrieval.query")


def test_alone_equals_batched_and_low_precision_runs(jina):
    folder, model, _ = jina
    _, _, seqs = ragged_ids(LENGTHS, (4, VOCAB - 1), pad_id=1)
    check_alone_equals_batched(folder, seqs, task="retrieval.passage")
    check_alone_equals_batched(folder, seqs, task="retrieval.passage", quantize="int8")
    fp32 = packformer.load(folder, task="retrieval.query").encode(TEXTS)
    bf16 = packformer.load(folder, task="retrieval.query", dtype="bfloat16").encode(TEXTS)
    int8 = packformer.load(folder, task="retrieval.query", quantize="int8").encode(TEXTS)
    for name, got in (("bf16", bf16), ("int8", int8)):
        cos = (got * fp32).sum(1)                          # both normalized
        assert np.isfinite(got).all() and cos.min() >= 0.99, f"{name}: cosine {cos.min():.4f}"


def test_sentence_transformers_folder_of_the_remote_code(jina, tmp_path):
    """The released layout: custom_st.Transformer at the root, mean Pooling, Normalize."""
    folder, model, tok = jina
    st = tmp_path / "st"
    st.mkdir()
    for f in folder.iterdir():
        (st / f.name).write_bytes(f.read_bytes())
    (st / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "transformer", "path": "", "type": "custom_st.Transformer"},
        {"idx": 1, "name": "pooler", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "normalizer", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                              "pooling_mode_mean_tokens": True}))
    (st / "2_Normalize").mkdir()
    m = packformer.load(st)
    assert m.format == "sentence-transformers" and m.tasks == tuple(ref.TASKS)
    for task in ("retrieval.query", "text-matching"):
        assert np.abs(m.encode(TEXTS, task=task) - model.encode(TEXTS, tok, task=task).numpy()).max() <= 1e-5


# ---- transformers' JinaEmbeddingsV3Model: its own format, and the peer of ours ----------------------------------

def native_config(**changes):
    return transformers.JinaEmbeddingsV3Config(**{**TINY, "max_position_embeddings": 130, **changes})


def random_native(cls, cfg, seed=0):
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    perturb_norms(model, seed=seed)
    if hasattr(model, "classifier"):
        with torch.no_grad():
            model.classifier.out_proj.weight.mul_(20.0)
    return model


def native_folder(folder: Path, cls=None, **changes) -> Path:
    model = random_native(cls or transformers.JinaEmbeddingsV3Model, native_config(**changes))
    model.save_pretrained(folder)
    return folder


needs_native = pytest.mark.skipif(not hasattr(transformers, "JinaEmbeddingsV3Model"),
                                  reason="transformers without JinaEmbeddingsV3Model (< 5)")


@needs_native
def test_transformers_format_hidden_states_and_logits(tmp_path):
    enc = random_native(transformers.JinaEmbeddingsV3Model, native_config())
    enc.save_pretrained(tmp_path / "enc")
    ids, mask, seqs = ragged_ids(LENGTHS, (4, VOCAB - 1), pad_id=1)
    with torch.no_grad():
        want = packed_reference(enc(input_ids=ids, attention_mask=mask).last_hidden_state, LENGTHS)
    errs = check_hidden_states(tmp_path / "enc", want, seqs)
    assert max(errs.values()) <= 1e-4
    cls = random_native(transformers.JinaEmbeddingsV3ForSequenceClassification, native_config(num_labels=3), seed=2)
    cls.save_pretrained(tmp_path / "cls")
    with torch.no_grad():
        logits = cls(input_ids=ids, attention_mask=mask).logits
    for fast in (False, True):
        m = packformer.load(tmp_path / "cls", fast=fast)
        got = m.classify_batch(m.pack_ids(seqs))
        assert (got - logits).abs().max() <= 1e-4 and torch.equal(got.argmax(-1), logits.argmax(-1))


@needs_native
def test_transformers_format_sentence_transformers_encode(tmp_path, tok_dir):
    st_lib = pytest.importorskip("sentence_transformers")
    folder = native_folder(tmp_path / "st")
    for f in tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True}))
    (folder / "2_Normalize").mkdir()
    want = st_lib.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert np.abs(packformer.load(folder).encode(TEXTS) - want).max() <= 1e-5


@needs_native
def test_bench_peer_is_transformers_running_the_base_or_a_merged_task(jina):
    """bench.convert.to_hf of the remote-code model is transformers' JinaEmbeddingsV3Model on the base
    weights; of a task's merged encoder, on that task's weights: both equal the remote code (an independent
    check of the transcription's rotary, norms and attention)."""
    from packformer.bench.convert import to_hf

    folder, model, _ = jina
    m = packformer.load(folder, fast=False)
    ids, mask, seqs = ragged_ids(LENGTHS, (4, VOCAB - 1), pad_id=1)
    for task in (None, "retrieval.query"):
        peer = to_hf(m.task_encoder(task))
        want, _ = ref_hidden(model, LENGTHS, task)
        with torch.no_grad():
            got = packed_reference(peer(input_ids=ids, attention_mask=mask).last_hidden_state, LENGTHS)
        assert rel_err(got, want) <= 1e-4


@needs_native
@pytest.mark.slow
def test_random_preset_and_its_transformers_peer():
    """random:jina-embeddings-v3 has the real shapes and adapters (zero factors: random weights have no
    trained adapters); to_hf of it agrees with it. Slow (570M parameters, twice): run with -m slow."""
    from packformer.bench.convert import to_hf

    m = packformer.load("random:jina-embeddings-v3", fast=False, task="retrieval.query")
    assert m.encoder.lora.word.A.shape == (5, 250002, 4) and m.encoder.lora.layers[23].ffn1.B.shape == (5, 4096, 4)
    lengths = [3, 40]
    ids, mask, seqs = ragged_ids(lengths, m.config.regular_id_range(), m.config.pad_token_id)
    peer = to_hf(m.encoder)
    with torch.no_grad():
        want = packed_reference(peer(input_ids=ids, attention_mask=mask).last_hidden_state, lengths)
    assert rel_err(m.hidden_states(m.pack_ids(seqs)), want) <= 1e-4


# ---- serving ------------------------------------------------------------------------------------------------------

class Recording:
    """The real model; records (task, sequences) of every batch and holds batches while `gate` is clear."""

    def __init__(self, model):
        self._m, self.batches = model, []
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self._m, name)

    def embed_batch(self, batch, normalize=None, task=None):
        self.entered.set()
        assert self.gate.wait(60), "test gate never opened"
        self.batches.append((task, batch.cu_seqlens.numel() - 1))
        return self._m.embed_batch(batch, normalize, task=task)


@contextmanager
def serving(app):
    import httpx
    import uvicorn

    from packformer.bench.launch import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            while client.get("/health").status_code != 200:
                assert time.monotonic() < deadline, "server never became healthy"
                time.sleep(0.05)
            yield client
    finally:
        server.should_exit = True
        thread.join(60)


async def _until(cond, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_server_runs_concurrent_requests_of_different_tasks_each_with_its_own_adapter(jina):
    """While the worker holds one batch, requests of three tasks queue up on both routes; each gets what
    the API gives for its task, and every batch holds one task (same-task requests share one)."""
    import httpx

    from packformer.server import ServerSettings, create_app

    folder, _, _ = jina
    model = packformer.load(folder, task="retrieval.passage")         # the default of requests without a task
    rec = Recording(model)
    app = create_app(rec, ServerSettings(max_batch_tokens=8194))
    svc = app.state.service
    first = {"inputs": TEXTS[:2], "task": "retrieval.query"}
    later = [("/embed", {"inputs": TEXTS, "task": "retrieval.passage"}, "retrieval.passage"),
             ("/v1/embeddings", {"input": TEXTS[1:], "task": "separation"}, "separation"),
             ("/embed", {"inputs": TEXTS[2:]}, "retrieval.passage"),
             ("/v1/embeddings", {"input": TEXTS[:3], "task": "retrieval.query"}, "retrieval.query")]
    with serving(app) as client:
        info = client.get("/info").json()
        assert info["tasks"] == ref.TASKS and info["task"] == "retrieval.passage"

        async def scenario():
            async with httpx.AsyncClient(base_url=str(client.base_url), timeout=60) as ac:
                rec.gate.clear()
                rec.entered.clear()
                rec.batches.clear()
                a = asyncio.ensure_future(ac.post("/embed", json=first))
                await _until(rec.entered.is_set)                       # the worker holds `first`
                rest = [asyncio.ensure_future(ac.post(route, json=body)) for route, body, _ in later]
                await _until(lambda: svc.scheduler.queued_sequences == 5 + 4 + 3 + 3)
                rec.gate.set()
                return await a, await asyncio.gather(*rest)

        r_first, responses = asyncio.run(scenario())
        batches = list(rec.batches)
        bad = client.post("/embed", json={"inputs": "x", "task": "summarize"})
        assert bad.status_code == 422 and ", ".join(ref.TASKS) in bad.json()["error"]
        # token ids are the model's input as given: special tokens added, no instruction
        ids = [t for t in model.token_ids(["hi there"], task="separation")[0][1:-1]]
        pre = client.post("/v1/embeddings", json={"input": [ids], "task": "separation"}).json()["data"][0]["embedding"]
        np.testing.assert_allclose(pre, model.encode("hi there", task="separation"), atol=1e-5, rtol=0)
        pre = client.post("/v1/embeddings", json={"input": ids}).json()["data"][0]["embedding"]
        raw = model.embed_batch(model.pack_ids([[0, *ids, 2]]), task="retrieval.passage")[0]
        np.testing.assert_allclose(pre, raw.numpy(), atol=1e-5, rtol=0)
    assert r_first.status_code == 200
    np.testing.assert_allclose(r_first.json(), model.encode(TEXTS[:2], task="retrieval.query"), atol=1e-5, rtol=0)
    for (route, body, task), r in zip(later, responses):
        assert r.status_code == 200, r.text
        rows = r.json() if route == "/embed" else [d["embedding"] for d in r.json()["data"]]
        texts = body.get("inputs", body.get("input"))
        np.testing.assert_allclose(rows, model.encode(texts, task=task), atol=1e-5, rtol=0, err_msg=f"{route} {task}")
    # after `first` (held): the two passage requests in one batch, separation and the later query apart
    assert batches[0] == ("retrieval.query", 2)
    assert sorted(batches[1:]) == [("retrieval.passage", 8), ("retrieval.query", 3), ("separation", 4)]


# ---- command line -------------------------------------------------------------------------------------------------

def test_cli_encode_and_serve_take_a_task(jina, tmp_path, capsys):
    """encode --task writes the task's embeddings; serve --task makes it the default of requests (the serve
    command's own parser, model loading and settings, served in-process)."""
    from packformer.cli import build_parser, main
    from packformer.commands.common import load_model
    from packformer.commands.serve import settings_from_args
    from packformer.server import create_app

    folder, _, _ = jina
    model = packformer.load(folder)
    out = tmp_path / "q.npy"
    assert main(["encode", "--model", str(folder), "--task", "retrieval.query", "-o", str(out), *TEXTS]) == 0
    assert np.abs(np.load(out) - model.encode(TEXTS, task="retrieval.query")).max() <= 1e-6
    assert main(["encode", "--model", str(folder), "--task", "nope", "x"]) == 1
    err = capsys.readouterr().err
    assert "unknown task 'nope'" in err and "retrieval.passage" in err and "Traceback" not in err

    args = build_parser().parse_args(["serve", str(folder), "--task", "retrieval.passage"])
    served = load_model(args)
    assert served.task == "retrieval.passage"
    with serving(create_app(served, settings_from_args(args))) as c:
        default = c.post("/embed", json={"inputs": TEXTS}).json()
        query = c.post("/v1/embeddings", json={"input": TEXTS, "task": "retrieval.query"}).json()
    np.testing.assert_allclose(default, model.encode(TEXTS, task="retrieval.passage"), atol=1e-5, rtol=0)
    np.testing.assert_allclose([d["embedding"] for d in query["data"]], model.encode(TEXTS, task="retrieval.query"),
                               atol=1e-5, rtol=0)


def test_serve_warm_tasks_merges_them_before_the_server_is_ready(jina):
    """--warm-tasks: the named tasks (or all) are merged and warmed with the default before /health says
    ready, so their first request does not pause the worker; what the model lacks is refused at once."""
    from packformer.cli import build_parser
    from packformer.commands.common import load_model
    from packformer.commands.serve import settings_from_args
    from packformer.server import ServerSettings, create_app

    folder, _, _ = jina
    args = build_parser().parse_args(["serve", str(folder), "--task", "retrieval.passage",
                                      "--warm-tasks", "retrieval.query, separation"])
    served = load_model(args)
    settings = settings_from_args(args)
    assert settings.warm_tasks == ("retrieval.query", "separation")
    assert served._task_runners.keys() == {"retrieval.passage"}            # only the default, at load
    with serving(create_app(served, settings)) as c:
        assert c.get("/health").status_code == 200
        assert served._task_runners.keys() == {"retrieval.passage", "retrieval.query", "separation"}
        query = c.post("/v1/embeddings", json={"input": TEXTS, "task": "retrieval.query"}).json()
    np.testing.assert_allclose([d["embedding"] for d in query["data"]],
                               packformer.load(folder).encode(TEXTS, task="retrieval.query"), atol=1e-5, rtol=0)
    everything = packformer.load(folder)
    with serving(create_app(everything, ServerSettings(warm_tasks=("all",)))) as c:
        assert c.get("/health").status_code == 200
    assert everything._task_runners.keys() == set(everything.adapters.tasks)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        create_app(packformer.load(folder), ServerSettings(warm_tasks=("nope",)))
    with pytest.raises(ValueError, match="needs a model with task adapters"):
        create_app(packformer.load(), ServerSettings(warm_tasks=("all",)))
    with pytest.raises(ValueError, match="sequence of task names"):
        ServerSettings(warm_tasks="all")


# ---- CUDA ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_cuda_fp16_fast_path_against_the_cpu_reference_per_task(tmp_path, tok_dir):
    """fp16 CUDA fast path (merged weights per task) vs the fp32 CPU reference, lengths past several key
    blocks."""
    c = ref.released_config(**TINY)
    folder = ref.save_folder(ref.random_model(c, seed=7), tmp_path / "gpu", tok_dir)
    _, _, seqs = ragged_ids(LENGTHS + [130, 300], (4, VOCAB - 1), pad_id=1)
    cpu = packformer.load(folder, device="cpu", fast=False)
    gpu = packformer.load(folder, device="cuda", dtype="float16", fast=True)
    for task in TASKS:
        want = cpu.hidden_states(cpu.pack_ids(seqs), task=task).float()
        got = gpu.hidden_states(gpu.pack_ids(seqs), task=task).float().cpu()
        cos = torch.nn.functional.cosine_similarity(got, want, dim=-1)              # [T]
        assert cos.min() >= 0.9995, f"{task}: worst token cosine {cos.min():.5f}"
