"""dgemma: a fast, exact engine for DiffusionGemma block-diffusion language models."""

__version__ = "0.1.0"
