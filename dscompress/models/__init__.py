"""Models by name (torchvision, timm, a user factory), checkpoints read safely, state dicts checked."""
