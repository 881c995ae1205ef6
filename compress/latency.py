"""Latency that can be trusted: a fresh process, interleaved with a reference graph, as a ratio.

Timing a graph in the process that just ran a pass (its allocator, thread pools and caches warm,
the garbage of the pass not yet collected) gave 7.2 / 8.8 / 51.7 ms for the same int8 graph on
this shared machine. Here the graph and the reference (the job's fp32 export) are timed in a
fresh process, in alternating rounds (A B, B A, ...): whatever slows the machine down slows both,
so the ratio of per-round medians is stable even when the milliseconds are not. The result gives
the median milliseconds of each, the median ratio and its interquartile spread.

This file runs as a script in the child process (``python latency.py ARGS.json``), so it imports
neither torch nor squeeze there: the child starts in about a second.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROUNDS, RUNS, WARMUP = 15, 5, 3  # 15 rounds of 5 runs: the ratio's IQR measured within +-4% here


def measure(
    graph: str | os.PathLike,
    feeds: dict[str, Any],
    reference: str | os.PathLike | None = None,
    *,
    rounds: int = ROUNDS,
    runs: int = RUNS,
    warmup: int = WARMUP,
    threads: int = 1,
    timeout: float = 600,
) -> dict[str, Any]:
    """Time ``graph`` (and ``reference``, interleaved) in a fresh process.

    Args:
        graph: the .onnx file to time.
        feeds: input name -> numpy array (inputs a graph does not declare are not fed).
        reference: the graph to time against (the job's fp32 export); None: milliseconds only.

    Returns:
        ``latency_ms`` (median), and with a reference ``reference_ms``, ``latency_ratio`` (median
        of the per-round ratios) and ``ratio_spread`` ([25th, 75th] percentile of them).
    """
    import numpy as np

    from squeeze.compress.errors import SqueezeError

    with tempfile.TemporaryDirectory(prefix="squeeze-latency-") as tmp:
        arrays: dict[str, Any] = {k: np.asarray(v) for k, v in feeds.items()}
        np.savez(Path(tmp) / "feeds.npz", **arrays)
        args = {
            "graph": str(graph),
            "reference": str(reference) if reference else None,
            "feeds": str(Path(tmp) / "feeds.npz"),
            "rounds": rounds,
            "runs": runs,
            "warmup": warmup,
            "threads": threads,
        }
        (Path(tmp) / "args.json").write_text(json.dumps(args))
        try:
            proc = subprocess.run(
                [sys.executable, __file__, str(Path(tmp) / "args.json")],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise SqueezeError(f"{graph}: latency measurement took over {timeout:.0f} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SqueezeError(f"{graph}: latency measurement failed ({last[:200]})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _session(path: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _child(args: dict[str, Any]) -> dict[str, Any]:
    import numpy as np

    with np.load(args["feeds"]) as data:
        all_feeds = {k: data[k] for k in data.files}
    sessions = [_session(args["graph"], args["threads"])]
    if args["reference"]:
        sessions.append(_session(args["reference"], args["threads"]))
    feeds = [{i.name: all_feeds[i.name] for i in s.get_inputs()} for s in sessions]
    for s, f in zip(sessions, feeds, strict=True):
        for _ in range(args["warmup"]):
            s.run(None, f)
    per_round: list[list[float]] = [[] for _ in sessions]
    for r in range(args["rounds"]):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for k in order:
            times = []
            for _ in range(args["runs"]):
                t = time.perf_counter()
                sessions[k].run(None, feeds[k])
                times.append(time.perf_counter() - t)
            per_round[k].append(float(np.median(times)) * 1e3)
    out: dict[str, Any] = {"latency_ms": round(float(np.median(per_round[0])), 4), "rounds": args["rounds"]}
    if len(sessions) == 2:
        ratios = np.array(per_round[0]) / np.array(per_round[1])
        out.update(
            reference_ms=round(float(np.median(per_round[1])), 4),
            latency_ratio=round(float(np.median(ratios)), 4),
            ratio_spread=[round(float(q), 4) for q in np.percentile(ratios, [25, 75])],
        )
    return out


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text()))))
