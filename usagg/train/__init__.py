"""Training: run planning, the training loop, checkpoints, data-parallel set-up and launchers."""
