"""Training: the deep-supervision loss (and, later, the training loop)."""
