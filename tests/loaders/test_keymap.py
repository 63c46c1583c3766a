"""Declarative key maps: fused q/k/v, inverse round trip, and every problem named."""
import pytest
import torch

from packformer.config import EncoderConfig
from packformer.loaders.hf import hf_keymap
from packformer.loaders.keymap import CheckpointError, strip_prefix
from packformer.model import Encoder

CFG = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                    max_position_embeddings=20)


def test_invert_then_convert_is_identity():
    torch.manual_seed(0)
    enc = Encoder(CFG)
    km = hf_keymap("bert", with_head=False)
    ckpt = km.invert(enc.state_dict(), CFG.num_layers)
    assert "encoder.layer.1.attention.self.key.weight" in ckpt and ckpt["encoder.layer.1.attention.self.key.weight"].shape == (16, 16)
    back = km.convert(ckpt, Encoder(CFG), CFG.num_layers)
    assert back.keys() == enc.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in enc.state_dict().items())


def test_strip_prefix_finds_the_model_prefix():
    sd, prefix = strip_prefix({"bert.embeddings.word_embeddings.weight": 1, "classifier.weight": 2},
                              "embeddings.word_embeddings.weight")
    assert prefix == "bert." and set(sd) == {"embeddings.word_embeddings.weight", "classifier.weight"}


def test_known_unused_keys_are_ignored_but_strangers_are_not():
    km = hf_keymap("bert", with_head=False)
    ckpt = km.invert(Encoder(CFG).state_dict(), CFG.num_layers)
    ckpt["pooler.dense.weight"] = torch.zeros(16, 16)        # BertModel's pooler: unused by embeddings
    ckpt["cls.predictions.bias"] = torch.zeros(50)            # a pre-training head
    km.convert(ckpt, Encoder(CFG), CFG.num_layers)
    ckpt["mystery.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="unused keys \\(1\\): mystery.weight"):
        km.convert(ckpt, Encoder(CFG), CFG.num_layers)
