"""Deployment: ONNX export and its passes, ONNX Runtime sessions, validation against PyTorch,
interleaved benchmarks, per-layer profiles."""
