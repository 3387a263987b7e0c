"""The artifact: a folder of safetensors weights and a JSON manifest of the steps that made it, saved
atomically and loaded without pickle; the structure that rebuilds a compressed model from its spec;
the source a step works on, a model named or read from a folder."""
