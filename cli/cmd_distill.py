"""``squeeze distill``: heal a compressed model by knowledge distillation from its original.

squeeze distill STUDENT -o OUT                         # teacher: the model STUDENT was made from
squeeze distill STUDENT -o OUT --teacher REF --data wiki --steps 400 --lr 1e-4 --loss layers
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from squeeze.cli.common import (
    console,
    data_spec,
    pass_config,
    print_json,
    report_table,
)
from squeeze.cli.options import DATA_HELP, Dtype, Force, Json, Output, TrustPickle
from squeeze.compress.errors import SqueezeError


@contextlib.contextmanager
def _progress(metrics: dict[str, Any]) -> Iterator[Any]:
    """Bars for the pass's loops; the training bar shows the running loss (silent off a terminal)."""
    if not console.is_terminal:
        yield lambda label, done, total: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[loss]}"),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bars.add_task(label, total=total, loss="")
        loss = metrics.get("running_loss")
        bars.update(tasks[label], completed=done, total=total, loss=f"loss {loss:.4g}" if loss is not None else "")

    with bars:
        yield update


def distill(
    student: str = typer.Argument(..., help="The model to heal: a folder, pkg:NAME/sub or squeeze folder."),
    output: Output = ...,
    teacher: str = typer.Option(None, "--teacher", help="Teacher model (default: the model STUDENT was made from)."),
    data: str = typer.Option(
        "auto",
        "--data",
        help="Training data: auto, wiki, spans, chat, builtin, teacher (decoders), synthetic, a "
        ".txt/.jsonl file, an .npz or image folder; mix with + (wiki+spans).",
    ),
    steps: int = typer.Option(400, "--steps", help="Optimizer steps."),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW, warm-up then cosine decay)."),
    loss: str = typer.Option(
        "layers", "--loss", help="output, hidden (+ last hidden state) or layers (+ every layer)."
    ),
    trainable: str = typer.Option("all", "--trainable", help="all, norms, attn, mlp, blocks, or scales (quantized)."),
    train_layers: str = typer.Option(None, "--train-layers", help="Train only inside these layers (2,3)."),
    samples: int = typer.Option(4096, "--samples", help="Training samples (texts, blocks or images)."),
    seq_len: int = typer.Option(128, "--seq-len", help="Tokens per training sample."),
    batch_size: int = typer.Option(16, "--batch-size", help="Samples per batch."),
    accumulate: int = typer.Option(1, "--accumulate", help="Batches per optimizer step."),
    temperature: float = typer.Option(2.0, "--temperature", help="KL temperature (models with logits)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data order and sampling."),
    precision: str = typer.Option(
        "fp32", "--precision", help="fp32, or bf16 (forwards under bf16 autocast: faster on CPUs with bf16)."
    ),
    calib: str = typer.Option("builtin", "--calib", help=f"Data of the fidelity measurement: {DATA_HELP}"),
    force: Force = False,
    trust_pickle: TrustPickle = False,
    as_json: Json = False,
    dtype: Dtype = None,
) -> None:
    """Train STUDENT toward its teacher (knowledge distillation); the structure stays, weights change."""
    layers = None
    if train_layers is not None:
        try:
            layers = [int(x) for x in train_layers.split(",") if x.strip()]
        except ValueError:
            raise SqueezeError(f"--train-layers: expected layer indices (2,3), got {train_layers!r}") from None
    from squeeze.compress.passes.distill import DistillPassConfig

    cfg = pass_config(
        DistillPassConfig,
        "distill",
        teacher=teacher,
        data=data,
        steps=steps,
        lr=lr,
        loss=loss,
        trainable=trainable,
        train_layers=layers,
        samples=samples,
        seq_len=seq_len,
        batch_size=batch_size,
        accumulate=accumulate,
        temperature=temperature,
        seed=seed,
        precision=precision,
    )
    if output.exists() and not force:
        raise SqueezeError(f"{output} already exists; pass --force to overwrite it")
    for part in data.split("+"):
        if part not in ("auto", "wiki", "spans", "chat", "builtin", "teacher", "synthetic") and not Path(part).exists():
            raise SqueezeError(f"--data: {part}: no such file or folder")
    spec = data_spec(calib, 128, 128)

    from squeeze.compress.checkpoint import save
    from squeeze.compress.passes import PassContext, run_pass
    from squeeze.compress.passes.distill import DistillPass
    from squeeze.compress.run import load

    source = load(student, trust_pickle=trust_pickle)
    from squeeze.compress import dtypes  # the result's storage dtype: --dtype, else the student's own

    dtypes.set_storage(source.model, dtypes.parse(dtype) or dtypes.storage_dtype(source.model))
    pass_ = DistillPass(cfg)
    pass_.check(source.family, [source.model])
    metrics: dict[str, Any] = {}
    with _progress(metrics) as bar:
        ctx = PassContext(family=source.family, checkpoint=source, calibration=spec, progress=bar)
        ctx.metrics = metrics
        ctx.workdir = output.with_name(output.name + ".train")  # a rerun of a killed command resumes here
        new = run_pass(pass_, [source], ctx)
    save(new, output, force=force)
    report, result = new.manifest.ledger[-1], new.manifest.edits[-1]["result"]
    if as_json:
        print_json({"result": result, "report": report, "output": str(output)})
        return
    console.print(report_table(report))
    console.print(
        f"teacher {result['teacher']}, data {result['data']}, trained {result['trained']}: "
        f"loss {result['loss_first']:.4g} -> {result['loss_last']:.4g} in {result['steps']} steps"
    )
    fid = report.get("metrics", {}).get("teacher_fidelity")
    if fid:
        b, a = fid["before"], fid["after"]
        console.print(
            f"against the teacher: cosine mean {b['cos_mean']:.4f} -> {a['cos_mean']:.4f}, "
            f"worst {b['cos_worst']:.4f} -> {a['cos_worst']:.4f}"
        )
    console.print(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command("distill", epilog="Example: squeeze distill pruned -o healed --data wiki --steps 400")(distill)
