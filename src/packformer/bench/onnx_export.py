"""The ONNX Runtime peer: the transformers model exported with torch.onnx (TorchScript exporter,
dynamic batch and length), then ONNX Runtime's transformer optimizer (attention / LayerNorm / GELU
fusions) where it works and keeps the outputs, run on CPU with as many threads as torch uses."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..model import Encoder
from . import convert


class _HiddenStates(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: the graph ONNX sees."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def _session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _example(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 16 and 11 regular tokens (the second padded): the export's example and its check."""
    lo = 4 if cfg.model_type != "bert" else min(999, cfg.vocab_size - 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(lo, cfg.vocab_size - 1, (2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    ids[1, 11:] = cfg.pad_token_id
    return ids, mask


def export(encoder: Encoder, path: Path) -> nn.Module:
    """Write the plain ONNX graph (input_ids, attention_mask) -> last_hidden_state to `path`, dynamic
    batch and length; returns the exported module, to check outputs against."""
    hf = convert.to_hf(encoder, attn_implementation="eager")
    wrapper = _HiddenStates(hf).eval()   # eval: the exporter restores the wrapper's mode (and its children's)
    ids, mask = _example(encoder.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], opset_version=17, dynamo=False,
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                                        "last_hidden_state": {0: "batch", 1: "seq"}})
    return wrapper


def export_session(encoder: Encoder, workdir: Path, threads: int):
    """Export, optimize, check and open. Returns (session, notes)."""
    cfg = encoder.config
    workdir.mkdir(parents=True, exist_ok=True)
    plain = workdir / "model.onnx"
    wrapper = export(encoder, plain)
    big = sum(p.numel() for p in wrapper.parameters()) * 4 > 1.8 * 2**30
    ids, mask = _example(cfg)
    with torch.inference_mode():
        ref = wrapper(ids, mask)[mask.bool()]
    notes = f"torch.onnx.export (TorchScript) of transformers eager, opset 17, {threads} threads"
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        opt = optimize_model(str(plain), model_type="bert", num_heads=cfg.num_heads, hidden_size=cfg.hidden_size)
        fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
        fused_path = workdir / "model_opt.onnx"
        opt.save_model_to_file(str(fused_path), use_external_data_format=big)
        sess = _session(fused_path, threads)
        out = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
        err = (out[mask.bool()] - ref).abs().max().item()
        if err <= 1e-3:
            return sess, notes + f"; transformer optimizer fusions {fused} (max abs diff {err:.1e} on export check)"
        notes += f"; optimizer output differed by {err:.1e}, plain export used"
    except Exception as e:  # the optimizer does not know every graph: fall back to the plain export
        notes += f"; optimizer failed ({type(e).__name__}: {str(e)[:120]}), plain export used"
    return _session(plain, threads), notes
