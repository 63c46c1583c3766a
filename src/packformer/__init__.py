"""packformer: padding-free transformer-encoder inference on packed batches."""
from .batch import PackedBatch, pack, pad_input, unpad_input
from .config import EncoderConfig, preset
from .engine import Model
from .loaders.keymap import CheckpointError
from .loading import DEFAULT_MODEL, load

__version__ = "0.1.0"


def optimize(module, *args, **kwargs):
    """Drop-in packed replacement for a torch.nn.TransformerEncoder (see packformer.loaders.nn_module)."""
    from .loaders.nn_module import optimize as _optimize
    return _optimize(module, *args, **kwargs)


__all__ = ["load", "optimize", "Model", "PackedBatch", "pack", "pad_input", "unpad_input", "EncoderConfig",
           "preset", "CheckpointError", "DEFAULT_MODEL", "__version__"]
