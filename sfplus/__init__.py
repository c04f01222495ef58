"""sfplus: distil video diffusion models into few-step generators with PyTorch Lightning."""

__version__ = "0.1.0"
