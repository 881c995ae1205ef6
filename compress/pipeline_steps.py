"""One step of a recipe job, run and measured (the loop, the cache and the plan: pipeline.py).

``pass_step`` runs a registered pass through ``run.apply`` (which saves it), reloads it from its
folder (what the next step reads, also in an uninterrupted run) and measures its fidelity
against the job's original model. ``export_step`` exports with ``export_folder.export_model`` (as ``squeeze export``: a causal LM
gets the KV-cache graph) into the step's folder, then runs the graph with ONNX Runtime on the job's evaluation data (fidelity against the
original) and at a fixed shape (latency).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from squeeze.compress.calibration import Batch, DataSpec, batches
from squeeze.compress.checkpoint import Checkpoint, atomic_dir, atomic_file, resolve, weight_files
from squeeze.compress.errors import ValidationFailed
from squeeze.compress.evaluate import PeakMemory, Reference, compare_outputs, count_params, reference_outputs
from squeeze.compress.recipe import model_refs
from squeeze.compress.run import apply, load

if TYPE_CHECKING:
    from squeeze.compress.pipeline_plan import JobPlan, Reporter, StepPlan

log = logging.getLogger(__name__)

STEP_FILE = "step.json"
ORIGINAL_FILE = "original.json"
ONNX_NAME = "model.onnx"
BASELINES_DIR = "00-baselines"  # the job's fp32 graph and ORT's dynamic int8 (compress/baselines.py)


def read_step(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / STEP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


class JobState:
    """What a job computes at most once, and only when a step has to run."""

    def __init__(self, jp: JobPlan, rep: Reporter):
        self.jp, self.job, self.rep = jp, jp.job, rep
        self.spec = jp.job.calibration or DataSpec()
        self._ref: Reference | None = None
        self.original: Checkpoint | None = None

    def load_original(self) -> Checkpoint:
        if self.original is None:
            self.original = load(self.job.model, trust_pickle=self.job.trust_pickle)
        return self.original

    @property
    def reference(self) -> Reference:
        """The original model's outputs on the evaluation data (computed once per job)."""
        if self._ref is None:
            orig = self.load_original()
            evals = batches(orig, self.spec.for_eval(), split="eval", warn=log.info)
            self._ref = reference_outputs(orig.model, orig.family, evals)
        return self._ref

    def fidelity(self, model: torch.nn.Module) -> dict[str, float]:
        ref = self.reference
        return compare_outputs(ref, reference_outputs(model, ref.family, ref.batches))

    def original_row(self) -> dict[str, Any]:
        path = self.jp.folder / ORIGINAL_FILE
        try:
            row = json.loads(path.read_text())
            if row.get("key") == self.jp.original_key:
                return row
        except (OSError, json.JSONDecodeError):
            pass
        orig = self.load_original()
        row = {
            "job": self.job.name,
            "step": 0,
            "pass": "original",
            "key": self.jp.original_key,
            "folder": self.job.model,
            "params": count_params(orig.model),
            "bytes": sum(f.stat().st_size for f in weight_files(resolve(self.job.model))[0]),
            "fidelity": {},
            "latency_ms": None,
            "seconds": 0.0,
            "peak_mem_mb": None,
            "warnings": [],
        }
        self.jp.folder.mkdir(parents=True, exist_ok=True)
        write_json(path, row)
        return row


def pass_step(inp: Checkpoint, step: StepPlan, state: JobState) -> tuple[dict[str, Any], Checkpoint]:
    """Run a registered pass; return its ledger row and the result as reloaded from its folder."""
    job = state.job
    new = apply(
        inp,
        step.config,
        others=model_refs(step.config),
        data=state.spec,
        out=step.folder,
        force=True,
        trust_pickle=job.trust_pickle,
        seed=job.seed,
        progress=state.rep.progress,
        workdir=step.folder.with_name(step.folder.name + ".train"),
    )  # training passes resume from here
    ledger = dict(new.manifest.ledger[-1])
    # save() copies the input folder's side files, the previous step's mark among them
    (step.folder / STEP_FILE).unlink(missing_ok=True)
    del new
    result = load(step.folder)  # what the next step reads, also in an uninterrupted run
    row = {
        "config": step.config.model_dump(mode="json", by_alias=True),
        "params": count_params(result.model),
        "bytes": sum(f.stat().st_size for f in weight_files(step.folder)[0]),
        "fidelity": state.fidelity(result.model),
        "fidelity_step": ledger.get("fidelity", {}),
        "latency_ms": None,
        "pass_seconds": ledger.get("seconds"),
        "peak_mem_mb": ledger.get("peak_mem_mb"),
        "warnings": ledger.get("warnings", []),
        "metrics": ledger.get("metrics", {}),
    }
    return row, result


def export_step(inp: Checkpoint, step: StepPlan, state: JobState) -> dict[str, Any]:
    """Export, validate, and measure the graph; a rejected graph is kept in ``<folder>.rejected``."""
    from squeeze.compress.evaluate import ort_session
    from squeeze.compress.export_folder import export_model

    cfg = step.config.model_dump()
    cfg["task"] = _export_task(inp, cfg)
    latency = cfg.pop("latency", True)
    lat_batch, lat_seq = cfg.pop("latency_batch", 1), cfg.pop("latency_seq_len", 128)
    rejected = step.folder.with_name(step.folder.name + ".rejected")
    with PeakMemory() as mem:
        with atomic_dir(step.folder, force=True) as tmp:
            try:
                report = export_model(inp, tmp / ONNX_NAME, data=state.spec, latency=False, force=True, **cfg)
            except ValidationFailed as exc:  # keep the evidence, not under the step's name
                shutil.rmtree(rejected, ignore_errors=True)
                shutil.copytree(tmp, rejected)
                raise ValidationFailed(str(exc).replace(str(tmp), str(rejected))) from None
        shutil.rmtree(rejected, ignore_errors=True)
        path = step.folder / ONNX_NAME
        session = ort_session(path)
        fidelity = _onnx_fidelity(session, state, report["outputs"][0])
        timing, baselines = _timing(path, state, lat_batch, lat_seq) if latency else ({}, None)
    return {
        "config": step.config.model_dump(mode="json", by_alias=True),
        "params": count_params(inp.model),
        "bytes": sum(f.stat().st_size for f in step.folder.iterdir() if f.suffix in (".onnx", ".data")),
        "fidelity": fidelity,
        "fidelity_step": {"validation_max_abs": max(c["max_abs"] for c in report["validation"])},
        "latency_ms": timing.get("latency_ms"),
        **{k: timing[k] for k in ("latency_ratio", "ratio_spread", "reference_ms") if k in timing},
        "latency_shape": [lat_batch, lat_seq] if latency else None,
        "baselines": baselines,
        "pass_seconds": report.get("export_seconds"),
        "peak_mem_mb": round(mem.peak_mb, 1),
        "warnings": [],
        "metrics": {"custom_ops": report.get("custom_ops", [])},
    }


def _export_task(inp: Checkpoint, cfg: dict[str, Any]) -> str:
    """What ``squeeze export`` writes by default (a causal LM: the KV-cache graph); the graph without
    a cache where the step asks for what only that graph has (TensorRT check, dynamo exporter)."""
    from squeeze.compress.export_decoder import WITH_PAST, resolve_task

    plain_only = cfg.get("target", "ort") != "ort" or cfg.get("exporter", "torchscript") != "torchscript"
    return "text-generation" if plain_only and resolve_task("auto", inp) == WITH_PAST else "auto"


def _past_feeds(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` plus what a KV-cache graph also takes for a prefill (positions, an empty past)."""
    from squeeze.compress.evaluate import ort_session
    from squeeze.compress.export_decoder import prefill_feed

    session = ort_session(path)
    batch = {k: torch.from_numpy(v) for k, v in feeds.items()}
    extra = {i.name: prefill_feed(session, i.name, batch) for i in session.get_inputs() if i.name not in feeds}
    return {**feeds, **extra}


def _timing(path: Path, state: JobState, batch: int, seq_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The graph's latency in a fresh process, interleaved with the job's fp32 graph (a ratio with
    its spread, compress/latency.py), and the job's baselines (compress/baselines.py), made once
    per job in ``00-baselines``."""
    from types import SimpleNamespace

    from squeeze.compress.baselines import FP32, job_baselines
    from squeeze.compress.latency import measure

    orig = state.load_original()
    family_inputs = SimpleNamespace(get_inputs=lambda: [SimpleNamespace(name=n) for n in orig.family.model_inputs])
    feeds = _latency_feeds(family_inputs, orig, batch, seq_len)
    folder = state.jp.folder / BASELINES_DIR
    key = f"{state.jp.original_key}-{batch}x{seq_len}"
    baselines = job_baselines(orig, state.reference, folder, key, feeds, state.spec)
    return measure(path, _past_feeds(path, feeds), reference=folder / FP32), baselines


def _onnx_fidelity(session, state: JobState, output: str) -> dict[str, float]:
    """The exported graph, run by ONNX Runtime, against the job's original model."""
    from squeeze.compress.export_decoder import prefill_feed

    ref = state.reference
    names = [i.name for i in session.get_inputs()]
    cached = any(n.startswith("past_key_values") for n in names)  # a KV-cache graph: run as a prefill
    outs = []
    for b in ref.batches:
        feeds = {n: prefill_feed(session, n, b) if cached and n not in b else _feed(b, n) for n in names}
        outs.append({next(iter(ref.outputs[0])): torch.from_numpy(session.run([output], feeds)[0]).float()})
    return compare_outputs(ref, Reference(family=ref.family, outputs=outs, batches=ref.batches))


def _feed(batch: Batch, name: str) -> np.ndarray:
    t = batch.get(name)
    if t is None:  # e.g. token_type_ids that a tokenizer does not emit
        t = torch.zeros_like(batch["input_ids"])
    return t.numpy()


def _latency_feeds(session, ckpt: Checkpoint, batch: int, seq_len: int) -> dict[str, np.ndarray]:
    """Fixed-shape inputs for the latency measurement (values do not change the work done)."""
    cfg, fam = ckpt.model.config, ckpt.family
    g = np.random.default_rng(0)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name == "pixel_values":
            channels, size = fam.image_shape(cfg)
            feeds[inp.name] = g.standard_normal((batch, channels, size, size)).astype(np.float32)
            continue
        seq = min(seq_len, fam.max_positions(cfg) or seq_len)
        if inp.name == "input_ids":
            feeds[inp.name] = g.integers(0, fam.vocab_size(cfg), (batch, seq)).astype(np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((batch, seq), dtype=np.int64)
        else:
            feeds[inp.name] = np.zeros((batch, seq), dtype=np.int64)
    return feeds


def write_json(path: Path, data: Any) -> None:
    with atomic_file(path, force=True) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
