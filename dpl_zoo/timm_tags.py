"""Zoo entries as timm pretrained tags: ``timm.create_model("resnet50.dpl_1pct", pretrained=True)``.

Each entry with weights becomes a ``PretrainedCfg`` under its architecture, built from
the registry (preprocessing, classes, licence), with no ``url`` or ``hf_hub_id``: timm
must not fetch these weights its own way (its Hub loader falls back to pickle files).
Instead the architecture's entrypoint is wrapped: for one of our tags it first makes
sure the verified ``model.safetensors`` is on disk (:func:`dpl_zoo.sources.weights_file`),
then hands timm that file with ``pretrained_cfg_overlay={"file": path}``.
"""
from __future__ import annotations

import functools

from .registry import ZooEntry, ZooError

PAPER_NAME = "Debiased Learning from Naturally Imbalanced Pseudo-Labels (CVPR 2022)"
PAPER_ID = "arXiv:2201.01490"
_TAGGED: dict[str, ZooEntry] = {}   # "arch.tag" -> entry


def pretrained_cfg(entry: ZooEntry):
    """The timm ``PretrainedCfg`` of an entry; structural fields (first conv, classifier,
    pool size) come from the architecture's default cfg."""
    from timm.models import get_pretrained_cfg
    from timm.models._pretrained import PretrainedCfg
    base = get_pretrained_cfg(entry.architecture)
    structure = {k: getattr(base, k) for k in ("first_conv", "classifier", "pool_size", "fixed_input_size")} \
        if base is not None else {}
    notes = "; ".join(n for n in (entry.notes, entry.license_note) if n) or None
    return PretrainedCfg(
        architecture=entry.architecture, tag=entry.timm_tag, **entry.data_config(), crop_mode="center",
        num_classes=entry.num_classes, label_names=entry.resolved_label_names(), license=entry.license,
        description=f"{entry.method}, {entry.label_budget}, {entry.dataset} (dpl-zoo {entry.name})",
        origin_url=entry.release.url if entry.release and not entry.hub else
        f"https://huggingface.co/{entry.hub.repo_id}" if entry.hub else None,
        paper_name=PAPER_NAME, paper_ids=PAPER_ID, notes=notes,
        **structure)


def register_tag(entry: ZooEntry) -> None:
    """Add ``entry.timm_name`` to timm's registry and route its weights through dpl-zoo.

    timm 1.0.x has no public call to add a tag to an existing architecture; this writes
    the same four tables ``register_model`` fills for a new model (private, so kept here,
    in one place): the tag's cfg, the architecture's tag list, the pretrained set and the
    architecture's ``DefaultCfg`` (appended, so timm's default tag stays the default).
    """
    from timm.models import _registry as registry
    arch, name = entry.architecture, entry.timm_name
    if arch not in registry._model_entrypoints:
        raise ZooError(f"{entry.name}: {arch!r} is not a timm architecture")
    if name in _TAGGED and _TAGGED[name].name != entry.name:
        raise ZooError(f"{entry.name}: timm name {name} belongs to zoo entry {_TAGGED[name].name}; choose another tag")
    cfg = pretrained_cfg(entry)
    registry._model_pretrained_cfgs[name] = cfg
    if name not in registry._model_with_tags[arch]:
        registry._model_with_tags[arch].append(name)
    registry._model_has_pretrained.add(name)
    default = registry._model_default_cfgs.get(arch)
    if default is not None:
        if entry.timm_tag not in default.tags:
            default.tags.append(entry.timm_tag)
        default.cfgs[entry.timm_tag] = cfg
    _TAGGED[name] = entry
    _wrap_entrypoint(arch)


def unregister_tag(entry: ZooEntry) -> None:
    """Undo :func:`register_tag` (an entry replaced under another tag)."""
    from timm.models import _registry as registry
    arch, name = entry.architecture, entry.timm_name
    _TAGGED.pop(name, None)
    registry._model_pretrained_cfgs.pop(name, None)
    registry._model_has_pretrained.discard(name)
    if name in registry._model_with_tags.get(arch, []):
        registry._model_with_tags[arch].remove(name)
    default = registry._model_default_cfgs.get(arch)
    if default is not None and entry.timm_tag in default.cfgs:
        default.tags.remove(entry.timm_tag)
        del default.cfgs[entry.timm_tag]


def _wrap_entrypoint(arch: str) -> None:
    from timm.models import _registry as registry
    original = registry._model_entrypoints[arch]
    if getattr(original, "_dpl_zoo_wrapped", False):
        return

    @functools.wraps(original)
    def entrypoint(pretrained: bool = False, **kwargs):
        tag = kwargs.get("pretrained_cfg")
        entry = _TAGGED.get(f"{arch}.{tag}") if isinstance(tag, str) else None
        if pretrained and entry is not None:
            overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
            if not overlay.get("file"):  # dpl_zoo.load passes the file it has verified (and holds)
                from .sources import held_weights
                with held_weights(entry) as path:   # held until timm has read it
                    kwargs["pretrained_cfg_overlay"] = {**overlay, "file": str(path)}
                    return original(pretrained=pretrained, **kwargs)
        return original(pretrained=pretrained, **kwargs)

    entrypoint._dpl_zoo_wrapped = True
    registry._model_entrypoints[arch] = entrypoint
