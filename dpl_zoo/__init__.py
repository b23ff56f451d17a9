"""dpl-zoo: DebiasPL on timm.

The method core (:mod:`dpl_zoo.method`) is importable on its own and pluggable
into any training loop.
"""
from .method import (
    ClassPrior, DebiasPLLoss, DebiasPLOutput, adaptive_margin, cld_loss, clip_assisted_loss,
    debiased_pseudo_labels, masked_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "ClassPrior", "DebiasPLLoss", "DebiasPLOutput", "adaptive_margin", "cld_loss", "clip_assisted_loss",
    "debiased_pseudo_labels", "masked_cross_entropy", "__version__",
]
