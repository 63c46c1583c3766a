"""Peer models built from the SAME weights as a packformer model, so that every timing compares
like with like and every output can be checked against ours.

- `to_hf`: the transformers model of the encoder's family (BertModel, MPNetModel, ModernBertModel, ...,
  or *ForSequenceClassification), through the inverse of the family's own key map.
- `to_better_transformer`: embeddings + `nn.TransformerEncoder` (+ the head) on padded ids, the layout
  torchtext's RobertaModel uses internally, so torch's Better Transformer fast path applies to it.

Weights are copied: the peers never share storage with the packformer model they came from.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from ..heads import ClassificationHead
from ..families import family_named
from ..loaders.keymap import CheckpointError, KeyMap, Rule
from ..loaders.parts import param_view
from ..model import Encoder

def hf_config(cfg: EncoderConfig):
    """EncoderConfig -> the matching transformers config, by the encoder's family."""
    fam = family_named(cfg.family)
    if fam.to_hf_config is None:
        raise ValueError(f"no transformers model for the {fam.name} family")
    return fam.to_hf_config(cfg)


def to_hf(encoder: Encoder, head: ClassificationHead | None = None, attn_implementation: str = "sdpa",
          with_head: bool = False) -> nn.Module:
    """A transformers model (eval mode, fp32, CPU) holding a copy of `encoder`'s (and `head`'s) weights.

    with_head=False gives the bare encoder (BertModel without pooler); True gives *ForSequenceClassification.
    """
    from transformers import AutoModel, AutoModelForSequenceClassification

    cfg = encoder.config
    hcfg = hf_config(cfg)
    fam = family_named(cfg.family)
    if with_head:
        if head is None:
            raise ValueError("with_head=True needs the model's classification head")
        if head.act != fam.head_act:
            raise ValueError(f"this head uses {head.act} (torchtext's RobertaClassificationHead); transformers' "
                             f"{fam.name} classification heads use {fam.head_act}, so no transformers peer can "
                             "reproduce it")
        model = AutoModelForSequenceClassification.from_config(hcfg, attn_implementation=attn_implementation)
    else:
        kwargs = {"add_pooling_layer": False} if fam.hf_pooling_layer else {}
        model = AutoModel.from_config(hcfg, attn_implementation=attn_implementation, **kwargs)
    keymap = (fam.hf_keymap or fam.keymap)(cfg, with_head)
    ours = {k: v.detach().float().cpu().clone() for k, v in param_view(encoder, head if with_head else None)
            .state_dict().items()}
    prefix = model.base_model_prefix + "."
    rows = {(k[len(prefix):] if with_head and k.startswith(prefix) else k): v.shape[0]
            for k, v in model.state_dict().items() if v.dim()}
    state = keymap.invert(ours, cfg.num_layers, rows)
    if with_head:   # the encoder lives under base_model_prefix; transformers' own head keys stay at the top
        prefix = model.base_model_prefix + "."
        state = {(k if k.startswith(fam.hf_head_keys) else prefix + k): v for k, v in state.items()}
    expected = set(model.state_dict())
    tt_key = next((k for k in expected if k.endswith("embeddings.token_type_embeddings.weight")), None)
    if tt_key is not None and tt_key not in state:   # our model has no token-type table: transformers adds a zero row
        state[tt_key] = torch.zeros_like(model.state_dict()[tt_key])
    missing = sorted(expected - set(state) - {k for k in expected if k.endswith(("position_ids", "token_type_ids"))})
    unused = sorted(set(state) - expected)
    if missing or unused:
        raise CheckpointError(f"cannot build the transformers peer: missing {missing}, unused {unused}")
    model.load_state_dict(state, strict=False)
    return model.eval().requires_grad_(False)


# -- Better Transformer: nn.TransformerEncoder on padded input --------------------------------------------

_BT_LAYER = "transformer.layers.{i}."
BT_RULES = [
    *(Rule.of(f"embeddings.{n}", f"embeddings.{n}") for n in ("word.weight", "position.weight", "token_type.weight",
                                                               "norm.weight", "norm.bias")),
    Rule.of("layers.{i}.qkv.weight", _BT_LAYER + "self_attn.in_proj_weight"),
    Rule.of("layers.{i}.qkv.bias", _BT_LAYER + "self_attn.in_proj_bias"),
    Rule.of("layers.{i}.out.weight", _BT_LAYER + "self_attn.out_proj.weight"),
    Rule.of("layers.{i}.out.bias", _BT_LAYER + "self_attn.out_proj.bias"),
    Rule.of("layers.{i}.ffn1.weight", _BT_LAYER + "linear1.weight"),
    Rule.of("layers.{i}.ffn1.bias", _BT_LAYER + "linear1.bias"),
    Rule.of("layers.{i}.ffn2.weight", _BT_LAYER + "linear2.weight"),
    Rule.of("layers.{i}.ffn2.bias", _BT_LAYER + "linear2.bias"),
    Rule.of("layers.{i}.norm1.weight", _BT_LAYER + "norm1.weight"),
    Rule.of("layers.{i}.norm1.bias", _BT_LAYER + "norm1.bias"),
    Rule.of("layers.{i}.norm2.weight", _BT_LAYER + "norm2.weight"),
    Rule.of("layers.{i}.norm2.bias", _BT_LAYER + "norm2.bias"),
    Rule.of("final_norm.weight", "transformer.norm.weight"),
    Rule.of("final_norm.bias", "transformer.norm.bias"),
]


def bt_keymap() -> KeyMap:
    """packformer encoder-layer names <-> nn.TransformerEncoder names (in_proj_weight = our fused qkv)."""
    return KeyMap(BT_RULES, ignore=["head.*"], optional=["final_norm.weight", "final_norm.bias",
                                                         "embeddings.token_type.weight", "embeddings.norm.weight",
                                                         "embeddings.norm.bias"])


class PaddedEmbeddings(nn.Module):
    """Our embeddings on right-padded ids [B, L]; positions restart at `position_offset` for each
    sequence, as fairseq/torchtext (`make_positions`) and BERT number them."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.pad_id, self.offset = cfg.pad_token_id, cfg.position_offset
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size) if cfg.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.embedding_layer_norm else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids.ne(self.pad_id).long()                                          # [B, L]
        pos = (torch.cumsum(mask, dim=1) - 1 + self.offset) * mask                 # [B, L]
        x = self.word(ids) + self.position(pos)                                    # [B, L, H]
        if self.token_type is not None:
            x = x + self.token_type.weight[0]
        return self.norm(x) if self.norm is not None else x


class BetterTransformerModel(nn.Module):
    """embeddings -> nn.TransformerEncoder(src_key_padding_mask) -> optional first-token head.

    Torch picks its fast path (`aten::_transformer_encoder_layer_fwd`) at forward time when the model is
    in eval mode and autograd is not recording; with `use_nested_tensor` True it also skips the padding
    (sparsity). `set_sparsity` flips that attribute, which torch reads at every forward.
    """

    def __init__(self, cfg: EncoderConfig, embeddings: PaddedEmbeddings, transformer: nn.TransformerEncoder,
                 head: ClassificationHead | None):
        super().__init__()
        self.config = cfg
        self.embeddings, self.transformer, self.head = embeddings, transformer, head

    def set_sparsity(self, on: bool) -> None:
        if on and self.config.num_heads % 2:
            # torch would build the nested tensor, then fail in MultiheadAttention ("num_heads is not even")
            raise ValueError(f"torch's nested-tensor (sparsity) path needs an even number of heads; this model has "
                             f"{self.config.num_heads}")
        self.transformer.use_nested_tensor = bool(on)

    def features(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] ids -> [B, L, H]; values at padded positions are unspecified (zeros on the nested path)."""
        padding_mask = ids.eq(self.config.pad_token_id)                            # [B, L], True = pad
        return self.transformer(self.embeddings(ids), src_key_padding_mask=padding_mask)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.features(ids)                                                     # [B, L, H]
        if self.head is None:
            return x
        h = self.head.dense(x[:, 0].to(self.head.dense.weight.dtype))              # [B, H]
        h = torch.tanh(h) if self.head.act == "tanh" else F.relu(h)
        return self.head.out(h)                                                    # [B, C]


def to_better_transformer(encoder: Encoder, head: ClassificationHead | None = None,
                          dropout: float = 0.1) -> BetterTransformerModel:
    """A Better-Transformer model (eval mode, fp32, CPU) with a copy of `encoder`'s and `head`'s weights.
    `dropout` only matters in train mode (torchtext's XLM-R uses 0.1)."""
    cfg = encoder.config
    if cfg.activation not in ("gelu", "relu"):
        raise ValueError(f"nn.TransformerEncoderLayer's fast path supports relu and gelu, not {cfg.activation!r}")
    layer = nn.TransformerEncoderLayer(d_model=cfg.hidden_size, nhead=cfg.num_heads,
                                       dim_feedforward=cfg.intermediate_size, dropout=dropout,
                                       activation=cfg.activation, layer_norm_eps=cfg.layer_norm_eps,
                                       batch_first=True, norm_first=cfg.norm_first)
    final = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.final_layer_norm else None
    import warnings
    with warnings.catch_warnings():   # torch warns when norm_first disables nested tensors: expected
        warnings.simplefilter("ignore")
        transformer = nn.TransformerEncoder(layer, cfg.num_layers, norm=final, enable_nested_tensor=True)
    model = BetterTransformerModel(cfg, PaddedEmbeddings(cfg), transformer,
                                   copy.deepcopy(head) if head is not None else None)
    ours = {k: v.detach().float().cpu().clone() for k, v in encoder.state_dict().items()}
    state = bt_keymap().invert(ours, cfg.num_layers)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise CheckpointError(f"cannot build the Better Transformer peer: missing {missing}, unused {unexpected}")
    return model.float().eval()
