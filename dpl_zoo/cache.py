"""The dpl-zoo cache folder and downloads into it.

``DPL_ZOO_CACHE`` when set, else ``$XDG_CACHE_HOME/dpl_zoo`` (``~/.cache/dpl_zoo``):
converted zoo weights, start-point checkpoints fetched by URL, image-scan results.
Files land under a temporary name and are renamed into place, so an interrupted
download never leaves a file that looks complete.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.parse
from pathlib import Path

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


def download_to_cache(url: str, subdir: str = "checkpoints") -> Path:
    """``url`` saved once under ``cache_dir(subdir)``, in a folder named by the URL's hash (two
    URLs ending in the same file name are two files); later calls reuse it."""
    import hashlib
    import torch.hub
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir(subdir) / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    # torch.hub writes to a temporary file next to dest and renames it when complete
    try:
        torch.hub.download_url_to_file(url, str(dest), progress=True)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise DownloadError(f"could not download {url} ({_reason(e)}): {LOCAL_ROUTE}") from e
    return dest


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}"
