"""dpl-zoo: DebiasPL on timm.

The method core (:mod:`dpl_zoo.method`) is imported with the package and needs only torch:
``import dpl_zoo`` (or ``import dpl_zoo.method``) imports no timm and leaves timm's model
registry alone. The zoo (``dpl_zoo.load``, ``list_models``, ...) is imported on first use;
importing it makes every zoo entry with weights a timm pretrained tag, e.g.
``timm.create_model("resnet50.dpl_1pct", pretrained=True)`` after ``import dpl_zoo.zoo``.
"""
from .method import (
    ClassPrior, DebiasPLLoss, DebiasPLOutput, adaptive_margin, cld_loss, clip_assisted_loss,
    debiased_pseudo_labels, masked_cross_entropy,
)
from .threshold import SelfAdaptiveThreshold

__version__ = "0.1.0"

# the zoo's public names, imported from dpl_zoo.zoo when first asked for (PEP 562)
_ZOO_NAMES = ("HubWeights", "Release", "ZooEntry", "ZooError", "list_models", "load", "model_info", "register",
              "unregister")

__all__ = [
    "ClassPrior", "DebiasPLLoss", "DebiasPLOutput", "adaptive_margin", "cld_loss", "clip_assisted_loss",
    "debiased_pseudo_labels", "masked_cross_entropy", "SelfAdaptiveThreshold", *_ZOO_NAMES, "__version__",
]


def __getattr__(name: str):
    if name in _ZOO_NAMES:
        from . import zoo
        return getattr(zoo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
