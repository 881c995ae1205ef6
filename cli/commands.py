"""The list of command modules; each has ``register(app)``."""

from squeeze.cli import cmd_export, cmd_inspect

MODULES = [cmd_inspect, cmd_export]
