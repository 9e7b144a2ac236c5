"""Training: data, the DeepSpeed loop, checkpoints and the command-line tools."""
