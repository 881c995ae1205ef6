"""``quantize``: post-training quantization (RepQuant / RepQ-ViT, BCT, plain baselines).

quantize.py    QuantizeConfig, QuantizeResult, QuantizePass (checks, scheme, export rule, replay)

uniform.py     uniform quantizers and the percentile / MSE range search
dual_clip.py   RepQuant's learned per-channel dual clipping
reparam.py     channel-wise -> layer-wise reparameterization (z~ rounded), smoothing
gptq.py        GPTQ weight rounding
groups.py      per-layer input groups and their decisions
attention.py   quantized attention (log-sqrt2 softmax) through transformers' attention interface
modules.py     QuantLinear, ChannelAffine, QuantEmbedding: what the checkpoint stores
engine.py      the layer-by-layer procedure and its replay from the manifest
onnx_check.py  ORT's optimized graph (integer kernels) and the quantized validation rule
"""

from squeeze.compress.passes.quantize.quantize import QuantizeConfig, QuantizePass, QuantizeResult

__all__ = ["QuantizeConfig", "QuantizePass", "QuantizeResult"]
