"""GTE v1.5 / mGTE ("new") inference path, transcribed for the tests (gte-base-en-v1.5, gte-large-en-v1.5,
gte-multilingual-base).

The original is remote code: `modeling.py` and `configuration.py` of Alibaba-NLP/new-impl, which the
checkpoints' `auto_map` names (`Alibaba-NLP/new-impl--modeling.NewModel`). Recent transformers have a port of
their own (GteModel, model_type "gte", renamed weights, no NTK scaling); test_gte.py checks this transcription
against it. This module keeps its module tree and parameter names, so a state dict saved from `NewModel` here has the
keys of a real checkpoint (`embeddings.word_embeddings.weight`, `embeddings.LayerNorm.weight`,
`encoder.layer.{i}.attention.qkv_proj.weight`, `encoder.layer.{i}.attention.o_proj.bias`,
`encoder.layer.{i}.mlp.up_gate_proj.weight`, `encoder.layer.{i}.mlp.down_proj.weight`,
`encoder.layer.{i}.attn_ln.weight`, `encoder.layer.{i}.mlp_ln.weight`, ...), and its numerics:

- embeddings: word (+ token type when type_vocab_size > 0, zeros when not given), then the LayerNorm (always an
  nn.LayerNorm, whatever `layer_norm_type` says for the layers); no absolute positions with
  position_embedding_type "rope";
- rotary on the whole head, rotate_half layout, positions 0..L-1 of the padded row, base `rope_theta`; with
  rope_scaling {"type": "ntk", "factor": f} (NTKScalingRotaryEmbedding, `mixed_b` unset) the frequencies
  are 1 / (theta * f) ** (2i / d) / f ** (2 / d), fixed when the model is built;
- attention: `qkv_proj` rows [q; k; v] (`pack_qkv`; else q_proj, k_proj, v_proj), all with biases;
  softmax(q k^T / sqrt(d) + mask) v; `o_proj` with a bias (NewAttention's eager path; SDPA and xformers
  compute the same function);
- post-norm layers: x = attn_ln(x + o_proj(attn(x))); x = mlp_ln(x + mlp(x));
- gated MLP: `up_gate_proj` (no bias) rows are [up; gate], out = down_proj(act(gate) * up), down_proj with a
  bias; act from hidden_act (ACT2FN: "gelu" is the exact erf GELU);
- sequence classification: tanh(pooler.dense(h[:, 0])) -> classifier, the model under `new.`.

Only the inference path: no dropout, no unpadding (it changes the layout, not the function), no
logn_attention_scale, no RMSNorm layers, no absolute positions.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

# NewConfig's defaults (PretrainedConfig's pad_token_id is None)
DEFAULTS = dict(
    vocab_size=30528, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", max_position_embeddings=2048, type_vocab_size=1, layer_norm_type="layer_norm",
    layer_norm_eps=1e-12, position_embedding_type="rope", rope_theta=10000.0, rope_scaling=None, pack_qkv=True,
    unpad_inputs=False, use_memory_efficient_attention=False, logn_attention_scale=False,
    logn_attention_clip1=False, pad_token_id=None,
)


class Config:
    def __init__(self, d: dict):
        for k, v in {**DEFAULTS, **d}.items():
            setattr(self, k, v)


def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


class RotaryEmbedding(nn.Module):
    """RotaryEmbedding / NTKScalingRotaryEmbedding: the frequencies are fixed at construction; the cos/sin
    cache of the original spans max_position_embeddings (* factor) positions and grows on demand, so a
    table for positions 0..L-1 equals its first L rows."""

    def __init__(self, dim, base, scaling_factor=None):
        super().__init__()
        self.dim = dim
        if scaling_factor is None:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        else:   # fixed NTK (mixed_b None)
            inv_freq = 1.0 / ((base * scaling_factor) ** (torch.arange(0, dim, 2).float() / dim))
            inv_freq = inv_freq / scaling_factor ** (2 / dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len):
        t = torch.arange(seq_len, dtype=torch.float32)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)                                        # [L, d]
        return emb.cos(), emb.sin()


class NewEmbeddings(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        scaling = c.rope_scaling["factor"] if c.rope_scaling is not None else None
        self.rotary_emb = RotaryEmbedding(c.hidden_size // c.num_attention_heads, c.rope_theta, scaling)
        self.type_vocab_size = c.type_vocab_size
        if self.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids, token_type_ids=None):
        b, l = input_ids.shape
        x = self.word_embeddings(input_ids)                                            # [B, L, H]
        position_ids = torch.arange(l).expand(b, -1)
        cos, sin = self.rotary_emb(l)
        rope = cos[position_ids].unsqueeze(2), sin[position_ids].unsqueeze(2)          # [B, L, 1, d]
        if self.type_vocab_size > 0:
            if token_type_ids is None:
                token_type_ids = position_ids.mul(0)
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x), rope


class NewAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.num_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.pack_qkv = c.pack_qkv
        if self.pack_qkv:
            self.qkv_proj = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=True)
        else:
            self.q_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
            self.k_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
            self.v_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)
        self.o_proj = nn.Linear(c.hidden_size, c.hidden_size, bias=True)

    def forward(self, x, bias, rope):
        if self.pack_qkv:
            qkv = self.qkv_proj(x).split(self.num_heads * self.head_dim, dim=-1)
        else:
            qkv = [self.q_proj(x), self.k_proj(x), self.v_proj(x)]
        q, k, v = [t.view(t.shape[:-1] + (self.num_heads, self.head_dim)) for t in qkv]   # [B, L, nh, hd]
        q, k = apply_rotary_pos_emb(q, k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                              # [B, nh, L, hd]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias
        a = (scores.softmax(-1) @ v).permute(0, 2, 1, 3)                               # [B, L, nh, hd]
        return self.o_proj(a.reshape(a.shape[:2] + (-1,)))


class NewGatedMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.intermediate_size = c.intermediate_size
        self.up_gate_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=True)
        self.act_fn = ACT2FN[c.hidden_act]

    def forward(self, x):
        up, gate = torch.split(self.up_gate_proj(x), self.intermediate_size, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)


class NewLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attention = NewAttention(c)
        self.mlp = NewGatedMLP(c)
        self.attn_ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp_ln = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x, bias, rope):
        x = self.attn_ln(x + self.attention(x, bias, rope))
        return self.mlp_ln(x + self.mlp(x))


class NewEncoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.layer = nn.ModuleList(NewLayer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, bias, rope):
        for layer in self.layer:
            x = layer(x, bias, rope)
        return x


class NewPooler(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class NewModel(nn.Module):
    def __init__(self, c: Config, add_pooling_layer: bool = False):
        super().__init__()
        self.config = c
        self.embeddings = NewEmbeddings(c)
        self.encoder = NewEncoder(c)
        self.pooler = NewPooler(c) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """[B, L] right-padded ids and 0/1 mask -> ([B, L, H] hidden states, pooled [B, H] or None)."""
        x, rope = self.embeddings(input_ids, token_type_ids)
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        h = self.encoder(x, bias, rope)
        return h, (self.pooler(h) if self.pooler is not None else None)


class NewForSequenceClassification(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.new = NewModel(c, add_pooling_layer=True)
        self.classifier = nn.Linear(c.hidden_size, c.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.classifier(self.new(input_ids, attention_mask, token_type_ids)[1])     # [B, C]


def config_json(**changes) -> dict:
    """A config.json shaped like gte-base-en-v1.5's (what NewConfig.save_pretrained writes), with `changes`."""
    impl = "Alibaba-NLP/new-impl--"
    d = {
        "architectures": ["NewModel"], "attention_probs_dropout_prob": 0.0,
        "auto_map": {"AutoConfig": impl + "configuration.NewConfig", "AutoModel": impl + "modeling.NewModel",
                     "AutoModelForMaskedLM": impl + "modeling.NewForMaskedLM",
                     "AutoModelForMultipleChoice": impl + "modeling.NewForMultipleChoice",
                     "AutoModelForQuestionAnswering": impl + "modeling.NewForQuestionAnswering",
                     "AutoModelForSequenceClassification": impl + "modeling.NewForSequenceClassification",
                     "AutoModelForTokenClassification": impl + "modeling.NewForTokenClassification"},
        "classifier_dropout": None, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
        "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12,
        "layer_norm_type": "layer_norm", "logn_attention_clip1": False, "logn_attention_scale": False,
        "max_position_embeddings": 8192, "model_type": "new", "num_attention_heads": 12, "num_hidden_layers": 12,
        "pack_qkv": True, "pad_token_id": 0, "position_embedding_type": "rope",
        "rope_scaling": {"factor": 2.0, "type": "ntk"}, "rope_theta": 500000, "torch_dtype": "float32",
        "transformers_version": "4.39.1", "type_vocab_size": 0, "unpad_inputs": False,
        "use_memory_efficient_attention": False, "vocab_size": 30528,
    }
    d.update(changes)
    return d


def build(config: dict, num_labels: int = 0, seed: int = 0) -> nn.Module:
    """Random weights: Linear ones of unit output scale (attention far from uniform, so positions matter),
    embeddings normal(0, 0.5), biases and norms perturbed so a dropped or swapped one shows; eval mode."""
    c = Config(config)
    torch.manual_seed(seed)
    if num_labels:
        c.num_labels = num_labels
        model = NewForSequenceClassification(c)
    else:
        model = NewModel(c)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "_ln." in n:
                p.copy_((1.0 if n.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.dim() == 2 and "embeddings" not in n:   # Linear: unit-scale outputs, sharp attention
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.normal_(0.0, 0.5)
    return model.eval()


def save(model: nn.Module, config: dict, folder: Path) -> Path:
    """config.json + model.safetensors, as the checkpoint on the hub is laid out."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    d = dict(config)
    if isinstance(model, NewForSequenceClassification):
        n = model.classifier.out_features
        d.update(architectures=["NewForSequenceClassification"],
                 id2label={str(i): f"LABEL_{i}" for i in range(n)}, label2id={f"LABEL_{i}": i for i in range(n)})
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@torch.no_grad()
def padded_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, H] (bare model) or logits [B, C] (classifier) on right-padded input."""
    if isinstance(model, NewForSequenceClassification):
        return model(ids, mask)
    return model(ids, mask)[0]
