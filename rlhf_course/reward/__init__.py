"""Stage 2, the reward model (notebooks 01-05): losses, read-outs, the token-level loss, preference data, training, evaluation."""
