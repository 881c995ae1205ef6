"""``distill``: heal a compressed student by knowledge distillation from its original."""

from squeeze.compress.passes.distill.pass_ import (
    DistillPass,
    DistillPassConfig,
    DistillPassResult,
    layer_map_from_edits,
)

__all__ = ["DistillPass", "DistillPassConfig", "DistillPassResult", "layer_map_from_edits"]
