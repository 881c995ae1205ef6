"""squeeze.cli: the Typer app. Commands are thin: parse, call the library, render."""

import os

# PyTorch's C++ warnings bypass Python's warning filters and leak into the terminal; the level is
# read once when torch loads, so it is set here, before any command module imports torch.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
