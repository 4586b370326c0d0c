"""Training: data loading, the training loop, checkpoints, evaluation and plots."""
