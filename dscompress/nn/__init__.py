"""Modules and their arithmetic: the depthwise-separable layers, the kernel factorization that fits
them, parameter and MAC counts, the scores of outputs (torchmetrics)."""
