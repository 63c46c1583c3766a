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


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "last"])
def test_an_empty_sequence_pools_to_zeros_and_leaves_its_neighbours_alone(mode):
    h = torch.randn(5, 3)
    cu = torch.tensor([0, 2, 2, 5, 5], dtype=torch.int32)           # sequences 1 and 3 are empty (3 at the end)
    got = pool(h, cu, mode)
    assert torch.equal(got[[1, 3]], torch.zeros(2, 3))
    assert torch.allclose(got[[0, 2]], pool(h, torch.tensor([0, 2, 5], dtype=torch.int32), mode))


def test_pooling_runs_in_fp32_and_normalizes_on_request():
    _, _, packed, cu = _packed()
    out = Pooler("mean", normalize=True)(packed.half(), cu)
    assert out.dtype == torch.float32 and torch.allclose(out.norm(dim=1), torch.ones(len(LENS)), atol=1e-6)
    assert not torch.allclose(Pooler("mean")(packed, cu).norm(dim=1), torch.ones(len(LENS)))


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_tanh_head_equals_the_transformers_heads_on_the_same_weights(family):
    transformers = pytest.importorskip("transformers")
    x, _, packed, cu = _packed()
    hf_cfg = transformers.BertConfig(hidden_size=8, num_labels=3)
    torch.manual_seed(1)
    head = ClassificationHead(8, 3, act="tanh")
    if family == "bert":               # BertForSequenceClassification: pooler (dense + tanh), then classifier
        from transformers.models.bert.modeling_bert import BertPooler
        pooler, classifier = BertPooler(hf_cfg), torch.nn.Linear(8, 3)
        ref_dense, ref_out = pooler.dense, classifier

        def ref(h):
            return classifier(pooler(h))
    else:                              # RobertaForSequenceClassification's classifier
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead
        ref = RobertaClassificationHead(hf_cfg).eval()
        ref_dense, ref_out = ref.dense, ref.out_proj
    with torch.no_grad():
        for ours, theirs in ((head.dense, ref_dense), (head.out, ref_out)):
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
        expected = ref(x)                                    # padded [B, L, H]: its own first-token read
        assert torch.allclose(head(packed, cu), expected, atol=1e-6)
        assert not torch.allclose(ClassificationHead(8, 3)(packed, cu), expected, atol=1e-3)   # the weights matter


def test_relu_head_on_known_weights():
    # torchtext's RobertaClassificationHead: first token -> dense -> ReLU -> out_proj
    head = ClassificationHead(2, 2, act="relu")
    with torch.no_grad():
        head.dense.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        head.dense.bias.copy_(torch.tensor([0.0, 0.5]))
        head.out.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -1.0]]))
        head.out.bias.copy_(torch.tensor([0.0, 1.0]))
    # two sequences of 2 and 3 tokens; only the first row of each may count
    packed = torch.tensor([[2.0, 3.0], [9.0, 9.0], [-1.0, 0.25], [7.0, -7.0], [-5.0, 5.0]])
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    # [2, 3]     -> dense [2, -2.5]    -> relu [2, 0]    -> [2, 4 + 1]
    # [-1, 0.25] -> dense [-1, 0.25]   -> relu [0, 0.25] -> [0.25, -0.25 + 1]
    expected = torch.tensor([[2.0, 5.0], [0.25, 0.75]])
    assert torch.equal(head(packed, cu), expected)
    out = head(packed.half(), cu)                            # the head runs in fp32 whatever comes in
    assert out.dtype == torch.float32 and torch.equal(out, expected)


def test_bad_modes_are_named():
    with pytest.raises(ValueError, match="unknown pooling mode 'sum'"):
        Pooler("sum")
    with pytest.raises(ValueError, match=r"one of \('tanh', 'relu', 'gelu'\), got 'sigmoid'"):
        ClassificationHead(4, 2, act="sigmoid")
    with pytest.raises(ValueError, match="'cls' or 'mean', got 'max'"):
        ClassificationHead(4, 2, pooling="max")


def test_head_with_mean_pooling_gelu_and_norm_is_modernbert_shaped():
    """pool -> dense -> GELU -> LayerNorm -> out, the head of ModernBERT's classifiers."""
    torch.manual_seed(0)
    head = ClassificationHead(4, 3, act="gelu", pooling="mean", norm_eps=1e-5, norm_bias=False)
    assert head.norm.bias is None
    packed, cu = torch.randn(5, 4), torch.tensor([0, 2, 5], dtype=torch.int32)
    means = torch.stack([packed[:2].mean(0), packed[2:].mean(0)])
    x = torch.nn.functional.layer_norm(torch.nn.functional.gelu(head.dense(means)), (4,), head.norm.weight, None, 1e-5)
    assert torch.allclose(head(packed, cu), head.out(x), atol=1e-6)
