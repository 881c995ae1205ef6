"""What a quantization run is, named for what it runs (issue 17), not for its ``--method`` value.

``--method repquant`` stays the accepted default, but only its static form runs RepQuant's steps
(learned dual clipping, the scale reparameterization with z~ rounded, log-sqrt2 softmax). With
run-time (dynamic) activations it is a SmoothQuant-style smoothing search plus GPTQ; weight-only,
GPTQ on a percentile grid. ``bct`` is partial BCT (Dong & Chen, arXiv 2304.01483): block-wise
scales of weights, embeddings and linear inputs only. The per-channel reparameterization of the
MLP output linear's input is squeeze's extension beyond RepQ-ViT, which reparameterizes
only the inputs that follow a LayerNorm.
"""

from __future__ import annotations

BCT_PAPER = "Dong & Chen, arXiv 2304.01483"
MLP_OUT_EXTENSION = (
    "per-channel reparameterization of the MLP output linear's input (squeeze's extension beyond RepQ-ViT)"
)


def algorithm(method: str, act: str, gptq: bool) -> str:
    """The recorded name of what runs for ``method`` with activations ``act``
    (dynamic | static | block | none) and GPTQ on or off."""
    rounding = "gptq" if gptq else "rtn"
    if method == "repquant":
        if act == "dynamic":
            return f"smoothquant+{rounding}"
        if act == "none":
            return f"percentile+{rounding}"
        return "repquant" if gptq else "repquant+rtn"
    if method == "bct":
        return "bct-partial"
    return method


def extensions(method: str, act: str, fc2_reparam: bool = True) -> list[str]:
    """Steps of this run that go beyond the papers it is named after."""
    return [MLP_OUT_EXTENSION] if method == "repquant" and act == "static" and fc2_reparam else []
