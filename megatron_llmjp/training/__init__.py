"""The training loop: optimizer, learning-rate schedule, metrics."""
