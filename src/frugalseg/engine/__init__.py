"""The training loop and what it needs: optimisers and schedules, checkpoints, logging, reproducibility."""
