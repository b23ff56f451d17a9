"""dpl-zoo: DebiasPL on timm.

``dpl_zoo.load(name)`` gives a pretrained timm model from the zoo; the method core
(:mod:`dpl_zoo.method`) is importable on its own and pluggable into any loop.
"""
from .method import (
    ClassPrior, DebiasPLLoss, DebiasPLOutput, adaptive_margin, cld_loss, clip_assisted_loss,
    debiased_pseudo_labels, masked_cross_entropy,
)
from .zoo import ZooEntry, list_models, load, model_info, register

__version__ = "0.1.0"

__all__ = [
    "ClassPrior", "DebiasPLLoss", "DebiasPLOutput", "adaptive_margin", "cld_loss", "clip_assisted_loss",
    "debiased_pseudo_labels", "masked_cross_entropy", "ZooEntry", "list_models", "load", "model_info", "register",
    "__version__",
]
