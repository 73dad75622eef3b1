"""Post-hoc sparse autoencoders, the TopK LM's point of comparison: trained with EleutherAI's sparsify
behind one seam (`library.py`), read by the analysis as units (`Latents`) like the model's own neurons."""

from .latents import Latents

__all__ = ["Latents"]
