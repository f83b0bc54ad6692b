"""FREE training: losses, discriminators, optimizers, data parallelism, checkpoints, metrics logging."""
