"""kdrun: config-driven knowledge-distillation experiments in PyTorch."""

__version__ = "0.1.0"
