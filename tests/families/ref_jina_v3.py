"""Jina Embeddings v3 as its remote code runs it, transcribed for tests (not part of packformer).

The remote code (jinaai/xlm-roberta-flash-implementation) wraps `XLMRobertaModel` (modeling_xlm_roberta.py:
embeddings, `emb_ln`, post-norm blocks of `mixer` = MHA with a fused `Wqkv` and rotary, `mlp` = fc1 / GELU
/ fc2, `norm1` / `norm2`, a pooler) in `XLMRobertaLoRA` (modeling_lora.py), which registers a LoRA
parametrization on the weight of every nn.Linear and nn.Embedding. A forward takes `adapter_mask` [B], one
task index per row: the embeddings, every Linear and the pooler then run each group of rows that share a
task with that task's adapted weight W + (B A) * alpha / rank, and rows without a mask run the base weight.
`encode(texts, task=...)` prepends the task's instruction, mean-pools over the attention mask and
L2-normalizes.

This is the CPU path of that code (no flash attention): padded rows [B, L] with a key-padding mask (an
additive -10000 on padded keys), rotary positions 0..L-1 in every row, dropout off. Module and parameter
names are the remote code's, so `state_dict()` has the real checkpoint's keys (`roberta.` prefix,
`parametrizations.weight.original`, `parametrizations.weight.0.lora_A`), and `save_folder` writes a
folder shaped like the released one (config.json with auto_map, lora_adaptations, task_instructions).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn

TASKS = ["retrieval.query", "retrieval.passage", "separation", "classification", "text-matching"]
INSTRUCTIONS = {"retrieval.query": "Represent the query for retrieving evidence documents: ",
                "retrieval.passage": "Represent the document for retrieval: ",
                "separation": "", "classification": "", "text-matching": ""}


def released_config(**changes) -> dict:
    """config.json of jinaai/jina-embeddings-v3 (as released), with `changes` applied."""
    d = {
        "_name_or_path": "jinaai/jina-embeddings-v3", "architectures": ["XLMRobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "auto_map": {
            "AutoConfig": "jinaai/xlm-roberta-flash-implementation--configuration_xlm_roberta.XLMRobertaFlashConfig",
            "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA",
            "AutoModelForMaskedLM": "jinaai/xlm-roberta-flash-implementation--modeling_xlm_roberta.XLMRobertaForMaskedLM",
            "AutoModelForPreTraining":
                "jinaai/xlm-roberta-flash-implementation--modeling_xlm_roberta.XLMRobertaForPreTraining"},
        "bos_token_id": 0, "classifier_dropout": None, "emb_pooler": None, "eos_token_id": 2, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 4096,
        "layer_norm_eps": 1e-05, "load_trained_adapters": True, "lora_adaptations": list(TASKS), "lora_alpha": 1,
        "lora_dropout_p": 0.0, "lora_main_params_trainable": False, "lora_rank": 4,
        "matryoshka_dimensions": [32, 64, 128, 256, 512, 768, 1024], "max_position_embeddings": 8194,
        "model_type": "xlm-roberta", "num_attention_heads": 16, "num_hidden_layers": 24, "output_past": True,
        "pad_token_id": 1, "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
        "task_instructions": dict(INSTRUCTIONS), "torch_dtype": "bfloat16", "transformers_version": "4.41.2",
        "truncate_dim": None, "type_vocab_size": 1, "use_cache": True, "use_flash_attn": True, "vocab_size": 250002,
    }
    d.update(changes)
    return d


# ---- LoRA (modeling_lora.py) --------------------------------------------------------------------------------

class LoRAParametrization(nn.Module):
    """Per-task factors of one weight. A Linear weight [out, in] gets lora_A [n, rank, in] and lora_B
    [n, out, rank], delta B A; an embedding table [rows, dim] gets lora_A [n, rows, rank] and lora_B
    [n, rank, dim], delta A B (the factors are stored the other way round, so that tied weights share them).
    The parametrization itself is the identity: the adapted weight is computed only where a task is given."""

    def __init__(self, fan_in: int, fan_out: int, embedding: bool, num_adaptations: int, rank: int, alpha: float):
        super().__init__()
        self.embedding = embedding
        if embedding:
            self.lora_A = nn.Parameter(torch.zeros(num_adaptations, fan_in, rank))
            self.lora_B = nn.Parameter(torch.randn(num_adaptations, rank, fan_out))
        else:
            a = torch.zeros(num_adaptations, rank, fan_in)
            for i in range(num_adaptations):
                nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
            self.lora_A = nn.Parameter(a)
            self.lora_B = nn.Parameter(torch.zeros(num_adaptations, fan_out, rank))
        self.scaling = alpha / rank
        # dropout_p is 0 at inference: the remote code's dropout mask buffer (not saved) is all ones
        self.register_buffer("lora_dropout_mask", torch.ones((fan_in, 1) if embedding else (1, fan_in)),
                             persistent=False)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return X

    def adapted(self, X: torch.Tensor, task: int) -> torch.Tensor:
        """X + (B A) * scaling for a Linear, X + (A B) * scaling for an embedding: the remote code's lora_forward."""
        a, b = self.lora_A[task], self.lora_B[task]          # dropout_p 0: the remote code skips the mask
        product = torch.matmul(a, b) if self.embedding else torch.matmul(b, a)
        return X + product.view(X.shape) * self.scaling


def add_lora(module: nn.Module, num_adaptations: int, rank: int, alpha: float) -> None:
    """Register the parametrization on every nn.Linear and nn.Embedding under `module` (XLMRobertaLoRA's
    _register_lora applies it to all of them, the pooler included)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            out_f, in_f = m.weight.shape
            parametrize.register_parametrization(m, "weight", LoRAParametrization(in_f, out_f, False, num_adaptations,
                                                                                  rank, alpha))
        elif isinstance(m, nn.Embedding):
            rows, dim = m.weight.shape
            parametrize.register_parametrization(m, "weight", LoRAParametrization(rows, dim, True, num_adaptations,
                                                                                  rank, alpha))


def task_weight(layer: nn.Module, task: int | None) -> torch.Tensor:
    """The layer's weight for `task` (None: the base weight, as the remote code's forward without task_id)."""
    if task is None or not parametrize.is_parametrized(layer, "weight"):
        return layer.weight
    return layer.parametrizations.weight[0].adapted(layer.weight, task)


def by_task(x: torch.Tensor, adapter_mask: torch.Tensor | None, fn) -> torch.Tensor:
    """fn(rows, task) on each group of rows of `x` [B, ...] sharing a task in `adapter_mask` [B], scattered
    back: how the remote code runs a batch that mixes tasks. No mask: fn(x, None)."""
    if adapter_mask is None:
        return fn(x, None)
    out = None
    for task in torch.unique(adapter_mask).tolist():
        rows = (adapter_mask == task).nonzero(as_tuple=True)[0]
        y = fn(x[rows], int(task))
        if out is None:
            out = torch.empty(x.shape[0], *y.shape[1:], dtype=y.dtype)
        out[rows] = y
    return out


def linear(layer: nn.Linear, x: torch.Tensor, adapter_mask: torch.Tensor | None) -> torch.Tensor:
    return by_task(x, adapter_mask, lambda rows, t: F.linear(rows, task_weight(layer, t), layer.bias))


# ---- rotary (the flash-attn RotaryEmbedding's torch path) -------------------------------------------------------

def rotate_half(x: torch.Tensor, interleaved: bool) -> torch.Tensor:
    if not interleaved:
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, base: float, dim: int, interleaved: bool) -> torch.Tensor:
    """x [B, L, H, D]: the first `dim` dims of every head turned by position (0..L-1) * inv_freq, cos/sin
    computed in fp32 as RotaryEmbedding._update_cos_sin_cache does."""
    seqlen = x.shape[1]
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seqlen, dtype=torch.float32), inv_freq)          # [L, dim/2]
    cos, sin = torch.cos(freqs), torch.sin(freqs)
    if interleaved:
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    else:
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]                           # [1, L, 1, dim]
    rot = x[..., :dim]
    return torch.cat((rot * cos + rotate_half(rot, interleaved) * sin, x[..., dim:]), dim=-1)


# ---- the model (modeling_xlm_roberta.py) ----------------------------------------------------------------------

class Embeddings(nn.Module):
    """XLMRobertaEmbeddings with rotary positions: no position table; word and token-type tables."""

    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"], padding_idx=c["pad_token_id"])
        self.token_type_embeddings = (nn.Embedding(c["type_vocab_size"], c["hidden_size"])
                                      if c["type_vocab_size"] > 0 else None)

    def forward(self, ids: torch.Tensor, adapter_mask: torch.Tensor | None) -> torch.Tensor:
        x = by_task(ids, adapter_mask, lambda rows, t: F.embedding(rows, task_weight(self.word_embeddings, t),
                                                                   self.word_embeddings.padding_idx))
        if self.token_type_embeddings is not None:        # token type 0 everywhere
            types = torch.zeros(ids.shape[1], dtype=torch.long)
            x = x + by_task(ids, adapter_mask, lambda rows, t: F.embedding(
                types, task_weight(self.token_type_embeddings, t)).expand(rows.shape[0], -1, -1))
        return x


class MHA(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.num_heads, self.head_dim = c["num_attention_heads"], h // c["num_attention_heads"]
        self.rotary_dim = int(c.get("rotary_emb_dim") or self.head_dim)
        self.rotary_base = float(c["rotary_emb_base"])
        self.interleaved = bool(c.get("rotary_emb_interleaved", False))
        self.Wqkv = nn.Linear(h, 3 * h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, adapter_mask: torch.Tensor | None) -> torch.Tensor:
        b, l, _ = x.shape
        qkv = linear(self.Wqkv, x, adapter_mask).view(b, l, 3, self.num_heads, self.head_dim)  # "(three h d)"
        q, k, v = qkv.unbind(2)                                                                # [B, L, H, D]
        q = apply_rotary(q, self.rotary_base, self.rotary_dim, self.interleaved)
        k = apply_rotary(k, self.rotary_base, self.rotary_dim, self.interleaved)
        scores = torch.einsum("bthd,bshd->bhts", q, k * (1.0 / math.sqrt(self.head_dim)))
        pad = torch.full((b, l), -10000.0).masked_fill(mask.bool(), 0.0)                 # key padding
        attn = torch.softmax(scores + pad[:, None, None, :], dim=-1)
        ctx = torch.einsum("bhts,bshd->bthd", attn, v).reshape(b, l, -1)
        return linear(self.out_proj, ctx, adapter_mask)


class Mlp(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.fc1 = nn.Linear(c["hidden_size"], c["intermediate_size"])
        self.fc2 = nn.Linear(c["intermediate_size"], c["hidden_size"])
        tanh = c["hidden_act"] in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")
        self.approximate = "tanh" if tanh else "none"

    def forward(self, x: torch.Tensor, adapter_mask: torch.Tensor | None) -> torch.Tensor:
        return linear(self.fc2, F.gelu(linear(self.fc1, x, adapter_mask), approximate=self.approximate), adapter_mask)


class Block(nn.Module):
    """Post-norm: x = norm1(x + mixer(x)); x = norm2(x + mlp(x))."""

    def __init__(self, c: dict):
        super().__init__()
        self.mixer, self.mlp = MHA(c), Mlp(c)
        self.norm1 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.norm2 = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, x, mask, adapter_mask):
        x = self.norm1(self.mixer(x, mask, adapter_mask) + x)
        return self.norm2(self.mlp(x, adapter_mask) + x)


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layers = nn.ModuleList(Block(c) for _ in range(c["num_hidden_layers"]))


class Pooler(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["hidden_size"])


class XLMRobertaModel(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.emb_ln = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)          # add_pooling_layer=True: in the checkpoint, unused by encode()

    def forward(self, ids, mask, adapter_mask=None) -> torch.Tensor:
        x = self.emb_ln(self.embeddings(ids, adapter_mask))
        for layer in self.encoder.layers:
            x = layer(x, mask, adapter_mask)
        return x                                                                       # [B, L, H]


class XLMRobertaLoRA(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.config = c
        self.roberta = XLMRobertaModel(c)
        self.tasks = list(c["lora_adaptations"])
        self.instructions = c["task_instructions"]
        add_lora(self.roberta, len(self.tasks), c["lora_rank"], c["lora_alpha"])

    def forward(self, ids, mask, adapter_mask=None) -> torch.Tensor:
        return self.roberta(ids, mask, adapter_mask)

    def adapter_mask(self, task: str | None, n: int) -> torch.Tensor | None:
        if task is None:
            return None
        if task not in self.tasks:
            raise ValueError(f"Unsupported task {task!r}; supported: {', '.join(self.tasks)}")
        return torch.full((n,), self.tasks.index(task), dtype=torch.int32)

    @torch.no_grad()
    def encode(self, texts: list[str], tokenizer, task: str | None = None, normalize: bool = True) -> torch.Tensor:
        """XLMRobertaLoRA.encode: the task's instruction + text, padded batch, mean pooling, normalize."""
        if task is not None:
            texts = [self.instructions[task] + t for t in texts]
        ids, mask = pad_ids([e.ids for e in tokenizer.encode_batch(texts)], self.config["pad_token_id"])
        h = self(ids, mask, self.adapter_mask(task, len(texts)))
        m = mask.unsqueeze(-1).float()
        emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(emb, p=2, dim=1) if normalize else emb


def pad_ids(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
    return ids, mask


def random_model(c: dict, seed: int = 0, lora_scale: float = 1.0) -> XLMRobertaLoRA:
    """Random weights of realistic scale; every LoRA factor non-zero (a trained adapter's deltas are a few
    percent of the weights), norms and biases perturbed so that a swapped weight shows."""
    torch.manual_seed(seed)
    m = XLMRobertaLoRA(c).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 * lora_scale)
            elif "norm" in name or "emb_ln" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "embeddings" in name else 0.08))
    return m


def save_folder(model: XLMRobertaLoRA, folder: Path, tokenizer_dir: Path | None = None) -> Path:
    """model.safetensors (the remote code's keys) + config.json [+ the tokenizer files of tokenizer_dir]."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(model.config, indent=1))
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder
