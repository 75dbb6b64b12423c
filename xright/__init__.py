"""xright: SFT and preference post-training, jointly, on DeepSpeed ZeRO."""

__version__ = "0.1.0"
