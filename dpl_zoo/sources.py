"""Where a zoo entry's weights come from, fetched once and verified: the Hub, or the authors' release.

Sources, in timm's order (the first one an entry has is the one used, never a silent
switch to another when it fails):

1. the Hub repo, pinned to a commit hash, through huggingface_hub's cache; ``config.json``
   and ``model.safetensors`` only, never pickle files; the weights' sha256 is pinned;
2. the authors' released ``.pth.tar`` on Google Drive (or ``$DPL_ZOO_MIRROR/<name>.pth.tar``),
   downloaded with gdown into the dpl-zoo cache, read weights-only, its student converted
   once to ``model.safetensors`` + timm ``config.json`` under ``cache_dir("zoo", name)``.

Downloads go through gdown, for Drive and mirrors alike: it answers Drive's large-file
confirm page, keeps Drive's cookies and refuses a download shorter than announced.
Every verified file gets a :class:`~dpl_zoo.integrity.FileRecord`, so a warm load costs
a ``stat`` instead of a hash. One process at a time fetches and converts an entry (a file
lock per entry): the other DDP ranks wait, then load its conversion. Each file's
``config.json`` must describe the registry's model (architecture, classes, preprocessing),
or nothing is loaded.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from .cache import cache_dir, is_url
from .integrity import FileRecord, IntegrityError, read_json, sha256_of, verified, write_json
from .registry import CONFIG_NAME, WEIGHTS_NAME, ZooEntry, ZooError

MIRROR_ENV = "DPL_ZOO_MIRROR"
RECORD_NAME = "source.json"
logger = logging.getLogger(__name__)


def weights_file(entry: ZooEntry, force_download: bool = False, keep_release: bool = False) -> Path:
    """The verified ``model.safetensors`` of ``entry`` on local disk, from its first source. To
    read it, use :func:`held_weights`: another process may replace a release's conversion."""
    with held_weights(entry, force_download, keep_release) as path:
        return path


@contextlib.contextmanager
def held_weights(entry: ZooEntry, force_download: bool = False, keep_release: bool = False):
    """:func:`weights_file`, held until the block ends: a release's conversion folder stays locked
    while the caller (timm) reads it, so another process's ``force_download`` waits instead of
    deleting it under the reader. Hub files are replaced atomically by huggingface_hub."""
    if entry.hub is not None:
        yield hub_weights(entry, force_download)
    elif entry.release is not None:
        with _entry_lock(entry):
            yield _release_weights_locked(entry, force_download, keep_release)
    else:
        how = f" Reproduce it: {entry.reproduce}." if entry.reproduce else ""
        raise ZooError(f"{entry.name} has no source that can deliver its weights (not on the Hub, no released "
                       f"checkpoint).{how} Or load the architecture alone with pretrained=False.")


# --- the Hub ------------------------------------------------------------------------------------

def hub_snapshot(repo_id: str, revision: str = "main", force_download: bool = False) -> Path:
    """``config.json`` and ``model.safetensors`` of a Hub repo in the huggingface_hub cache; their folder.

    One ``snapshot_download`` limited to those two files (never pickle weights). With a
    commit-hash revision a cached snapshot is returned without asking the Hub.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                                        force_download=force_download))
    except LocalEntryNotFoundError as e:
        raise ZooError(
            f"{repo_id}@{revision} is not in the local cache and " +
            ("HF_HUB_OFFLINE is set: unset it to download, or copy the files into the cache"
             if constants.HF_HUB_OFFLINE else
             "the Hub cannot be reached: check the network, or load a local folder instead")) from e
    except RepositoryNotFoundError as e:
        raise ZooError(f"Hub repository {repo_id} not found (or private: log in with `hf auth login`)") from e
    except RevisionNotFoundError as e:
        raise ZooError(f"{repo_id} has no revision {revision!r}") from e
    for filename in (WEIGHTS_NAME, CONFIG_NAME):
        if not (folder / filename).is_file():
            what = "safetensors weights (dpl-zoo never loads pickle files)" if filename == WEIGHTS_NAME else filename
            raise ZooError(f"{repo_id}@{revision} has no {filename}: it holds no {what}")
    return folder


def hub_weights(entry: ZooEntry, force_download: bool = False) -> Path:
    """``entry``'s Hub weights at the pinned commit, sha256 checked (once per file version)."""
    hub = entry.hub
    folder = hub_snapshot(hub.repo_id, hub.revision, force_download)
    weights = folder / WEIGHTS_NAME
    record_path = cache_dir("zoo", entry.name, "hub.json")
    saved = read_json(record_path) or {}
    old = FileRecord.from_dict(saved.get("weights")) if saved.get("revision") == hub.revision else None
    try:
        record = verified(weights, hub.sha256, old, f"{entry.name} ({hub.repo_id}@{hub.revision[:10]})",
                          f"download it again with dpl_zoo.load({entry.name!r}, force_download=True)")
    except IntegrityError as e:
        raise ZooError(str(e)) from None
    check_config(folder / CONFIG_NAME, entry, f"{hub.repo_id}@{hub.revision[:10]}")
    if record != old:
        write_json(record_path, {"source": "hub", "repo_id": hub.repo_id, "revision": hub.revision,
                                 "weights": record.to_dict()})
    return weights


# --- the authors' release -----------------------------------------------------------------------

def release_weights(entry: ZooEntry, force_download: bool = False, keep_release: bool = False) -> Path:
    """``entry``'s weights converted from the authors' release: converted once, then checked against
    the record written at conversion (``source.json`` beside the weights)."""
    if entry.release is None:
        raise ZooError(f"{entry.name} has no released checkpoint")
    with _entry_lock(entry):
        return _release_weights_locked(entry, force_download, keep_release)


def _release_weights_locked(entry: ZooEntry, force_download: bool, keep_release: bool) -> Path:
    folder = cache_dir("zoo", entry.name)
    if (folder / WEIGHTS_NAME).is_file() and not force_download:
        return _checked_conversion(entry, folder)
    return _download_and_convert(entry, folder, force_download, keep_release)


@contextlib.contextmanager
def _entry_lock(entry: ZooEntry):
    """Held while one process checks, downloads or converts ``entry``: without it, processes
    loading one entry at once (every DDP rank) delete the release file or the conversion folder
    another one is using. The lock file sits beside the folder, which a conversion replaces."""
    from filelock import FileLock, Timeout
    path = cache_dir("zoo", f"{entry.name}.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process is fetching or converting it; waiting for it (%s)", entry.name, path)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _checked_conversion(entry: ZooEntry, folder: Path) -> Path:
    redo = f"delete {folder} or load with force_download=True to download and convert again"
    record = read_json(folder / RECORD_NAME)
    weights = FileRecord.from_dict((record or {}).get("weights"))
    if weights is None:
        raise ZooError(f"{entry.name}: the cached conversion in {folder} has no readable {RECORD_NAME}, so its "
                       f"weights cannot be checked; {redo}")
    pinned, got = entry.release.sha256, record.get("release", {}).get("sha256")
    if pinned and got != pinned:
        raise ZooError(f"{entry.name}: the cached conversion in {folder} was made from a release file with sha256 "
                       f"{got}, the registry pins {pinned}; nothing was loaded; {redo}")
    try:
        checked = verified(folder / WEIGHTS_NAME, weights.sha256, weights, f"{entry.name} (cached conversion)", redo)
    except IntegrityError as e:
        raise ZooError(str(e)) from None
    check_config(folder / CONFIG_NAME, entry, f"the cached conversion in {folder}")
    if checked != weights:  # same content, touched file: trust the new size/mtime
        write_json(folder / RECORD_NAME, {**record, "weights": checked.to_dict()})
    return folder / WEIGHTS_NAME


def _download_and_convert(entry: ZooEntry, folder: Path, force_download: bool, keep_release: bool) -> Path:
    from .convert import convert_checkpoint
    from .layouts import ConversionError
    release_file, origin = _release_file(entry, force_download)
    release_sha = sha256_of(release_file)
    pinned = entry.release.sha256
    if pinned and release_sha != pinned:
        kept = _reject(release_file)
        raise ZooError(f"{entry.name}: the downloaded release file has sha256 {release_sha}, the registry pins "
                       f"{pinned}: it is not the published checkpoint, and nothing was converted or loaded (kept "
                       f"for inspection at {kept}). {_manual_route(entry)}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=folder.parent))
    try:
        try:
            convert_checkpoint(release_file, work, teacher=False, arch=entry.architecture)
        except ConversionError as e:
            kept = _reject(release_file)
            raise ZooError(f"{entry.name}: the downloaded release file cannot be converted ({e}; kept at {kept}). "
                           f"{_manual_route(entry)}") from e
        check_config(work / CONFIG_NAME, entry, f"the conversion of {origin}")
        weights = FileRecord.of(work / WEIGHTS_NAME)
        write_json(work / RECORD_NAME, {
            "source": "authors' release", "from": origin, "student": True,
            "release": {"sha256": release_sha, "size": release_file.stat().st_size, "pinned": bool(pinned)},
            "weights": weights.to_dict(), "converted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not keep_release:
        release_file.unlink()
    if not pinned:
        warnings.warn(f"{entry.name}: the authors publish no checksum for their release, so this first download "
                      f"was recorded: release file sha256 {release_sha}, converted weights sha256 {weights.sha256} "
                      f"(in {folder / RECORD_NAME}; every later load checks the weights against it). To pin the "
                      f"release for everyone, set Release(..., sha256=\"{release_sha}\") on this entry in "
                      f"dpl_zoo/zoo.py", UserWarning, stacklevel=3)
    return folder / WEIGHTS_NAME


def _release_file(entry: ZooEntry, force_download: bool) -> tuple[Path, str]:
    """The release ``.pth.tar`` in ``cache_dir("releases")`` and where it came from.

    Downloads land in a temporary folder and are renamed into place only when complete,
    so an existing file is a whole one (kept earlier with ``keep_release=True``).
    """
    import gdown
    import requests
    from gdown.exceptions import DownloadError, FileURLRetrievalError
    dest = cache_dir("releases", f"{entry.name}.pth.tar")
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if mirror and not is_url(mirror):
        raise ZooError(f"{MIRROR_ENV}={mirror!r} is not an http(s) URL; it names a server holding "
                       f"<entry name>.pth.tar files (for a file on disk use `dpl-zoo convert FILE --out DIR`)")
    origin = f"{mirror.rstrip('/')}/{entry.name}.pth.tar" if mirror else entry.release.url
    if dest.is_file() and not force_download:
        return dest, f"{origin} (kept copy)"
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=dest.parent))
    part = work / dest.name
    try:
        try:
            if mirror:
                gdown.download(url=origin, output=str(part))
            else:
                gdown.download(id=entry.release.drive_id, output=str(part))
        except FileURLRetrievalError as e:
            reason = ("Google Drive refuses the download for now: too many users have viewed or downloaded this "
                      "file recently (Drive's quota; it resets within a day)" if "Too many users" in str(e) else
                      f"Google Drive did not hand out the file ({_one_line(e)})")
            raise ZooError(f"{entry.name}: {reason}. {_manual_route(entry)}") from e
        except DownloadError as e:
            raise ZooError(f"{entry.name}: the download of {origin} broke off ({_one_line(e)}). "
                           f"{_manual_route(entry)}") from e
        except requests.RequestException as e:
            raise ZooError(f"{entry.name}: {origin} could not be downloaded ({type(e).__name__}: {_one_line(e)}). "
                           f"{_manual_route(entry)}") from e
        if not part.is_file():
            raise ZooError(f"{entry.name}: gdown reported no file for {origin}. {_manual_route(entry)}")
        os.replace(part, dest)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return dest, origin


def _reject(path: Path) -> Path:
    """Move a bad download aside (kept for inspection), so the next load downloads again."""
    kept = path.with_name(path.name + ".rejected")
    os.replace(path, kept)
    return kept


def _manual_route(entry: ZooEntry) -> str:
    return (f"Manual route: download {entry.release.url} by hand (a browser signed in to Google usually gets past "
            f"Drive's limits), then `dpl-zoo convert FILE --out DIR` and dpl_zoo.load(\"local-dir:DIR\"); or set "
            f"{MIRROR_ENV} to a server holding {entry.name}.pth.tar")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An error's message on one line, without gdown's advice that does not apply here (its
    partial file lives in a temporary folder that is removed; the browser hint is in ours)."""
    text = " ".join(str(e).split()).removeprefix("Failed to retrieve file url: ")
    for tail in (" You may still be able", " The received bytes are kept"):
        text = text.split(tail)[0]
    return text if len(text) <= limit else text[:limit] + " ..."


# --- the weights' config ------------------------------------------------------------------------

def check_config(path: Path, entry: ZooEntry, where: str) -> None:
    """Refuse a ``config.json`` that describes another model than the registry entry.

    The registry builds the model (architecture, classes, preprocessing); the file must
    agree with it on everything both state, and carry no model arguments the registry
    would not apply.
    """
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ZooError(f"{entry.name}: {where} has no readable {CONFIG_NAME} ({e})") from e
    problems = []
    if cfg.get("architecture") != entry.architecture:
        problems.append(f"architecture {cfg.get('architecture')!r} (registry: {entry.architecture!r})")
    model_args = cfg.get("model_args") or {}
    num_classes = {cfg.get("num_classes"), model_args.get("num_classes", cfg.get("num_classes"))}
    if num_classes != {entry.num_classes}:
        problems.append(f"num_classes {sorted(num_classes, key=str)} (registry: {entry.num_classes})")
    unknown = sorted(set(model_args) - {"num_classes", "in_chans", "global_pool"})
    if unknown:
        problems.append(f"model arguments {unknown} the registry does not apply")
    if model_args.get("in_chans", entry.input_size[0]) != entry.input_size[0]:
        problems.append(f"in_chans {model_args['in_chans']} (registry: {entry.input_size[0]})")
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    for key, want in entry.data_config().items():
        if key in pretrained_cfg and not _same(pretrained_cfg[key], want):
            problems.append(f"{key} {pretrained_cfg[key]} (registry: {want})")
    names, registry_names = cfg.get("label_names"), entry.resolved_label_names()
    if names is not None and (len(names) != entry.num_classes or
                              (registry_names is not None and tuple(names) != registry_names)):
        problems.append("label names differ from the registry's")
    if problems:
        raise ZooError(f"{entry.name}: the {CONFIG_NAME} of {where} does not describe the registry's model: "
                       f"{'; '.join(problems)}. Nothing was loaded: the file belongs to another model")


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b
