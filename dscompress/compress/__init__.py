"""Transforms of a model: convert convs to fitted depthwise-separable layers, calibrate them on data,
equalize them and correct their biases for INT8, prune channels with Torch-Pruning, apply a plan's units. Each takes an
``nn.Module`` and returns ``(module, record)``, registered for its config (``dscompress.apply``)."""
