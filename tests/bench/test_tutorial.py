"""The tutorial's model: random weights of a preset shape, or a torchtext checkpoint with a fresh
2-class head, as the tutorial builds it; and the tutorial's experiment run on a checkpoint."""
import pytest
import torch

from packformer.bench.tutorial import RUNS, run_tutorial, tutorial_chart, tutorial_parts
from packformer.config import preset
from packformer.loaders.parts import param_view
from packformer.loaders.torchtext import torchtext_keymap
from packformer.model import Encoder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An encoder-only torchtext XLM-R state dict (like xlmr.large.encoder.pt), tiny, with random biases."""
    cfg = preset("xlmr-large", vocab_size=30522, hidden_size=128, num_layers=2, num_heads=2, intermediate_size=96,
                 type_vocab_size=0)
    torch.manual_seed(0)
    enc = Encoder(cfg)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.2 if p.dim() == 1 else 0.05)
    state = torchtext_keymap("current", with_head=False).invert(param_view(enc, None).state_dict(), cfg.num_layers)
    path = tmp_path_factory.mktemp("tt") / "xlmr.tiny.encoder.pt"
    torch.save(state, path)
    return path


def test_random_weights_say_so_and_use_the_tutorials_head(monkeypatch):
    from packformer.config import PRESETS
    monkeypatch.setitem(PRESETS, "tiny-xlmr", preset("xlmr-large", vocab_size=30522, hidden_size=32, num_layers=1,
                                                     num_heads=2, intermediate_size=64))
    parts, notes = tutorial_parts(shape="tiny-xlmr")
    assert parts.config.num_labels == 2 and parts.head.act == "relu" and parts.head.out.out_features == 2
    assert parts.config.pad_token_id == 1 and parts.tokenizer.pad_id == 1
    assert any("RANDOM" in n for n in notes) and any("WordPiece" in n for n in notes)


def test_a_checkpoint_gets_a_fresh_two_class_head(checkpoint):
    parts, notes = tutorial_parts(checkpoint=str(checkpoint))
    assert parts.format == "torchtext" and parts.config.num_labels == 2 and parts.head.act == "relu"
    assert any(str(checkpoint) in n for n in notes) and any("RobertaClassificationHead" in n for n in notes)


def test_the_experiment_on_a_checkpoint_agrees_with_its_slow_path(checkpoint, tmp_path):
    r = run_tutorial(checkpoint=str(checkpoint), iterations=1, profile_iterations=0, log=None)
    assert r["model"]["weights"] == "loaded" and r["padding_value"] == 1
    assert [e["run"] for e in r["results"]] == [run.key for run in RUNS] * 2
    for e in r["results"]:
        assert e["agreement"]["agrees"], e
        assert "profile" not in e
    tutorial_chart(r, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_a_shape_too_small_for_the_builtin_tokenizer_asks_for_spm():
    from packformer.config import PRESETS, EncoderConfig
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(PRESETS, "tiny-vocab", EncoderConfig(vocab_size=500, hidden_size=16, num_layers=1, num_heads=2,
                                                        intermediate_size=32))
        with pytest.raises(ValueError, match="--spm"):
            tutorial_parts(shape="tiny-vocab")
