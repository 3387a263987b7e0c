"""Deployment: ONNX export and its passes, INT8 quantization, ONNX Runtime sessions, validation
against PyTorch, interleaved benchmarks, per-layer profiles."""
