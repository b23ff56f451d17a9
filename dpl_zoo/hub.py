"""Sharing on the Hugging Face Hub: model cards, staging a folder, publishing.

Cards are written with huggingface_hub's ``ModelCard``/``ModelCardData``. The
``model-index`` block holds only this model's own top-1/top-5, on a Hub dataset id
(``ILSVRC/imagenet-1k``, ``ylecun/mnist``, or a name for the user's own data): the Hub
shows those numbers as the model's results. The baseline at the same label budget, the
gain and where each number comes from (*reported* or *measured*) go in the ``dpl_zoo``
metadata block and the card's table. The template is ``hub/model_card.md``.

Staging is fresh every time and carries no local paths; publishing removes repo files
the staged folder no longer has, so the repo is exactly what was staged.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING, Optional

from .registry import CONFIG_NAME, MOCO_EMAN_LICENSE, MOCO_EMAN_NOTE, WEIGHTS_NAME, ZooEntry, ZooError

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

PAPER_URL = "https://arxiv.org/abs/2201.01490"
STAGING_MARKER = ".dpl-zoo-staging"
# Hub dataset ids of the datasets this project knows by name
HUB_DATASETS = {"imagenet-1k": "ILSVRC/imagenet-1k", "imagenet": "ILSVRC/imagenet-1k", "mnist": "ylecun/mnist",
                "fashion_mnist": "zalando-datasets/fashion_mnist", "fashion-mnist": "zalando-datasets/fashion_mnist"}
_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval"}


class HubError(ZooError):
    """A Hub operation that failed; the message says what to do."""


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
    dataset: str                    # display name, never a local path
    dataset_id: str                 # Hub dataset id (model-index ``dataset.type``)
    split: str
    label_budget: str
    top1: float
    top5: Optional[float]
    provenance: str                 # "measured" or "reported"
    source: str                     # the command or citation behind the numbers
    baseline_method: str = ""
    baseline_top1: Optional[float] = None
    baseline_provenance: str = ""
    paper_top1: Optional[float] = None  # the paper's number, where the model is an authors' re-run
    recipe_yaml: str = ""
    license: str = "mit"
    license_note: str = ""
    load_name: Optional[str] = None
    timm_name: Optional[str] = None
    tags: tuple = ()
    target_prior: str = ""          # what the pseudo-labels were debiased towards (a run's summary)

    @property
    def gain(self) -> Optional[float]:
        return None if self.baseline_top1 is None else round(self.top1 - self.baseline_top1, 2)


def dataset_id(name: str, override: Optional[str] = None) -> str:
    """A Hub dataset id for a dataset name or a data folder: known names map to their Hub
    ids; a folder gives its base name (its parent's when the base is a split name)."""
    if override:
        return override
    key = str(name).strip().lower()
    if key in HUB_DATASETS:
        return HUB_DATASETS[key]
    if key.startswith("hfds/"):  # timm's Hub datasets: hfds/ORG/NAME
        return str(name)[len("hfds/"):]
    path = Path(str(name).rstrip("/\\"))
    base = path.name if path.name.lower() not in _SPLIT_NAMES or not path.parent.name else path.parent.name
    return base or str(name)


def strip_local_paths(value):
    """``value`` with every absolute path (POSIX, Windows or ``~``) replaced by its base name."""
    if isinstance(value, dict):
        return {k: strip_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_local_paths(v) for v in value]
    if isinstance(value, str) and _is_local_path(value):
        windows = re.match(r"^[A-Za-z]:[\\/]|^\\\\", value)
        return (PureWindowsPath(value) if windows else PurePosixPath(value)).name
    return value


def _is_local_path(text: str) -> bool:
    return text.startswith(("/", "~")) or bool(re.match(r"^[A-Za-z]:[\\/]|^\\\\", text))


def card_from_entry(entry: ZooEntry, measured: Optional[dict] = None) -> CardInfo:
    """A card for a zoo entry; ``measured`` (a ``dpl-zoo eval`` result) replaces the
    reported numbers with the ones measured on the published file."""
    if entry.metrics is None and measured is None:
        raise ZooError(f"{entry.name} has no accuracy yet: evaluate it (dpl-zoo eval) before writing its card")
    from .config import resolve_recipe_path
    try:
        recipe = resolve_recipe_path(entry.recipe).read_text()
    except ValueError:
        recipe = f"# recipe {entry.recipe} is not shipped with this version"
    if measured is not None:
        top1, top5, provenance = round(measured["top1"], 2), round(measured["top5"], 2), "measured"
        source = f"dpl-zoo eval on {dataset_id(measured.get('data', ''))} ({measured['images']} images)"
    else:
        top1, top5, provenance, source = (entry.metrics.top1, entry.metrics.top5, entry.metrics.provenance,
                                          entry.metrics.source)
    return CardInfo(
        model_name=entry.name, repo_id=entry.repo_id, architecture=entry.architecture, method=entry.method,
        dataset=entry.dataset, dataset_id=dataset_id(entry.label_set), split="validation",
        label_budget=entry.label_budget, top1=top1, top5=top5, provenance=provenance, source=source,
        baseline_method=entry.baseline_method, baseline_top1=entry.baseline.top1 if entry.baseline else None,
        baseline_provenance=entry.baseline.provenance if entry.baseline else "",
        paper_top1=entry.paper.top1 if entry.paper else None, recipe_yaml=recipe, license=entry.license,
        license_note=entry.license_note, load_name=entry.name, timm_name=entry.timm_name, tags=entry.tags)


def card_from_run(source: Path, repo_id: str, baseline: Optional[Path] = None,
                  dataset: Optional[str] = None) -> CardInfo:
    """The model card's content for a run folder: its numbers from ``eval.json`` (``dpl-zoo eval
    --out``) or ``summary.json``, its recipe, architecture and licence.

    Args:
        source: a run folder or its ``export/`` folder.
        repo_id: the Hub repo it will be published to, ``ORG/NAME``.
        baseline: a baseline run folder (e.g. the FixMatch run) for the card's gain.
        dataset: the Hub dataset id the results are reported on (default: from the run's data).

    Returns:
        A `CardInfo` for `stage`.

    Raises:
        ZooError: the run (or the baseline) has no ``summary.json`` or ``eval.json``.
    """
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
    architecture = json.loads((export_folder(source) / CONFIG_NAME).read_text()).get("architecture", "?")
    data = metrics.get("data") or _run_data(cfg, metrics)
    # a run of the ResNet-50 recipes starts from MoCo-EMAN (its URL, or a copy under its file name)
    from_moco_eman = "moco_eman" in str(cfg.get("initial_checkpoint") or "").lower()
    return CardInfo(
        model_name=repo_id.split("/")[-1], repo_id=repo_id, architecture=architecture,
        method={"debiaspl": "DebiasPL", "fixmatch": "FixMatch", "supervised": "Supervised"}.get(method, method),
        dataset=strip_local_paths(data), dataset_id=dataset_id(data, dataset),
        split=metrics.get("split", "held-out test"),
        label_budget=f"{metrics['labeled']} labeled images" if "labeled" in metrics else "?",
        top1=round(metrics["top1"], 2), top5=round(metrics["top5"], 2) if metrics.get("top5") is not None else None,
        provenance="measured", source=strip_local_paths(metrics.get("command", "dpl-zoo train / dpl-zoo eval")),
        baseline_method={"fixmatch": "FixMatch", "supervised": "Supervised"}.get(base.get("method"), "baseline")
        if base else "", baseline_top1=round(base["top1"], 2) if base else None,
        baseline_provenance="measured" if base else "",
        recipe_yaml=_yaml(strip_local_paths(cfg)) if recipe_file.is_file() else "# no recipe recorded",
        license=MOCO_EMAN_LICENSE if from_moco_eman else "mit", license_note=MOCO_EMAN_NOTE if from_moco_eman else "",
        load_name=f"hf-hub:{repo_id}", tags=("semi-supervised",), target_prior=target_prior_note(metrics))


def target_prior_note(summary: dict) -> str:
    """One sentence on the target the pseudo-labels were debiased towards (empty without one)."""
    mode, values = summary.get("target_prior_mode"), summary.get("target_prior")
    if not mode or not values:
        return ""
    shares = ", ".join(f"{v:.3f}" for v in values)
    if mode == "estimated":
        estimate = summary.get("prior_estimate") or values
        used = ("in use by the end of training" if summary.get("estimate_in_use") else
                "never formed (too few confident pseudo-labels): training debiased towards the start prior")
        return (f"Pseudo-labels were debiased towards the unlabeled data's class prior, estimated during "
                f"training (`dpl.target_prior: estimated`, {used}); final estimate: "
                f"{', '.join(f'{v:.3f}' for v in estimate)}.")
    what = {"uniform": "a uniform class prior (the paper's method)",
            "labeled": "the labeled split's class frequencies (`dpl.target_prior: labeled`)",
            "given": "a class prior given in the recipe"}.get(mode, mode)
    return f"Pseudo-labels were debiased towards {what}: {shares}."


def _run_data(cfg: dict, metrics: dict) -> str:
    """What a run trained on: a known dataset's name, or its data folder."""
    data = cfg.get("data", {})
    name = data.get("dataset") or metrics.get("dataset", "?")
    return (data.get("root") or name) if name == "folder" else name


def _read_metrics(run_dir: Path) -> Optional[dict]:
    for name in ("eval.json", "summary.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text())
    return None


def _recipe_dict(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text()) if path.is_file() else {}


def _yaml(data: dict) -> str:
    import yaml
    return yaml.safe_dump(data, sort_keys=False)


def model_card(info: CardInfo):
    """A ``huggingface_hub.ModelCard``: ``model-index`` with this model's own results only."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    common = dict(task_type="image-classification", dataset_type=info.dataset_id, dataset_name=info.dataset,
                  dataset_split=info.split, metric_type="accuracy")
    if info.provenance == "reported":  # the Hub links a result to its source
        common.update(source_name=info.source, source_url=PAPER_URL)
    results = [EvalResult(metric_value=info.top1, metric_name="top-1 accuracy", **common)]
    if info.top5 is not None:
        results.append(EvalResult(metric_value=info.top5, metric_name="top-5 accuracy", **common))
    data = ModelCardData(model_name=info.model_name, license=info.license, library_name="timm",
                         tags=["image-classification", "timm", "dpl-zoo", "debiaspl", *info.tags],
                         pipeline_tag="image-classification", datasets=[info.dataset_id], eval_results=results,
                         dpl_zoo={"provenance": info.provenance, "source": info.source, "method": info.method,
                                  "dataset_id": info.dataset_id, "label_budget": info.label_budget,
                                  "paper_top1": info.paper_top1,
                                  "baseline_method": info.baseline_method or None,
                                  "baseline_top1": info.baseline_top1, "baseline_provenance":
                                      info.baseline_provenance or None, "gain": info.gain})
    note = {"reported": "Numbers are **reported** by the paper's authors, not re-measured here.",
            "measured": "Numbers are **measured** with dpl-zoo on the stated data."}
    paper = f" The paper's table gives {info.paper_top1:.2f} top-1." \
        if info.paper_top1 is not None and info.paper_top1 != info.top1 else ""
    return ModelCard.from_template(
        data, template_path=str(template_path()), model_name=info.model_name, method=info.method,
        label_budget=info.label_budget, architecture=info.architecture, dataset=info.dataset, split=info.split,
        top1=f"{info.top1:.2f}", top5=_fmt(info.top5), baseline_method=info.baseline_method,
        baseline_top1=_fmt(info.baseline_top1), gain=_fmt(info.gain, sign=True), provenance=info.provenance,
        provenance_note=f"{note.get(info.provenance, '')} Source: {info.source}.{paper}",
        license_note=info.license_note, load_name=info.load_name, timm_name=info.timm_name, repo_id=info.repo_id,
        recipe_yaml=info.recipe_yaml.strip(),
        training_note=(info.target_prior + "\n\n" if info.target_prior else "") +
        "The resolved recipe this model was trained with:")


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


def fresh_staging_dir(out_dir: Path) -> Path:
    """An empty staging folder: a previous staging (marked) is replaced; any other non-empty
    folder is refused, so staging never deletes files it did not write."""
    if out_dir.exists():
        if not out_dir.is_dir():
            raise ZooError(f"staging folder {out_dir} is a file; choose another --stage-dir")
        if (out_dir / STAGING_MARKER).is_file():
            shutil.rmtree(out_dir)
        elif any(out_dir.iterdir()):
            raise ZooError(f"staging folder {out_dir} is not empty and was not made by dpl-zoo; choose another "
                           f"--stage-dir (nothing in it was touched)")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAGING_MARKER).write_text("made by dpl-zoo publish; replaced on every staging\n")
    return out_dir


def stage(source: str | Path, out_dir: str | Path, info: CardInfo, extra: Optional[dict] = None) -> Path:
    """Everything a Hub repo needs in one fresh folder: weights, timm config, card, and the
    run's recipe and metrics with local paths reduced to base names.

    Args:
        source: a run folder, its ``export/`` folder or a converted folder.
        out_dir: the staging folder, replaced on every call (a folder dpl-zoo did not make is
            refused, never emptied).
        info: the card's content (`card_from_run`).
        extra: more JSON files to stage, ``{name: data}`` (e.g. an ``eval.json`` measured here).

    Returns:
        ``out_dir``, ready for `publish`.

    Raises:
        ZooError: ``source`` holds no weights; ``out_dir`` is a folder dpl-zoo did not make.

    Example:
        ```python
        from pathlib import Path
        from dpl_zoo.hub import card_from_run, publish, stage
        run = Path("runs/mymodel-debiaspl")
        info = card_from_run(run, "my-org/mymodel", baseline=Path("runs/mymodel-fixmatch"))
        commit = publish(stage(run, run / "hub-staging", info), "my-org/mymodel")
        ```
    """
    source, out_dir = Path(source), Path(out_dir)
    weights = export_folder(source)
    fresh_staging_dir(out_dir)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        shutil.copy2(weights / name, out_dir / name)
    run_dir = weights.parent if weights.name == "export" else weights
    for name in ("summary.json", "eval.json"):
        if (run_dir / name).is_file():
            _write_json(out_dir / name, strip_local_paths(json.loads((run_dir / name).read_text())))
    for name, data in (extra or {}).items():
        _write_json(out_dir / name, strip_local_paths(data))
    if (run_dir / "config.yaml").is_file():
        (out_dir / "recipe.yaml").write_text(_yaml(strip_local_paths(_recipe_dict(run_dir / "config.yaml"))))
    if (run_dir / "labeled.csv").is_file():
        shutil.copy2(run_dir / "labeled.csv", out_dir / "labeled.csv")
    model_card(info).save(out_dir / "README.md")
    return out_dir


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2))


def staged_files(staged: Path) -> list[Path]:
    return sorted(p for p in staged.iterdir() if p.name != STAGING_MARKER)


def publish(staged: str | Path, repo_id: str, private: bool = False, token: Optional[str] = None,
            commit_message: str = "Add DebiasPL model (dpl-zoo)") -> CommitInfo:
    """Create the repo if needed and make it hold exactly the staged folder (files it no longer
    has are deleted in the same commit).

    Args:
        staged: a folder made by `stage`.
        repo_id: ``ORG/NAME``.
        private: create the repo private.
        token: a Hub token; default: huggingface_hub's usual places (``HF_TOKEN``, the login
            cache). It is never printed or written into any file.
        commit_message: the commit's message.

    Returns:
        ``commit_url``, and ``oid``: the commit hash to pin.

    Raises:
        HubError: one line saying what to do (not logged in, no access, the Hub unreachable, ...).
    """
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    with hub_errors(f"publishing to {repo_id}"):
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        # delete_patterns="*": files the staged folder no longer has leave the repo (.gitattributes stays)
        return api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model",
                                 commit_message=commit_message, ignore_patterns=[STAGING_MARKER],
                                 delete_patterns="*")


@contextlib.contextmanager
def hub_errors(doing: str):
    """Turn huggingface_hub and network errors into a :class:`HubError` with what to do."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - only errors describe_hub_error knows are translated
        message = describe_hub_error(e)
        if message is None:
            raise
        raise HubError(f"{doing}: {message}") from e


def describe_hub_error(error: BaseException) -> Optional[str]:
    """One line for a huggingface_hub / HTTP error, also when it is the cause of another
    (huggingface_hub wraps failed uploads in a RuntimeError); None for anything else."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        line = _describe_one(error)
        if line is not None:
            return line
        error = error.__cause__
    return None


def _describe_one(error: BaseException) -> Optional[str]:
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, RepositoryNotFoundError
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, LocalTokenNotFoundError) or status == 401:
        return "not logged in: run `hf auth login` or set HF_TOKEN"
    if status == 403:
        return "the token may not write here: use a token with write access to this namespace (hf auth login)"
    if isinstance(error, RepositoryNotFoundError):
        return "repository not found (or private: log in with `hf auth login`)"
    if isinstance(error, HfHubHTTPError):
        return f"the Hub answered {status}: {' '.join(str(error).split())[:300]}"
    if type(error).__module__.split(".")[0] in ("httpx", "httpx2", "requests", "urllib3"):  # the HTTP client's own
        return f"the Hub cannot be reached ({type(error).__name__}: {error}); check the network or HF_ENDPOINT"
    return None


def registry_line(name: str, repo_id: str, revision: str, sha256: str) -> str:
    """The line to paste into ``PUBLISHED`` in ``dpl_zoo/zoo.py``."""
    return f'    "{name}": HubWeights("{repo_id}", revision="{revision}", sha256="{sha256}"),'


def publish_zoo_entry(entry: ZooEntry, org: str, stage_dir: Path, data: Optional[str] = None,
                      dry_run: bool = False, keep_release: bool = False, private: bool = False) -> dict:
    """Fetch an entry's release, convert it, optionally evaluate it on ``data``, stage it with
    its card and push it to ``ORG/NAME``; returns what happened, with the registry line."""
    from .sources import release_weights
    if entry.release is None:
        raise ZooError(f"{entry.name} has no released checkpoint to publish (source: {entry.source})")
    weights = release_weights(entry, keep_release=keep_release)
    measured = None
    if data:
        from .evaluate import evaluate_model
        measured = evaluate_model(f"local-dir:{weights.parent}", data)
    repo_id = f"{org}/{entry.name}"
    info = card_from_entry(entry, measured)
    info.repo_id = repo_id
    staged = stage(weights.parent, stage_dir, info, extra={"eval.json": measured} if measured else None)
    sha256 = json.loads((weights.parent / "source.json").read_text())["weights"]["sha256"]
    result = {"name": entry.name, "repo_id": repo_id, "staged": staged, "sha256": sha256, "commit": None,
              "measured": measured}
    if dry_run:
        return result
    commit = publish(staged, repo_id, private=private, commit_message=f"{entry.name}: the authors' released "
                                                                      f"checkpoint (student), converted by dpl-zoo")
    result.update(commit=commit.oid, url=commit.commit_url,
                  registry_line=registry_line(entry.name, repo_id, commit.oid, sha256))
    return result
