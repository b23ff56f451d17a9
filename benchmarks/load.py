"""Load latency: ``dpl_zoo.load(name)`` against the plain timm + safetensors path.

Cold: the first ``dpl_zoo.load`` of an entry whose weights come from the authors'
release, served by a mirror on 127.0.0.1 (``DPL_ZOO_MIRROR``): download of a synthetic
checkpoint in the authors' layout (student, EMA teacher, SGD momentum: 0.3 GB for
ResNet-50, like the released files), sha256, conversion of the student, record, load.
Warm: ``dpl_zoo.load`` of the converted entry, and of the same weights published on a
loopback Hub and pinned to a commit, vs ``timm.create_model(arch)`` +
``safetensors.torch.load_file`` + ``load_state_dict`` of the same file (target ratio <= 1.1).

    python benchmarks/load.py             # resnet50
    python benchmarks/load.py --toy       # test_resnet, few repeats
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import command_line, json_text, machine_facts, median_time, portable  # noqa: E402
from drive_server import ReleaseMirror, authors_checkpoint  # noqa: E402
from hub_server import HubServer  # noqa: E402

console = Console()
TARGET = 1.1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--toy", action="store_true")
    p.add_argument("--note", default="", help="free text stored with the results (e.g. what else ran)")
    args = p.parse_args(argv)
    arch, repeats = ("test_resnet", 2) if args.toy else (args.arch, args.repeats)

    import timm
    from huggingface_hub import HfApi, constants
    from safetensors.torch import load_file

    import dpl_zoo
    from dpl_zoo.integrity import sha256_of
    from dpl_zoo.zoo import WEIGHTS_NAME, HubWeights, Release, ZooEntry, register, unregister

    load_before = os.getloadavg()
    saved_hub = {k: getattr(constants, k) for k in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE")}
    saved_env = {k: os.environ.get(k) for k in ("DPL_ZOO_CACHE", "DPL_ZOO_MIRROR")}
    work = Path(tempfile.mkdtemp(prefix="dpl-load-"))
    common = dict(architecture=arch, num_classes=1000, label_set="none", dataset="none", label_budget="none",
                  recipe="none")
    try:
        authors_checkpoint(work / "bench-release.pth.tar", arch)
        release_bytes = (work / "bench-release.pth.tar").stat().st_size
        os.environ["DPL_ZOO_CACHE"] = str(work / "dpl-cache")
        with ReleaseMirror() as mirror, HubServer() as hub:
            mirror.add("bench-release.pth.tar", (work / "bench-release.pth.tar").read_bytes())
            os.environ["DPL_ZOO_MIRROR"] = mirror.url
            register(ZooEntry(name="bench-release", release=Release(drive_id="bench", epochs=50),
                              timm_tag="bench_release", **common), overwrite=True)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the first download's "recorded" warning
                t = time.perf_counter()
                dpl_zoo.load("bench-release")
                cold = time.perf_counter() - t
            converted = work / "dpl-cache" / "zoo" / "bench-release" / WEIGHTS_NAME

            # the same weights on a loopback Hub, pinned
            constants.ENDPOINT = hub.endpoint
            constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
            constants.HF_HUB_CACHE = str(work / "hf-cache")
            api = HfApi(endpoint=hub.endpoint, token="hf_benchmark")
            api.create_repo("bench/model")
            staged = work / "staged"
            staged.mkdir()
            for name in (WEIGHTS_NAME, "config.json"):
                shutil.copy2(converted.parent / name, staged / name)
            commit = api.upload_folder(folder_path=str(staged), repo_id="bench/model").oid
            register(ZooEntry(name="bench-hub", hub=HubWeights("bench/model", commit, sha256_of(converted)),
                              timm_tag="bench_hub", **common), overwrite=True)
            dpl_zoo.load("bench-hub")  # download and verify once
            hub_file = next(Path(constants.HF_HUB_CACHE).rglob(WEIGHTS_NAME))
            hub.state.requests.clear()

            def plain(path):
                def run():
                    model = timm.create_model(arch, num_classes=1000)
                    model.load_state_dict(load_file(str(path)))
                    return model.eval()
                return run

            paths = {"dpl_zoo.load (authors' release, converted)": lambda: dpl_zoo.load("bench-release"),
                     "timm + safetensors (same file)": plain(converted),
                     "dpl_zoo.load (Hub, pinned commit)": lambda: dpl_zoo.load("bench-hub"),
                     "timm + safetensors (Hub cache file)": plain(hub_file)}
            warm = {}
            for _ in range(2):  # interleave the paths, keep the better median of each
                for name, fn in paths.items():
                    r = median_time(fn, repeats)
                    warm[name] = min(warm.get(name, r), r, key=lambda x: x["median_s"])
            hub_requests = len(hub.state.requests)
            sha_time = median_time(lambda: sha256_of(converted), repeats)["median_s"]
            size = converted.stat().st_size
    finally:
        for key, value in saved_hub.items():  # leave huggingface_hub as it was
            setattr(constants, key, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for name in ("bench-release", "bench-hub"):
            if name in dpl_zoo.list_models():
                unregister(name)
        shutil.rmtree(work, ignore_errors=True)

    names = list(paths)
    ratio = warm[names[0]]["median_s"] / warm[names[1]]["median_s"]
    ratio_hub = warm[names[2]]["median_s"] / warm[names[3]]["median_s"]
    load_after = os.getloadavg()
    table = Table(title=f"load latency, {arch} ({size / 1e6:.0f} MB safetensors, {release_bytes / 1e6:.0f} MB "
                        f"release), medians of {repeats}")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_row("cold: dpl_zoo.load via DPL_ZOO_MIRROR on loopback (download + sha256 + convert + load)",
                  f"{cold:.3f}")
    for name in names:
        table.add_row(f"warm: {name}", f"{warm[name]['median_s']:.3f}")
    table.add_row("sha256 of the file (paid once, at download)", f"{sha_time:.3f}")
    table.add_row(f"ratio warm dpl_zoo.load / plain, release cache (target <= {TARGET})", f"{ratio:.3f}")
    table.add_row(f"ratio warm dpl_zoo.load / plain, Hub cache (target <= {TARGET})", f"{ratio_hub:.3f}")
    table.add_row("Hub requests during the warm loads", str(hub_requests))
    table.add_row("load average (1, 5, 15 min) before / after",
                  f"{'/'.join(f'{x:.2f}' for x in load_before)}  {'/'.join(f'{x:.2f}' for x in load_after)}")
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("load_toy.json" if args.toy else "load.json")
    path.write_text(portable(json_text({
        "benchmark": "load", "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(), "command": command_line(),
        "load_average_before": load_before, "load_average_after": load_after, "note": args.note,
        "arch": arch, "bytes": size, "release_bytes": release_bytes, "repeats": repeats, "cold_s": cold,
        "warm": warm, "sha256_s": sha_time, "ratio": ratio, "ratio_hub": ratio_hub, "target": TARGET,
        "hub_requests_warm": hub_requests}), out))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
