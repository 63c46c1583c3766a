"""NomicBERT's inference path, transcribed for the tests (nomic-embed-text-v1 / v1.5).

The original is remote code: `modeling_hf_nomic_bert.py` with `configuration_hf_nomic_bert.py`
(nomic-ai/contrastors, src/contrastors/models/huggingface/, the same file the checkpoints' `auto_map` names as
nomic-ai/nomic-bert-2048). Recent transformers have a port of their own (NomicBertModel, other config keys,
renamed weights); test_nomic_bert.py checks this transcription against it. This module keeps its module tree and
parameter names, so a state dict saved from `NomicBertModel` here has the keys of a real checkpoint
(`embeddings.word_embeddings.weight`, `emb_ln.weight`, `encoder.layers.{i}.attn.Wqkv.weight`,
`encoder.layers.{i}.mlp.fc11.weight`, `encoder.layers.{i}.norm1.weight`, ...), and its numerics:

- embeddings: word (+ token type, zeros when not given) (+ learned positions only without rotary), then
  `emb_ln`;
- post-norm blocks (`prenorm` false): x = norm1(x + out_proj(attn(x))); x = norm2(x + mlp(x));
- attention: `Wqkv` rows [q; k; v] (`"... (three h d)"`), rotary on the first head_dim * rotary_emb_fraction
  dims of q and k (rotate_half, or GPT-J pairs with `rotary_emb_interleaved`), positions 0..L-1 of the padded
  row, base `rotary_emb_base`; softmax(q k^T / sqrt(d) + mask) v; `out_proj` (its bias follows qkv_proj_bias);
- `rotary_scaling_factor`: dynamic NTK, a larger base once the padded length exceeds max_trained_positions;
- gated MLP (swiglu / geglu): fc2(fc11(x) * act(fc12(x))), act silu / gelu, the hidden size rounded up to a
  multiple of 256; plain MLP (gelu*): fc2(gelu(fc1(x))), exact erf GELU for every gelu variant (the original
  passes F.gelu itself, never the tanh form);
- sequence classification: tanh(pooler.dense(h[:, 0])) -> classifier, the model under `bert.`.

Only the inference path: no dropout, no KV cache, no prenorm / parallel blocks, no vision model.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# GPT2Config's defaults (NomicBertConfig derives from it) and NomicBertConfig's own
DEFAULTS = dict(
    vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12, n_inner=None,
    activation_function="gelu_new", layer_norm_epsilon=1e-5, initializer_range=0.02, pad_token_id=None,
    prenorm=False, parallel_block=False, rotary_emb_fraction=0.0, qkv_proj_bias=True, rotary_emb_base=10_000,
    rotary_emb_scale_base=None, rotary_emb_interleaved=False, mlp_fc1_bias=True, mlp_fc2_bias=True,
    use_rms_norm=False, causal=False, type_vocab_size=2, pad_vocab_size_multiple=1, rotary_scaling_factor=None,
    max_trained_positions=2048,
)


class Config:
    """config.json as the original reads it: GPT2-style names, NomicBertConfig defaults."""

    def __init__(self, d: dict):
        for k, v in {**DEFAULTS, **d}.items():
            setattr(self, k, v)
        m = self.pad_vocab_size_multiple
        if self.vocab_size % m:          # NomicBertModel.__init__ pads the vocabulary
            self.vocab_size += m - self.vocab_size % m


class NomicBertEmbeddings(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.n_embd, padding_idx=c.pad_token_id)
        self.max_position_embeddings = c.n_positions if c.rotary_emb_fraction <= 0 else 0
        self.type_vocab_size = c.type_vocab_size
        if self.max_position_embeddings > 0:
            self.position_embeddings = nn.Embedding(c.n_positions, c.n_embd)
        if self.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.n_embd)

    def forward(self, input_ids, token_type_ids):
        x = self.word_embeddings(input_ids)                                           # [B, L, H]
        if self.type_vocab_size > 0:
            x = x + self.token_type_embeddings(token_type_ids)
        if self.max_position_embeddings > 0:
            x = x + self.position_embeddings(torch.arange(input_ids.shape[1]))
        return x


def rotate_half(x, interleaved):
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)                                 # (d two) -> pairs


def apply_rotary_emb(x, cos, sin, interleaved):
    """x [B, L, nh, hd]; cos, sin [L, ro/2]: rotates the first ro dims, keeps the rest."""
    ro = cos.shape[-1] * 2
    if interleaved:   # "... d -> ... 1 (d 2)"
        cos, sin = cos.repeat_interleave(2, -1)[:, None], sin.repeat_interleave(2, -1)[:, None]
    else:             # "... d -> ... 1 (2 d)"
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
    return torch.cat([x[..., :ro] * cos + rotate_half(x[..., :ro], interleaved) * sin, x[..., ro:]], dim=-1)


class NomicBertRotaryEmbedding(nn.Module):
    """cos/sin tables in fp32 from positions 0..L-1 (`pos_idx_in_fp32`); with `rotary_scaling_factor`, the
    dynamic NTK base of NomicBertDynamicNTKRotaryEmbedding once L exceeds max_trained_positions."""

    def __init__(self, dim, base, interleaved, scaling_factor=None, max_trained=2048):
        super().__init__()
        self.dim, self.base, self.interleaved = dim, float(base), interleaved
        self.scaling_factor, self.max_trained = scaling_factor, max_trained

    def inv_freq(self, base):
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def forward(self, q, k):
        seqlen = q.shape[1]
        base = self.base
        if self.scaling_factor and seqlen > self.max_trained:
            base = self.base * ((self.scaling_factor * seqlen / self.max_trained) - (self.scaling_factor - 1)) ** (
                self.dim / (self.dim - 2))
        freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), self.inv_freq(base))   # [L, ro/2]
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        return apply_rotary_emb(q, cos, sin, self.interleaved), apply_rotary_emb(k, cos, sin, self.interleaved)


class NomicBertAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.num_heads = c.n_head
        self.head_dim = c.n_embd // c.n_head
        self.rotary_emb_dim = self.head_dim * c.rotary_emb_fraction
        if self.rotary_emb_dim > 0:
            self.rotary_emb = NomicBertRotaryEmbedding(self.rotary_emb_dim, c.rotary_emb_base, c.rotary_emb_interleaved,
                                                       c.rotary_scaling_factor, c.max_trained_positions)
        self.Wqkv = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.qkv_proj_bias)
        self.out_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.qkv_proj_bias)

    def forward(self, x, mask):
        b, l, _ = x.shape
        q, k, v = self.Wqkv(x).view(b, l, 3, self.num_heads, self.head_dim).unbind(2)   # [B, L, nh, hd] each
        if self.rotary_emb_dim > 0:
            q, k = self.rotary_emb(q, k)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))                          # [B, nh, L, hd]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + mask
        a = scores.softmax(-1) @ v                                                    # [B, nh, L, hd]
        return self.out_proj(a.permute(0, 2, 1, 3).reshape(b, l, -1))


class NomciBertGatedMLP(nn.Module):   # sic: the original's class name
    def __init__(self, c: Config, activation):
        super().__init__()
        hidden = c.n_inner if c.n_inner is not None else int(8 * c.n_embd / 3)
        hidden = int((hidden + 255) // 256 * 256)                                     # multiple_of=256
        self.fc11 = nn.Linear(c.n_embd, hidden, bias=c.mlp_fc1_bias)
        self.fc12 = nn.Linear(c.n_embd, hidden, bias=c.mlp_fc1_bias)
        self.fc2 = nn.Linear(hidden, c.n_embd, bias=c.mlp_fc2_bias)
        self.activation = activation

    def forward(self, x):
        return self.fc2(self.fc11(x) * self.activation(self.fc12(x)))


class NomicBertMLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        hidden = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        self.fc1 = nn.Linear(c.n_embd, hidden, bias=c.mlp_fc1_bias)
        self.fc2 = nn.Linear(hidden, c.n_embd, bias=c.mlp_fc2_bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class NomicBertBlock(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.attn = NomicBertAttention(c)
        if c.activation_function in ("swiglu", "geglu"):
            self.mlp = NomciBertGatedMLP(c, F.silu if c.activation_function == "swiglu" else F.gelu)
        else:
            self.mlp = NomicBertMLP(c)
        self.norm1 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.norm2 = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)

    def forward(self, x, mask):
        x = self.norm1(self.attn(x, mask) + x)
        return self.norm2(self.mlp(x) + x)


class NomicBertEncoder(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.layers = nn.ModuleList(NomicBertBlock(c) for _ in range(c.n_layer))

    def forward(self, x, mask):
        for layer in self.layers:
            x = layer(x, mask)
        return x


class NomicBertPooler(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.dense = nn.Linear(c.n_embd, c.n_embd)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


class NomicBertModel(nn.Module):
    def __init__(self, c: Config, add_pooling_layer: bool = False):
        super().__init__()
        self.config = c
        self.embeddings = NomicBertEmbeddings(c)
        self.emb_ln = nn.LayerNorm(c.n_embd, eps=c.layer_norm_epsilon)
        self.encoder = NomicBertEncoder(c)
        self.pooler = NomicBertPooler(c) if add_pooling_layer else None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        """[B, L] right-padded ids and 0/1 mask -> ([B, L, H] hidden states, pooled [B, H] or None)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.emb_ln(self.embeddings(input_ids, token_type_ids))
        # get_extended_attention_mask: 0 for real keys, the dtype's minimum for padding
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        h = self.encoder(x, mask)
        return h, (self.pooler(h) if self.pooler is not None else None)


class NomicBertForSequenceClassification(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.bert = NomicBertModel(c, add_pooling_layer=True)
        self.classifier = nn.Linear(c.n_embd, c.num_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        return self.classifier(self.bert(input_ids, attention_mask, token_type_ids)[1])     # [B, C]


def config_json(**changes) -> dict:
    """A config.json shaped like nomic-embed-text-v1.5's (the keys NomicBertConfig.save_pretrained writes),
    with `changes` applied."""
    remote = "nomic-ai/nomic-bert-2048--"
    d = {
        "activation_function": "swiglu", "architectures": ["NomicBertModel"], "attn_pdrop": 0.0,
        "auto_map": {"AutoConfig": remote + "configuration_hf_nomic_bert.NomicBertConfig",
                     "AutoModel": remote + "modeling_hf_nomic_bert.NomicBertModel",
                     "AutoModelForMaskedLM": remote + "modeling_hf_nomic_bert.NomicBertForPreTraining"},
        "bos_token_id": None, "causal": False, "dense_seq_output": True, "embd_pdrop": 0.0, "eos_token_id": None,
        "fused_bias_fc": True, "fused_dropout_add_ln": True, "initializer_range": 0.02, "layer_norm_epsilon": 1e-12,
        "max_trained_positions": 2048, "mlp_fc1_bias": False, "mlp_fc2_bias": False, "model_type": "nomic_bert",
        "n_embd": 768, "n_head": 12, "n_inner": 3072, "n_layer": 12, "n_positions": 8192,
        "pad_vocab_size_multiple": 64, "parallel_block": False, "parallel_block_tied_norm": False, "prenorm": False,
        "qkv_proj_bias": False, "reorder_and_upcast_attn": False, "resid_pdrop": 0.0, "rotary_emb_base": 1000,
        "rotary_emb_fraction": 1.0, "rotary_emb_interleaved": False, "rotary_emb_scale_base": None,
        "rotary_scaling_factor": None, "scale_attn_by_inverse_layer_idx": False, "scale_attn_weights": True,
        "summary_activation": None, "summary_first_dropout": 0.0, "summary_proj_to_labels": True,
        "summary_type": "cls_index", "summary_use_proj": True, "torch_dtype": "float32",
        "transformers_version": "4.34.0", "type_vocab_size": 2, "use_cache": True, "use_flash_attn": True,
        "use_rms_norm": False, "use_xentropy": True, "vocab_size": 30528,
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
        model = NomicBertForSequenceClassification(c)
    else:
        model = NomicBertModel(c)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or "emb_ln" in n:
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
    if isinstance(model, NomicBertForSequenceClassification):
        n = model.classifier.out_features
        d.update(architectures=["NomicBertForSequenceClassification"],
                 id2label={str(i): f"LABEL_{i}" for i in range(n)}, label2id={f"LABEL_{i}": i for i in range(n)})
    (folder / "config.json").write_text(json.dumps(d, indent=2))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


@torch.no_grad()
def padded_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states [B, L, H] (bare model) or logits [B, C] (classifier) on right-padded input."""
    if isinstance(model, NomicBertForSequenceClassification):
        return model(ids, mask)
    return model(ids, mask)[0]
