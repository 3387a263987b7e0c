"""Modules and their arithmetic: the depthwise-separable layers, the kernel factorization that fits
them, the model graph the transforms share, parameter and MAC counts, the scores of outputs
(torchmetrics)."""
