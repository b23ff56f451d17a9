"""The tests' smoke subset against the lowest versions pyproject.toml allows (not part of CI).

Makes a fresh virtual environment with the floor of ``requires-python`` (``python3.11``),
installs every dependency of ``[project] dependencies`` and of the extras the smoke tests use
at its floor (``pip install --upgrade --force-reinstall "torch==2.6" ...``), the project itself
without dependencies, and runs the smoke subset there: each floor is then a version the code
was run with, not a guess.

    python benchmarks/lowest_versions.py                  # the floors, python3.11; downloads torch
    python benchmarks/lowest_versions.py --python python3.11 --pin pillow==9.3.0 \
        --borrow ~/venv/lib/python3.11/site-packages       # every floor but torch's

The floor torch build is a large download (PyPI's Linux wheels bring the CUDA libraries).
Where it cannot be had, ``--pin NAME==VERSION`` replaces a floor, and ``--borrow SITE_PACKAGES``
takes torch, torchvision and every package the floors do not name from another environment of
the same Python, read-only (a path line in a ``.pth`` file, after the environment's own
packages; the floors are installed with ``--no-deps --ignore-installed``, so nothing there is
changed). The summary lists every version that is not a floor, so a partial run says what it
did not check. Some floors have no wheel for a newer Python (Pillow 9.1 has none for 3.11: 9.3
is its first): run with the Python of ``requires-python``, or pin their first wheels for yours.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what the smoke tests import besides the runtime dependencies (from the `dev` extra)
TEST_EXTRAS = ("pytest", "mlxtend", "matplotlib", "trustme")
# each dependency at least once: torch (method, loop), torchvision (folders), timm (task, models),
# safetensors (convert, export), numpy + torch.serialization (layouts), Pillow (views), yaml
# (config), rich (CLI), gdown + huggingface_hub (sources: loopback Drive and Hub), matplotlib (plot)
SMOKE = ["tests/test_method.py", "tests/test_config.py", "tests/test_augment.py", "tests/test_data.py",
         "tests/test_layouts.py", "tests/test_task.py", "tests/test_convert.py", "tests/test_evaluate.py",
         "tests/test_cli.py", "tests/test_sources.py", "tests/test_train.py::test_cli_train_compare_and_eval",
         "tests/test_train.py::test_resume_after_interruption_matches_uninterrupted"]


def floors() -> dict[str, str]:
    """``name -> floor`` of the runtime dependencies and of ``TEST_EXTRAS`` in the dev extra."""
    text = (ROOT / "pyproject.toml").read_text()
    runtime = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    dev = re.search(r"^dev = \[(.*?)\]", text, re.S | re.M).group(1)
    found = {}
    for block, only in ((runtime, None), (dev, TEST_EXTRAS)):
        for name, version in re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9][^",;\s]*)"', block):
            if only is None or name in only:
                found[name] = version
    missing = [n for n in ("torch", "torchvision", *TEST_EXTRAS) if n not in found]
    if missing:
        raise SystemExit(f"pyproject.toml gives no floor for {', '.join(missing)}; add one (name>=version)")
    return found


def python_floor() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    return "python" + re.search(r'requires-python = ">=([0-9.]+)"', text).group(1)


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kwargs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", default=python_floor(), help="interpreter for the environment (default: the floor "
                                                             "of requires-python)")
    p.add_argument("--venv", default=str(ROOT / ".lowest-venv"), help="environment folder, made anew")
    p.add_argument("--pin", action="append", default=[], metavar="NAME==VERSION",
                   help="install this version instead of the floor (repeatable), e.g. where the floor torch "
                        "build cannot be downloaded")
    p.add_argument("--borrow", metavar="SITE_PACKAGES", help="take torch, torchvision and every package the "
                   "floors do not name from this site-packages folder of another environment (read-only)")
    p.add_argument("--tests", nargs="*", default=SMOKE, help="pytest arguments (default: the smoke subset)")
    p.add_argument("--out", help="also write the summary (versions, pins, result) to this JSON file")
    args = p.parse_args(argv)
    floor = floors()
    wanted = {name: f"{name}=={version}" for name, version in floor.items()}
    pins = {}
    for item in args.pin:
        name, sep, version = item.partition("==")
        if not sep or name not in wanted:
            raise SystemExit(f"--pin {item}: give NAME==VERSION for one of {', '.join(sorted(wanted))}")
        wanted[name] = pins[name] = item
    venv = Path(args.venv)
    t0 = time.perf_counter()
    run([args.python, "-m", "venv", "--clear", str(venv)])
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip"]
    if args.borrow:
        borrowed = Path(args.borrow).expanduser().resolve()
        if not (borrowed / "torch").is_dir():
            raise SystemExit(f"--borrow {borrowed}: no torch there; give the site-packages folder of an "
                             f"environment of {args.python} that has torch and torchvision")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
        (Path(site) / "_lowest_versions_borrowed.pth").write_text(str(borrowed) + "\n")
        for name in ("torch", "torchvision"):
            wanted.pop(name)
            pins[name] = f"borrowed from {borrowed}"
        run([*pip, "install", "--no-deps", "--ignore-installed", *wanted.values()])
    else:
        run([*pip, "install", "--upgrade", "--force-reinstall", *wanted.values()])
    run([*pip, "install", "--no-deps", *(["--ignore-installed"] if args.borrow else []), "-e", str(ROOT)])
    if not args.borrow:   # borrowed packages answer for their own requirements
        run([*pip, "check"])
    def key(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    versions = {key(n): v for n, v in (line.split("==", 1) for line in run(
        [*pip, "freeze", "--exclude-editable"], capture_output=True, text=True).stdout.split() if "==" in line)}
    tests = subprocess.run([python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            *args.tests], cwd=ROOT)
    python_version = subprocess.run([python, "--version"], capture_output=True, text=True).stdout
    summary = {"python": python_version.strip(), "installed": {n: versions.get(key(n)) for n in floor},
               "not_floors": pins, "tests": args.tests, "pytest_exit_code": tests.returncode,
               "minutes": round((time.perf_counter() - t0) / 60, 1)}
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return tests.returncode


if __name__ == "__main__":
    sys.exit(main())
