"""The list of command modules; each has ``register(app)``."""

from squeeze.cli import cmd_inspect

MODULES = [cmd_inspect]
