"""The packformer command: encode/classify/info, files and stdin, one-line errors."""
import json
import subprocess
import sys

import numpy as np
import pytest

from packformer.cli import main


def test_console_script_encodes_the_readme_example():
    r = subprocess.run([sys.executable, "-m", "packformer", "encode", "Hello world", "How are you!"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["text"] for row in rows] == ["Hello world", "How are you!"]
    assert len(rows[0]["embedding"]) == 384


def test_encode_to_npy_and_jsonl_from_a_file(tmp_path, minilm, capsys):
    src = tmp_path / "in.txt"
    src.write_text("alpha\nbeta gamma\n\n")
    assert main(["encode", "--input", str(src), "--output", str(tmp_path / "o.npy")]) == 0
    arr = np.load(tmp_path / "o.npy")
    assert arr.shape == (3, 384)
    assert np.abs(arr - minilm.encode(["alpha", "beta gamma", ""])).max() <= 1e-6
    assert main(["encode", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 0
    lines = (tmp_path / "o.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[1])["text"] == "beta gamma"


def test_input_that_is_not_utf8_names_its_line_and_byte(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"ok\r\nsecond\nbad \xff here\n")
    assert main(["encode", "--input", str(src)]) == 1
    err = capsys.readouterr().err
    assert f"{src}, line 3, is not UTF-8: byte 0xff (invalid start byte)" in err and "Traceback" not in err
    r = subprocess.run([sys.executable, "-m", "packformer", "encode", "--input", "-"], input=b"x\n\xc3",
                       capture_output=True, timeout=300)
    assert r.returncode == 1 and b"stdin, line 2, is not UTF-8: byte 0xc3" in r.stderr


def test_input_lines_end_as_in_a_text_file(tmp_path, minilm, capsys):
    # \n, \r\n and \r all end a line; nothing of them stays in the text
    src = tmp_path / "in.txt"
    src.write_bytes(b"alpha\r\nbeta\rgamma\n")
    assert main(["encode", "--input", str(src), "--output", str(tmp_path / "o.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == ["alpha", "beta", "gamma"]


def test_info_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dim"] == 384 and info["pooling"] == "mean" and info["normalize"] is True


def test_user_errors_are_one_line_and_exit_1(capsys):
    assert main(["encode", "--model", "/no/such/model", "x"]) == 1
    err = capsys.readouterr().err
    assert "model path not found" in err and "Traceback" not in err
    assert main(["encode"]) == 1
    assert "no texts" in capsys.readouterr().err
    assert main(["encode", "--no-truncate", "word " * 300]) == 1
    assert "more than the model's maximum" in capsys.readouterr().err


def test_classify_prints_the_argmax_label_and_softmax_scores_of_the_models_logits(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    import torch
    import packformer
    from packformer.loading import builtin_model_dir

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, num_labels=2, initializer_range=0.5,
                                  id2label={0: "no", 1: "yes"}, label2id={"no": 0, "yes": 1})
    hf = transformers.BertForSequenceClassification(cfg).eval()
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"):
        (tmp_path / f).write_bytes((builtin_model_dir() / f).read_bytes())
    texts = ["good", "bad", "so-so, I guess"]
    inputs = transformers.AutoTokenizer.from_pretrained(tmp_path)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        # a classifier that says "yes" to "good" and "no" to "bad", each by a logit margin of 2
        pooled = hf.bert(**inputs).pooler_output
        d, mid = pooled[0] - pooled[1], (pooled[0] + pooled[1]) / 2
        w = d * 2 / d.dot(d)
        hf.classifier.weight.copy_(torch.stack([-w, w]) / 2)
        hf.classifier.bias.copy_(torch.stack([w.dot(mid), -w.dot(mid)]) / 2)
        ref = hf(**inputs).logits.numpy()                  # transformers' own forward: the reference
    hf.save_pretrained(tmp_path)
    labels = ["no", "yes"]
    assert [labels[i] for i in ref.argmax(1)][:2] == ["yes", "no"]

    assert main(["classify", "--model", str(tmp_path), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    logits = packformer.load(tmp_path).classify(texts)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for r, l, s, want in zip(rows, logits, softmax, ref):
        assert r["label"] == labels[int(np.argmax(l))] == labels[int(np.argmax(want))]
        assert list(r["scores"]) == labels
        assert np.abs(np.array(list(r["scores"].values())) - s).max() <= 1e-6      # printed to 6 decimals
    assert np.abs(logits - ref).max() <= 1e-4

    assert main(["classify", "--model", str(tmp_path), "--raw-scores", *texts]) == 0
    raw = [json.loads(line)["scores"] for line in capsys.readouterr().out.splitlines()]
    assert np.abs(np.array([list(r.values()) for r in raw]) - logits).max() <= 1e-6


def test_float8_on_a_cpu_is_refused_with_the_reason(capsys):
    assert main(["encode", "--dtype", "float8", "hello"]) == 1
    err = capsys.readouterr().err
    assert "fp8 tensor cores" in err and "quantize='int8'" in err
