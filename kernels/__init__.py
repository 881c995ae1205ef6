"""squeeze.kernels: custom operators (PyTorch reference, torch.library op, ONNX function,
TensorRT plugin name), one file per operator, listed in ``registry.KERNELS``."""
