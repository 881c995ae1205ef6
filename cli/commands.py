"""The list of command modules; each has ``register(app)``."""

from squeeze.cli import (
    cmd_check,
    cmd_distill,
    cmd_eval,
    cmd_export,
    cmd_factorize,
    cmd_fuse,
    cmd_inspect,
    cmd_kernels,
    cmd_merge,
    cmd_prune,
    cmd_quantize,
    cmd_reparam,
    cmd_run,
)

MODULES = [
    cmd_inspect,
    cmd_export,
    cmd_check,
    cmd_eval,
    cmd_merge,
    cmd_run,
    cmd_prune,
    cmd_quantize,
    cmd_kernels,
    cmd_factorize,
    cmd_reparam,
    cmd_distill,
    cmd_fuse,
]
