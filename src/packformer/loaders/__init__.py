"""One module per checkpoint format; each returns ModelParts."""
from .keymap import CheckpointError
from .parts import ModelParts

__all__ = ["CheckpointError", "ModelParts"]
