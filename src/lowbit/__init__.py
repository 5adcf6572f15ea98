"""lowbit: quantize trained PyTorch networks and run them fast on ordinary CPUs."""

__version__ = "0.1.0"
