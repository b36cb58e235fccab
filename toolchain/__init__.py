"""qwen-trt: run llama.cpp k-quant Qwen2.5 GGUFs through ONNX, our CUDA kernels and TensorRT."""
__version__ = "0.1.0"
