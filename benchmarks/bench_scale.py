"""Out of core at scale: prune scoring and int8 quantization of random Llama models, in memory vs
out of core (compress/offload.py), peak RSS and seconds.

    .venv/bin/python benchmarks/bench_scale.py                      # 0.5B, 1B, 3B
    .venv/bin/python benchmarks/bench_scale.py --sizes 0.5B --root /tmp/scratch

Each size is written here as a random Llama-architecture model (bf16, Hugging Face shards of
2 GB, written one tensor at a time) into a scratch folder outside the repository and deleted
afterwards. Every measurement runs in its own subprocess under an address-space limit
(``RLIMIT_AS``) and an RSS watchdog, so an overrun kills only that run. Peak RSS is the child's
``ru_maxrss`` (the interpreter and torch included). Calibration: 4 synthetic sequences of 64
tokens (the per-layer compute is the same in both paths; the benchmark measures memory and I/O).

* prune scoring: ``prune --drop-blocks 1 --dry-run`` (the similarity scores of every layer);
* int8: ``quantize --weights int8 --method minmax`` (round to nearest: GPTQ costs the same per
  layer in both paths and would only lengthen the run), output written (sharded when large).

In memory is the lower bound of today's path: the model loaded in fp32 and the pass applied to
it, no copy (``run.apply`` hands the pass a copy: one more fp32 model). It runs only while the
machine has room for it (``--memory-sizes``, default 0.5B and 1B; 3B is extrapolated).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: name -> (hidden, intermediate, layers); vocab 32000, 4x grouped-query attention, untied head
SIZES = {"0.5B": (1536, 4096, 16), "1B": (2048, 5632, 20), "3B": (3072, 8192, 28)}
VOCAB = 32000
SAMPLES, SEQ = 4, 64
#: the watchdog kills a child above this RSS (the shared machine's rule: no process over ~8 GB)
RSS_LIMIT = 8 * 2**30
#: and its address space is limited to this (file mappings and allocator reservations included)
AS_LIMIT = 14 * 2**30
SHARD = 2 * 10**9


def config(size: str):
    import transformers as T

    h, inter, layers = SIZES[size]
    return T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=h,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=h // 128,
        num_key_value_heads=h // 512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )


def write_model(size: str, folder: Path) -> dict:
    """A random bf16 Llama in shards, one tensor in memory at a time."""
    import torch
    import transformers as T

    from squeeze.compress.shards import ShardWriter

    cfg = config(size)
    with torch.device("meta"):
        skeleton = T.LlamaForCausalLM(cfg)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(folder, SHARD)
    params = 0
    for name, t in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(t.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16)
        writer.add(name, value)
        params += t.numel()
    files = writer.close()
    h, inter, _ = SIZES[size]
    kv = h // 4
    layer = 2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h
    return {"params": params, "files": len(files), "bytes": sum(f.stat().st_size for f in files), "layer_params": layer}


# ---------------------------------------------------------------------------------------------
# One measurement (the child process)
# ---------------------------------------------------------------------------------------------


def child(mode: str, task: str, folder: str, out: str) -> None:
    import torch

    torch.set_num_threads(2)
    from squeeze.compress import offload
    from squeeze.compress.calibration import DataSpec

    data = DataSpec(source="synthetic", samples=SAMPLES, seq_len=SEQ)
    cfg = {"prune": {"drop_blocks": 1}} if task == "prune" else {"quantize": {"weights": "int8", "method": "minmax"}}
    start = time.perf_counter()
    extra: dict = {}
    if mode == "offload":
        if task == "prune":
            offload.apply(folder, cfg, data=data, dry_run=True)
        else:
            done = offload.apply(folder, cfg, data=data, out=out, max_shard_size=SHARD)
            extra = done.manifest.ledger[-1]["metrics"]["offload"]
    else:
        from squeeze.compress.checkpoint import save
        from squeeze.compress.dtypes import round_to_storage
        from squeeze.compress.passes.base import PassContext
        from squeeze.compress.run import load, make_pass

        ckpt = load(folder)
        pass_ = make_pass(cfg)
        ctx = PassContext(family=ckpt.family, checkpoint=ckpt, calibration=data)
        if task == "prune":
            pass_.preview([ckpt.model], ctx)
        else:
            pass_.apply([ckpt.model], ctx)  # in place: no copy (the lower bound)
            round_to_storage(ckpt.model)
            save(ckpt, out, max_shard_size=SHARD)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), **extra}))


def measure(mode: str, task: str, folder: Path, scratch: Path) -> dict:
    out = scratch / f"out-{mode}-{task}"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))

    cmd = [sys.executable, __file__, "--child", mode, task, str(folder), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=limit)
    killed = threading.Event()

    def watch() -> None:
        while proc.poll() is None:
            try:
                rss = (
                    int(
                        next(
                            x
                            for x in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                            if x.startswith("VmRSS")
                        ).split()[1]
                    )
                    * 1024
                )
            except (OSError, StopIteration, ValueError):
                rss = 0
            if rss > RSS_LIMIT:
                killed.set()
                proc.kill()
            time.sleep(0.2)

    threading.Thread(target=watch, daemon=True).start()
    stdout, stderr = proc.communicate()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        why = "killed above the RSS limit" if killed.is_set() else stderr.strip().splitlines()[-1:]
        return {"mode": mode, "task": task, "error": str(why)}
    return {"mode": mode, "task": task, **json.loads(stdout.strip().splitlines()[-1])}


def baseline_rss() -> int:
    """RSS of a child that imports squeeze and torch and does nothing (the floor of every run)."""
    code = (
        "import resource, transformers.models.llama.modeling_llama, squeeze.compress.offload, squeeze.compress.run; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    return int(subprocess.check_output([sys.executable, "-c", code], text=True).split()[-1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="0.5B,1B,3B")
    ap.add_argument("--memory-sizes", default="0.5B,1B", help="sizes also run in memory")
    ap.add_argument("--root", default=tempfile.gettempdir(), help="scratch space (outside the repository)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    base = baseline_rss()
    rows = []
    for size in args.sizes.split(","):
        scratch = Path(tempfile.mkdtemp(prefix=f"squeeze-scale-{size}-", dir=args.root))
        try:
            t0 = time.perf_counter()
            info = write_model(size, scratch / "model")
            info["write_seconds"] = round(time.perf_counter() - t0, 1)
            h, _, _ = SIZES[size]
            # the target: embeddings + two layers (fp32) + activations (4 copies of the stream) + the floor
            bound = 4 * (VOCAB * h + 2 * info["layer_params"]) + 4 * 4 * SAMPLES * SEQ * h + base
            runs = []
            for task in ("prune", "quantize"):
                runs.append(measure("offload", task, scratch / "model", scratch))
                if size in args.memory_sizes.split(","):
                    runs.append(measure("memory", task, scratch / "model", scratch))
            row = {"size": size, **info, "bound_mb": round(bound / 2**20), "runs": runs}
            print(json.dumps(row), flush=True)
            rows.append(row)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    write_report(rows, base)


def write_report(rows: list[dict], base: int) -> None:
    """results/scale.json and scale.md (rows of sizes not run now are kept from the last run)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if (RESULTS / "scale.json").exists():  # a run replaces the measurements it made, keeps the others
        old = {r["size"]: r for r in json.loads((RESULTS / "scale.json").read_text()).get("rows", [])}
        for row in rows:
            made = {(r["mode"], r["task"]) for r in row["runs"]}
            kept = [r for r in old.pop(row["size"], {}).get("runs", []) if (r["mode"], r["task"]) not in made]
            row["runs"] = sorted(row["runs"] + kept, key=lambda r: (r["task"], r["mode"] != "offload"))
        rows = sorted([*old.values(), *rows], key=lambda r: r["params"])
    report = {"baseline_rss_mb": round(base / 2**20), "samples": SAMPLES, "seq_len": SEQ, "rows": rows}
    (RESULTS / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| size | params | on disk | task | path | seconds | peak RSS MB | bound MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for r in row["runs"]:
            lines.append(
                f"| {row['size']} | {row['params'] / 1e9:.2f}B | {row['bytes'] / 1e9:.1f} GB | {r['task']} | {r['mode']} "
                f"| {r.get('seconds', '-')} | {r.get('peak_rss_mb', r.get('error'))} | {row['bound_mb']} |"
            )
    (RESULTS / "scale.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
