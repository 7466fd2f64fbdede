"""seg: real-time semantic segmentation training in the BiSeNetV2 style."""

__version__ = "0.1.0"
