"""Sharing on the Hugging Face Hub: model cards, staging a folder, publishing.

Cards are written with huggingface_hub's ``ModelCard``/``ModelCardData``: the
``model-index`` block holds top-1 and top-5 of the model and, where known, the
baseline at the same label budget and the gain, each marked *reported* or
*measured*. The template is ``hub/model_card.md``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .zoo import CONFIG_NAME, WEIGHTS_NAME, ZooEntry, ZooError

PAPER_URL = "https://arxiv.org/abs/2201.01490"



def template_path() -> Path:
    from . import templates  # the repository's hub/ folder, installed as dpl_zoo.templates
    return Path(templates.__path__[0]) / "model_card.md"


@dataclass
class CardInfo:
    """What a card says; built from a zoo entry or from a run's files."""
    model_name: str
    repo_id: str
    architecture: str
    method: str
    dataset: str
    split: str
    label_budget: str
    top1: float
    top5: Optional[float]
    provenance: str                 # "measured" or "reported"
    source: str                     # the command or citation behind the numbers
    baseline_method: str = ""
    baseline_top1: Optional[float] = None
    baseline_provenance: str = ""
    recipe_yaml: str = ""
    license: str = "mit"
    load_name: Optional[str] = None
    tags: tuple = ()

    @property
    def gain(self) -> Optional[float]:
        return None if self.baseline_top1 is None else round(self.top1 - self.baseline_top1, 2)


def card_from_entry(entry: ZooEntry) -> CardInfo:
    if entry.metrics is None:
        raise ZooError(f"{entry.name} has no accuracy yet: evaluate it (dpl-zoo eval) before writing its card")
    from .config import resolve_recipe_path
    try:
        recipe = resolve_recipe_path(entry.recipe).read_text()
    except ValueError:
        recipe = f"# recipe {entry.recipe} is not shipped with this version"
    return CardInfo(
        model_name=entry.name, repo_id=entry.hf_hub_id, architecture=entry.architecture, method=entry.method,
        dataset=entry.dataset, split="validation", label_budget=entry.label_budget, top1=entry.metrics.top1,
        top5=entry.metrics.top5, provenance=entry.metrics.provenance, source=entry.metrics.source,
        baseline_method=entry.baseline_method, baseline_top1=entry.baseline.top1 if entry.baseline else None,
        baseline_provenance=entry.baseline.provenance if entry.baseline else "", recipe_yaml=recipe,
        license=entry.license, load_name=entry.name, tags=entry.tags)


def card_from_run(source: Path, repo_id: str, baseline: Optional[Path] = None) -> CardInfo:
    """A card for a run folder (``summary.json`` or an ``eval.json`` from ``dpl-zoo eval``)."""
    run_dir = source if (source / "summary.json").is_file() or (source / "eval.json").is_file() else source.parent
    metrics = _read_metrics(run_dir)
    if metrics is None:
        raise ZooError(f"{source} has no summary.json or eval.json: evaluate the model first "
                       f"(dpl-zoo eval {source} --data DIR --out {run_dir / 'eval.json'})")
    recipe_file = run_dir / "config.yaml"
    base = _read_metrics(baseline if baseline.is_dir() else baseline.parent) if baseline else None
    if baseline and base is None:
        raise ZooError(f"baseline {baseline} has no summary.json or eval.json")
    cfg = _recipe_dict(recipe_file)
    method = metrics.get("method") or cfg.get("dpl", {}).get("method", "debiaspl")
    return CardInfo(
        model_name=repo_id.split("/")[-1], repo_id=repo_id, architecture=metrics.get("model") or cfg.get("model", "?"),
        method={"debiaspl": "DebiasPL", "fixmatch": "FixMatch", "supervised": "Supervised"}.get(method, method),
        dataset=metrics.get("data") or metrics.get("dataset", "?"), split=metrics.get("split", "held-out test"),
        label_budget=f"{metrics['labeled']} labeled images" if "labeled" in metrics else "?",
        top1=round(metrics["top1"], 2), top5=round(metrics["top5"], 2) if metrics.get("top5") is not None else None,
        provenance="measured", source=metrics.get("command", "dpl-zoo train / dpl-zoo eval"),
        baseline_method={"fixmatch": "FixMatch", "supervised": "Supervised"}.get(base.get("method"), "baseline")
        if base else "", baseline_top1=round(base["top1"], 2) if base else None,
        baseline_provenance="measured" if base else "",
        recipe_yaml=recipe_file.read_text() if recipe_file.is_file() else "# no recipe recorded",
        load_name=f"hf-hub:{repo_id}", tags=("semi-supervised",))


def _read_metrics(run_dir: Path) -> Optional[dict]:
    for name in ("eval.json", "summary.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text())
    return None


def _recipe_dict(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def model_card(info: CardInfo):
    """A ``huggingface_hub.ModelCard`` with a ``model-index`` block."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    common = dict(task_type="image-classification", dataset_type=info.dataset.split(" ")[0].lower(),
                  dataset_name=info.dataset, dataset_split=info.split, metric_type="accuracy")
    if info.provenance == "reported":  # the Hub links a result to its source
        common.update(source_name=info.source, source_url=PAPER_URL)
    results = [EvalResult(metric_value=info.top1, metric_name="top-1 accuracy", **common)]
    if info.top5 is not None:
        results.append(EvalResult(metric_value=info.top5, metric_name="top-5 accuracy", **common))
    if info.baseline_top1 is not None:
        base = dict(common)
        results.append(EvalResult(metric_value=info.baseline_top1,
                                  metric_name=f"baseline top-1 accuracy ({info.baseline_method}, same labels)", **base))
        results.append(EvalResult(metric_value=info.gain, metric_name=f"gain over {info.baseline_method} "
                                                                      f"(top-1 points)", **base))
    data = ModelCardData(model_name=info.model_name, license=info.license, library_name="timm",
                         tags=["image-classification", "timm", "dpl-zoo", "debiaspl", *info.tags],
                         pipeline_tag="image-classification", eval_results=results,
                         dpl_zoo={"provenance": info.provenance, "source": info.source, "method": info.method,
                                  "label_budget": info.label_budget, "baseline_method": info.baseline_method or None,
                                  "baseline_top1": info.baseline_top1, "baseline_provenance":
                                      info.baseline_provenance or None, "gain": info.gain})
    note = {"reported": "Numbers are **reported** by the paper's authors, not re-measured here.",
            "measured": "Numbers are **measured** with dpl-zoo on the stated data."}
    return ModelCard.from_template(
        data, template_path=str(template_path()), model_name=info.model_name, method=info.method,
        label_budget=info.label_budget, architecture=info.architecture, dataset=info.dataset, split=info.split,
        top1=f"{info.top1:.2f}", top5=_fmt(info.top5), baseline_method=info.baseline_method,
        baseline_top1=_fmt(info.baseline_top1), gain=_fmt(info.gain, sign=True), provenance=info.provenance,
        provenance_note=f"{note.get(info.provenance, '')} Source: {info.source}.", load_name=info.load_name,
        repo_id=info.repo_id, recipe_yaml=info.recipe_yaml.strip(),
        training_note="The resolved recipe this model was trained with:")


def _fmt(value: Optional[float], sign: bool = False) -> str:
    if value is None:
        return "not measured"
    return f"{value:+.2f}" if sign else f"{value:.2f}"


def export_folder(source: Path) -> Path:
    """The folder holding ``model.safetensors`` + ``config.json`` for a run or export path."""
    for candidate in (source, source / "export"):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    raise ZooError(f"{source} holds no {WEIGHTS_NAME} + {CONFIG_NAME} (a run folder or its export/ folder); "
                   f"finish training or run `dpl-zoo convert` first")


def stage(source: str | Path, out_dir: str | Path, info: CardInfo) -> Path:
    """Everything a Hub repo needs in one folder: weights, timm config, card, recipe, metrics."""
    source, out_dir = Path(source), Path(out_dir)
    weights = export_folder(source)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy2(weights / name, out_dir / name)
    run_dir = weights.parent if weights.name == "export" else weights
    for name in ("config.yaml", "summary.json", "eval.json", "labeled.csv"):
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / ("recipe.yaml" if name == "config.yaml" else name))
    model_card(info).save(out_dir / "README.md")
    return out_dir


def publish(staged: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None,
            commit_message: str = "Add DebiasPL model (dpl-zoo)") -> str:
    """Create the repo if needed and upload the staged folder; returns the commit URL.

    The token comes from ``token``, else huggingface_hub's usual places (HF_TOKEN, the
    login cache); it is never printed or written into any file.
    """
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    info = api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model",
                             commit_message=commit_message)
    return str(info.commit_url if hasattr(info, "commit_url") else info)
