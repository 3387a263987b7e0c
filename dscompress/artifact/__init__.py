"""The artifact: a folder of safetensors weights and a JSON manifest of the steps that made it, saved
atomically and loaded without pickle."""
