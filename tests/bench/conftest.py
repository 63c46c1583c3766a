"""Bench tests run tiny models on a shared 2-core machine: one torch thread avoids OpenMP barrier stalls
there. Speed is never what these tests check; the thread count is restored after each test."""
import pytest
import torch

from packformer.config import EncoderConfig
from packformer.heads import Pooler
from packformer.loaders.hf import load_tokenizer
from packformer.loaders.parts import ModelParts
from packformer.loading import builtin_model_dir
from packformer.model import Encoder

TINY = EncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_parts():
    """A factory of fresh ModelParts: random weights of a tiny BERT (fixed seed) with the built-in
    tokenizer, mean pooling, not normalized."""
    def make() -> ModelParts:
        torch.manual_seed(0)
        enc = Encoder(TINY)
        with torch.no_grad():
            for p in enc.parameters():
                p.normal_(0, 0.2 if p.dim() == 1 else 0.05)
        return ModelParts(config=TINY, encoder=enc, head=None, pooler=Pooler("mean"),
                          tokenizer=load_tokenizer(builtin_model_dir(), TINY), max_seq_length=512,
                          source="random:tiny", format="random")
    return make
