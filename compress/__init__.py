"""squeeze.compress: checkpoints, model families, passes, recipes, evaluation and export."""

from squeeze.compress.checkpoint import Checkpoint, load, save
from squeeze.compress.errors import SqueezeError, ValidationFailed

__version__ = "0.1.0"

__all__ = ["Checkpoint", "SqueezeError", "ValidationFailed", "__version__", "load", "save"]
