"""``squeeze eval``: fidelity of a checkpoint or an ONNX graph against a reference."""

from __future__ import annotations

import typer
from rich.table import Table

from squeeze.cli.common import console, data_spec, fmt_num, print_json, progress
from squeeze.cli.options import CalibAlias, Data, Json, Samples, SeqLen, TrustPickle, pick_data
from squeeze.compress.run import load


def evaluate(
    model: str = typer.Argument(..., help="A checkpoint folder or an .onnx file."),
    ref: str = typer.Option(..., "--ref", help="The reference checkpoint."),
    data: Data = "builtin",
    calib: CalibAlias = None,
    samples: Samples = 64,
    seq_len: SeqLen = 128,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
) -> None:
    """Fidelity of a checkpoint or ONNX graph against a reference on held-apart data.

    Example: squeeze eval pruned --ref model --data texts.jsonl
    """
    from squeeze.compress.eval_graph import evaluate_against
    from squeeze.compress.run import load as load_model

    reference = load(ref, trust_pickle=trust_pickle)  # a bad reference's error stays the only line
    spec = data_spec(pick_data(data, calib), samples, seq_len, eval_samples=samples)
    with progress() as bar:
        what = "the graph in ONNX Runtime" if model.endswith(".onnx") else "the model"

        def load_other(path: str):
            bar(f"eval: loading {path}", 0, 2)
            other = load_model(path, trust_pickle=trust_pickle)
            bar(f"eval: running the reference and {what} on {samples} samples", 1, 2)
            return other

        if model.endswith(".onnx"):  # a checkpoint is loaded first (load_other)
            bar(f"eval: running the reference and {what} on {samples} samples", 1, 2)
        result = evaluate_against(model, reference, spec, load=load_other)
        bar("eval: done", 2, 2)
    if as_json:
        print_json(result)
        return
    t = Table(title=f"{model} vs {ref}", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    for k, v in result.items():
        t.add_row(k, fmt_num(v))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("eval")(evaluate)
