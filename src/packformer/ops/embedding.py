"""Fused embeddings over packed tokens: word[id] + position[pos] (+ token_type[tt]) then LayerNorm.

Unfused this is three gathers, two or three adds and a LayerNorm, each a pass over [T, H]. The kernel
gathers the rows, sums in fp32 and normalises in one pass. Without token-type ids, every token is
segment 0: row 0 of the type table is added (as the reference model does).

- `embed_layernorm_ref`: plain torch in fp32 (the specification).
- `_embed_kernel`: Triton, one token per program.
- `embed_layernorm`: the launcher (checks shapes/dtypes; the kernel where it can run, else the reference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import check, kernel_ok, next_pow2, tl, triton


def embed_layernorm_ref(ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor | None,
                        word: torch.Tensor, pos: torch.Tensor, types: torch.Tensor | None,
                        weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """[T] ids, positions (, token types) -> [T, H] in the tables' dtype; sums and LN in fp32."""
    acc = torch.promote_types(word.dtype, torch.float32)
    x = word[ids].to(acc)
    if pos is not None:
        x = x + pos[positions].to(acc)
    if types is not None:
        x = x + (types[token_types].to(acc) if token_types is not None else types[0].to(acc))
    if weight is not None:
        x = F.layer_norm(x, (x.shape[-1],), weight.to(acc), bias.to(acc), eps)
    return x.to(word.dtype)


if triton is not None:
    @triton.jit
    def _embed_kernel(IDS, POS, TT, WORD, PTAB, TTAB, W, B, Y, stride_word, stride_pos, stride_tt, stride_y, N, eps,
                      HAS_POS: tl.constexpr, HAS_TYPES: tl.constexpr, HAS_TT: tl.constexpr, HAS_LN: tl.constexpr,
                      BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < N
        tok = tl.load(IDS + row).to(tl.int64)
        x = tl.load(WORD + tok * stride_word + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_POS:
            p = tl.load(POS + row).to(tl.int64)
            x += tl.load(PTAB + p * stride_pos + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_TYPES:
            if HAS_TT:
                tt = tl.load(TT + row).to(tl.int64)
            else:
                tt = 0
            x += tl.load(TTAB + tt * stride_tt + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_LN:
            mean = tl.sum(x, axis=0) / N
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / N + eps)
            w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
            x = d * rstd * w + b
        tl.store(Y + row * stride_y + cols, x.to(Y.dtype.element_ty), mask=mask)


def embed_layernorm(ids: torch.Tensor, positions: torch.Tensor, token_types: torch.Tensor | None,
                    word: torch.Tensor, pos: torch.Tensor | None, types: torch.Tensor | None,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed embeddings [T, H] (see `embed_layernorm_ref`). Ids must already be inside the tables
    (the engine checks them on the host): the kernel does not bounds-check its gathers."""
    check(ids.dim() == 1 and positions.shape == ids.shape, f"ids and positions must both be [T], got "
                                                           f"{tuple(ids.shape)} and {tuple(positions.shape)}")
    check(token_types is None or token_types.shape == ids.shape, "token_types must be [T] like ids")
    check(not ids.is_floating_point() and not positions.is_floating_point(), "ids and positions must be integers")
    h = word.shape[1]
    check(word.dim() == 2 and (pos is None or (pos.dim() == 2 and pos.shape[1] == h)),
          "word and position tables must be [V, H], [P, H]")
    check(types is None or (types.dim() == 2 and types.shape[1] == h), "type table must be [K, H]")
    check(all(t.stride(1) == 1 for t in (word, pos, types) if t is not None),
          "embedding tables need contiguous rows")
    check((weight is None) == (bias is None), "LayerNorm weight and bias come together")
    if weight is not None:
        check(weight.shape == (h,) and bias.shape == (h,), f"LayerNorm weight and bias must be [{h}]")
    check(word.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {word.dtype}")
    if out is not None:
        check(out.shape == (ids.shape[0], h) and out.dtype == word.dtype and out.stride(1) == 1,
              f"out must be [{ids.shape[0]}, {h}] {word.dtype}")
    if not kernel_ok(ids, word):
        y = embed_layernorm_ref(ids, positions, token_types, word, pos, types, weight, bias, eps)
        return y if out is None else out.copy_(y)
    t = ids.shape[0]
    y = torch.empty(t, h, dtype=word.dtype, device=word.device) if out is None else out
    if t:
        block = next_pow2(h)
        dummy = word
        _embed_kernel[(t,)](ids, positions, token_types if token_types is not None else ids, word,
                            pos if pos is not None else dummy,
                            types if types is not None else dummy, weight if weight is not None else dummy,
                            bias if bias is not None else dummy, y, word.stride(0),
                            pos.stride(0) if pos is not None else 0,
                            types.stride(0) if types is not None else 0, y.stride(0), h, eps,
                            HAS_POS=pos is not None, HAS_TYPES=types is not None, HAS_TT=token_types is not None, HAS_LN=weight is not None,
                            BLOCK=block, num_warps=min(8, max(1, block // 256)))
    return y
