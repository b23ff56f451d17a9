"""Load latency: ``dpl_zoo.load(name)`` against the plain timm + safetensors path.

Warm cache: ``dpl_zoo.load`` (registry lookup, cache resolution, sha256 check, timm build,
weights) vs ``timm.create_model(arch)`` + ``safetensors.torch.load_file`` +
``load_state_dict`` of the same cached file (target ratio <= 1.2). Cold cache: the first
``dpl_zoo.load`` against a Hub-compatible server on 127.0.0.1 (the test suite's), so
download time is loopback time, not internet time.

    python benchmarks/load.py             # resnet50
    python benchmarks/load.py --toy       # test_resnet, few repeats
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
from _common import machine_facts, median_time  # noqa: E402
from hub_server import HubServer  # noqa: E402

console = Console()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--toy", action="store_true")
    args = p.parse_args(argv)
    arch, repeats = ("test_resnet", 2) if args.toy else (args.arch, args.repeats)

    import timm
    import torch
    from huggingface_hub import HfApi, constants
    from safetensors.torch import load_file

    import dpl_zoo
    from dpl_zoo.checkpoint import export_timm
    from dpl_zoo.zoo import WEIGHTS_NAME, ZooEntry, register, sha256_of

    saved = {k: getattr(constants, k) for k in ("ENDPOINT", "HUGGINGFACE_CO_URL_TEMPLATE", "HF_HUB_CACHE")}
    work = Path(tempfile.mkdtemp(prefix="dpl-load-"))
    try:
        torch.manual_seed(0)
        export_timm(timm.create_model(arch, num_classes=1000), work / "export")
        sha = sha256_of(work / "export" / WEIGHTS_NAME)
        size = (work / "export" / WEIGHTS_NAME).stat().st_size
        with HubServer() as hub:
            constants.ENDPOINT = hub.endpoint
            constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
            constants.HF_HUB_CACHE = str(work / "cache")
            api = HfApi(endpoint=hub.endpoint, token="hf_benchmark")
            api.create_repo("bench/model")
            api.upload_folder(folder_path=str(work / "export"), repo_id="bench/model")
            register(ZooEntry(name="bench-model", architecture=arch, hf_hub_id="bench/model", num_classes=1000,
                              label_set="none", dataset="none", label_budget="none", recipe="none", sha256=sha),
                     overwrite=True)
            t = time.perf_counter()
            dpl_zoo.load("bench-model")
            cold = time.perf_counter() - t
            cached = next(Path(constants.HF_HUB_CACHE).rglob(WEIGHTS_NAME))

            def plain():
                model = timm.create_model(arch, num_classes=1000)
                model.load_state_dict(load_file(str(cached)))
                return model.eval()

            warm = {}
            for _ in range(2):  # interleave the two paths, keep the better median of each
                for name, fn in (("dpl_zoo.load", lambda: dpl_zoo.load("bench-model")), ("timm + safetensors", plain)):
                    r = median_time(fn, repeats)
                    warm[name] = min(warm.get(name, r), r, key=lambda x: x["median_s"])
            sha_time = median_time(lambda: sha256_of(cached), repeats)["median_s"]
    finally:
        for key, value in saved.items():  # leave huggingface_hub as it was
            setattr(constants, key, value)
        shutil.rmtree(work, ignore_errors=True)

    ratio = warm["dpl_zoo.load"]["median_s"] / warm["timm + safetensors"]["median_s"]
    table = Table(title=f"load latency, {arch} ({size / 1e6:.0f} MB safetensors), medians of {repeats}")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    table.add_row("dpl_zoo.load, cold cache (loopback hub)", f"{cold:.3f}")
    table.add_row("dpl_zoo.load, warm cache", f"{warm['dpl_zoo.load']['median_s']:.3f}")
    table.add_row("timm.create_model + load_file + load_state_dict", f"{warm['timm + safetensors']['median_s']:.3f}")
    table.add_row("  of which sha256 of the file (in dpl_zoo.load)", f"{sha_time:.3f}")
    table.add_row("ratio warm dpl_zoo / plain (target <= 1.2)", f"{ratio:.3f}")
    console.print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("load_toy.json" if args.toy else "load.json")
    path.write_text(json.dumps({"benchmark": "load", "date": time.strftime("%Y-%m-%d"), "machine": machine_facts(),
                                "arch": arch, "bytes": size, "repeats": repeats, "cold_s": cold, "warm": warm,
                                "sha256_s": sha_time, "ratio": ratio}, indent=2))
    console.print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
