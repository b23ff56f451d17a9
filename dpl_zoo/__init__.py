"""dpl-zoo: DebiasPL on timm.

``dpl_zoo.load(name)`` gives a pretrained timm model from the zoo; importing the package also
makes every zoo entry with weights a timm pretrained tag, e.g.
``timm.create_model("resnet50.dpl_1pct", pretrained=True)``. The method core
(:mod:`dpl_zoo.method`) is importable on its own and pluggable into any loop.
"""
from .method import (
    ClassPrior, DebiasPLLoss, DebiasPLOutput, adaptive_margin, cld_loss, clip_assisted_loss,
    debiased_pseudo_labels, masked_cross_entropy,
)
from .zoo import HubWeights, Release, ZooEntry, ZooError, list_models, load, model_info, register, unregister

__version__ = "0.1.0"

__all__ = [
    "ClassPrior", "DebiasPLLoss", "DebiasPLOutput", "adaptive_margin", "cld_loss", "clip_assisted_loss",
    "debiased_pseudo_labels", "masked_cross_entropy", "HubWeights", "Release", "ZooEntry", "ZooError", "list_models",
    "load", "model_info", "register", "unregister", "__version__",
]
