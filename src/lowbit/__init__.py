"""lowbit: quantize trained networks, measure what it cost, write formats engines load."""

__version__ = "0.1.0"
