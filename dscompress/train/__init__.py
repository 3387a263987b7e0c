"""Training: finetuning with distillation from the original, single- or multi-process, resumable
checkpoints, evaluation."""
