"""squeeze.cli: the Typer app. Commands are thin: parse, call the library, render."""
