"""One stage's training state: the stage worker, its flat state, checkpoints."""
