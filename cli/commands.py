"""The list of command modules; each has ``register(app)``."""

from squeeze.cli import cmd_export, cmd_factorize, cmd_inspect, cmd_kernels, cmd_merge, cmd_prune, cmd_quantize, cmd_run
from squeeze.cli import cmd_reparam
from squeeze.cli import cmd_distill
from squeeze.cli import cmd_fuse
from squeeze.cli import cmd_check, cmd_eval

MODULES = [cmd_inspect, cmd_export, cmd_check, cmd_eval, cmd_merge, cmd_run, cmd_prune, cmd_quantize, cmd_kernels, cmd_factorize, cmd_reparam, cmd_distill, cmd_fuse]
