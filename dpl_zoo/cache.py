"""The dpl-zoo cache folder and downloads into it.

``DPL_ZOO_CACHE`` when set, else ``$XDG_CACHE_HOME/dpl_zoo`` (``~/.cache/dpl_zoo``):
converted zoo weights, start-point checkpoints fetched by URL, image-scan results.
Files land under a temporary name and are renamed into place, so an interrupted
download never leaves a file that looks complete; a download that proves wrong (another
sha256 than pinned, or unreadable: see :func:`dpl_zoo.layouts.load_start_point`) is removed,
so the next attempt downloads it again instead of reusing it.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
from pathlib import Path
from typing import Optional

from .integrity import IntegrityError, verified

# how to go on without the network, for a start point given as a URL
LOCAL_ROUTE = "download it by hand, then --set initial_checkpoint=PATH (or pass that local path as initial_checkpoint)"


class DownloadError(ValueError):
    """A file that could not be downloaded; the message names the URL and the way around it."""


def cache_dir(*parts: str) -> Path:
    base = os.environ.get("DPL_ZOO_CACHE")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                            "dpl_zoo")
    return Path(base, *parts)


def is_url(text: str) -> bool:
    return urllib.parse.urlparse(str(text)).scheme in ("http", "https")


def download_to_cache(url: str, subdir: str = "checkpoints", sha256: Optional[str] = None) -> Path:
    """``url`` saved once under ``cache_dir(subdir)``, in a folder named by the URL's hash (two
    URLs ending in the same file name are two files); later calls reuse it. ``sha256``, when
    given, is checked after the download and on every reuse; a file that differs is removed."""
    import hashlib
    import torch.hub
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir(subdir) / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        # torch.hub writes to a temporary file next to dest and renames it when complete
        try:
            torch.hub.download_url_to_file(url, str(dest), progress=True)
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            raise DownloadError(f"could not download {url} ({_reason(e)}): {LOCAL_ROUTE}") from e
    if sha256 is not None:
        try:
            verified(dest, sha256, None, url, f"it was removed from the cache, so the next attempt downloads it "
                                              f"again; if the server's file changed, {LOCAL_ROUTE}")
        except IntegrityError as e:
            dest.unlink()
            raise DownloadError(str(e)) from e
    return dest


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"
