"""engagerec: multi-task watch-ratio and skip prediction on TorchRec."""

__version__ = "0.1.0"
