"""switchkit: training-centric switch generation across the checkpoints of one training pipeline."""

__version__ = "0.1.0"
