"""Pooling and heads on packed states equal their padded formulations."""
import pytest
import torch

from packformer.batch import unpad_input
from packformer.heads import ClassificationHead, Pooler, pool

LENS = [3, 1, 6, 2]


def _packed():
    torch.manual_seed(0)
    x = torch.randn(len(LENS), max(LENS), 8)
    mask = torch.arange(max(LENS))[None, :] < torch.tensor(LENS)[:, None]
    packed, idx, cu, _ = unpad_input(x, mask)
    return x, mask, packed, cu


def test_mean_max_cls_match_the_padded_formulas():
    x, mask, packed, cu = _packed()
    m = mask[..., None].float()
    assert torch.allclose(pool(packed, cu, "mean"), (x * m).sum(1) / m.sum(1), atol=1e-6)
    assert torch.allclose(pool(packed, cu, "max"), x.masked_fill(~mask[..., None], -1e9).max(1).values)
    assert torch.equal(pool(packed, cu, "cls"), x[:, 0])


def test_pooling_runs_in_fp32_and_normalizes_on_request():
    _, _, packed, cu = _packed()
    out = Pooler("mean", normalize=True)(packed.half(), cu)
    assert out.dtype == torch.float32 and torch.allclose(out.norm(dim=1), torch.ones(len(LENS)), atol=1e-6)
    assert not torch.allclose(Pooler("mean")(packed, cu).norm(dim=1), torch.ones(len(LENS)))


def test_classification_head_reads_the_first_token_of_each_sequence():
    _, _, packed, cu = _packed()
    head = ClassificationHead(8, 3, act="relu")
    ref = head.out(torch.relu(head.dense(packed[cu[:-1].long()])))
    assert torch.allclose(head(packed, cu), ref)


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        Pooler("sum")
    with pytest.raises(ValueError, match="tanh or relu"):
        ClassificationHead(4, 2, act="gelu")
