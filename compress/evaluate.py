"""Fidelity, size and latency.

Fidelity against a reference is measured on held-apart evaluation batches:

* cosine of the output representation, mean and worst over samples (the mask-aware mean-pooled
  last hidden state for text encoders, the CLS token for ViT, the logits otherwise, compared
  per token and averaged over a sample's real tokens);
* where the model has logits: KL(ref || new) per token, top-1 agreement;
* for causal LMs: perplexity of both on the evaluation text;
* accuracy of both where the batches carry ``labels``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from squeeze.compress.calibration import Batch
from squeeze.compress.families import Family


def count_params(model: nn.Module) -> int:
    """Parameters, tied ones counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes the state dict occupies (tied tensors counted once): what a save writes."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def model_outputs(model: nn.Module, family: Family, batch: Batch) -> dict[str, torch.Tensor]:
    """The outputs squeeze compares and exports: ``logits`` when the model has a head, else
    ``last_hidden_state``."""
    out = family.forward(model, batch)
    logits = getattr(out, "logits", None)
    if logits is not None:
        return {"logits": logits}
    return {"last_hidden_state": out.last_hidden_state}


@dataclass
class Reference:
    """Outputs of one model on a list of batches, with what is needed to score them."""

    family: Family
    outputs: list[dict[str, torch.Tensor]]
    batches: list[Batch]


def reference_outputs(model: nn.Module, family: Family, batches: list[Batch]) -> Reference:
    model.eval()
    outs = [{k: v.float() for k, v in model_outputs(model, family, b).items()} for b in batches]
    return Reference(family=family, outputs=outs, batches=batches)


def _representation(name: str, out: torch.Tensor, batch: Batch, family: Family) -> tuple[torch.Tensor, torch.Tensor]:
    """(vectors, sample index) to take cosines over: one row per sample or per real token."""
    mask = batch.get("attention_mask")
    if name == "last_hidden_state":
        if family.modality == "vision":
            return out[:, 0], torch.arange(out.shape[0])
        m = (mask if mask is not None else torch.ones(out.shape[:2])).unsqueeze(-1).float()
        pooled = (out * m).sum(1) / m.sum(1).clamp_min(1.0)
        return pooled, torch.arange(out.shape[0])
    if out.ndim == 2:  # classification logits
        return out, torch.arange(out.shape[0])
    m = mask.bool() if mask is not None else torch.ones(out.shape[:2], dtype=torch.bool)
    sample = torch.arange(out.shape[0])[:, None].expand(out.shape[:2])
    return out[m], sample[m]


ROWS = 256  # logit rows per float64 chunk: 256 x a 49k vocabulary is ~100 MB, not the batch's GBs


def _per_sample(ref: Reference, new: Reference) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, Batch]]:
    """(output name, reference, new, batch) one sample at a time: float64 copies of a sample's
    logits, not of a whole batch's (32 x 128 tokens x a 49k vocabulary: 1.6 GB each)."""
    for r_out, n_out, batch in zip(ref.outputs, new.outputs, ref.batches):
        ((name, r),) = r_out.items()
        n = n_out[name]
        if r.shape != n.shape:  # another vocabulary or head: nothing here is comparable
            from squeeze.compress.errors import SqueezeError

            raise SqueezeError(
                f"{name} has shape {tuple(n.shape)}, the reference's {tuple(r.shape)}: "
                "not a compressed version of the reference (another vocabulary or head?)"
            )
        for i in range(r.shape[0]):
            yield name, r[i : i + 1], n[i : i + 1], {k: v[i : i + 1] for k, v in batch.items()}


def compare_outputs(ref: Reference, new: Reference) -> dict[str, float]:
    """Fidelity of ``new`` against ``ref`` (same batches)."""
    fam = ref.family
    cos_per_sample: list[torch.Tensor] = []
    kl_sum = agree = n_tok = 0.0
    max_abs = 0.0
    nll_ref = nll_new = 0.0
    n_lm = 0
    acc_ref = acc_new = n_lab = 0
    offset = 0
    for name, r, n, batch in _per_sample(ref, new):
        max_abs = max(max_abs, float((r - n).abs().max()))
        vr, idx = _representation(name, r, batch, fam)
        vn, _ = _representation(name, n, batch, fam)
        cos = F.cosine_similarity(vr.double(), vn.double(), dim=-1)
        per = torch.zeros(int(idx.max()) + 1, dtype=torch.float64).index_add_(0, idx, cos)
        cnt = torch.zeros_like(per).index_add_(0, idx, torch.ones_like(cos))
        cos_per_sample.append(per / cnt.clamp_min(1))
        offset += len(per)
        if name == "logits":
            for i in range(0, vr.shape[0], ROWS):  # float64 over a vocabulary: a few rows at a time
                lr, ln = vr[i : i + ROWS].double().log_softmax(-1), vn[i : i + ROWS].double().log_softmax(-1)
                kl_sum += float((lr.exp() * (lr - ln)).sum())
            agree += float((vr.argmax(-1) == vn.argmax(-1)).sum())
            n_tok += vr.shape[0]
            if fam.causal and r.ndim == 3:
                ids = batch["input_ids"]
                m = batch.get("attention_mask", torch.ones_like(ids))[:, 1:].bool()
                for row in range(ids.shape[0]):
                    tgt = ids[row, 1:]
                    nll_ref += float(F.cross_entropy(r[row, :-1].double(), tgt, reduction="none")[m[row]].sum())
                    nll_new += float(F.cross_entropy(n[row, :-1].double(), tgt, reduction="none")[m[row]].sum())
                n_lm += int(m.sum())
            if "labels" in batch and r.ndim == 2:
                acc_ref += int((r.argmax(-1) == batch["labels"]).sum())
                acc_new += int((n.argmax(-1) == batch["labels"]).sum())
                n_lab += len(batch["labels"])
    cos_all = torch.cat(cos_per_sample) if cos_per_sample else torch.ones(1, dtype=torch.float64)
    res: dict[str, float] = {
        "cos_mean": round(float(cos_all.mean()), 6),
        "cos_worst": round(float(cos_all.min()), 6),
        "max_abs": float(f"{max_abs:.6g}"),
        "samples": len(cos_all),
    }
    if n_tok:
        # KL >= 0; a sum of per-token terms that cancel to rounding came out as -3.9e-17
        res["kl"] = float(f"{max(kl_sum / n_tok, 0.0):.6g}")
        res["top1"] = round(agree / n_tok, 6)
    if n_lm:
        res["ppl_ref"] = round(float(np.exp(nll_ref / n_lm)), 4)
        res["ppl"] = round(float(np.exp(nll_new / n_lm)), 4)
    if n_lab:
        res["acc_ref"] = round(acc_ref / n_lab, 6)
        res["acc"] = round(acc_new / n_lab, 6)
    return res


def fidelity(ref_model: nn.Module, model: nn.Module, family: Family, batches: list[Batch]) -> dict[str, float]:
    """Fidelity of ``model`` against ``ref_model`` on ``batches``."""
    return compare_outputs(reference_outputs(ref_model, family, batches), reference_outputs(model, family, batches))


# ----------------------------------------------------------------- memory and latency


def current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the lifetime peak
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak resident memory (MB) of this process while the ``with`` block runs."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, current_rss_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.peak_mb = current_rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, current_rss_mb())


def ort_session(path: str | Path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_latency_ms(session, feeds: dict[str, np.ndarray], *, warmup: int = 5, runs: int = 30) -> float:
    """Median wall time of one run, in milliseconds, after warm-up."""
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)
