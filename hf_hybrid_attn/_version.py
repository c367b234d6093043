"""The package version (a leaf module: recorded in training logs and checkpoints)."""

__version__ = "0.1.0"
