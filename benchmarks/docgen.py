"""The generated parts of README.md, docs/ and mkdocs.yml, written from their sources so they cannot
drift: results tables and figures (benchmarks/results/*.json, through ``report.py``), the README's
headline table, the fine-tuning decision table, the zoo table (the registry), the shipped recipes,
the CLI reference (the argparse parsers) and the recipe keys (the config dataclasses' comments).

Each generated part sits between two markers and is replaced whole::

    <!-- BEGIN GENERATED: NAME -->            (in mkdocs.yml: # BEGIN GENERATED: NAME)
    <!-- END GENERATED: NAME -->              (in mkdocs.yml: # END GENERATED: NAME)

    python benchmarks/docgen.py            # rewrite every generated part (and create missing results pages)
    python benchmarks/docgen.py --check    # list the stale ones, exit 1 (the docs tests run this)

Also the MkDocs hook (``hooks:`` in mkdocs.yml) that serves benchmarks/results/ figures at
``results/figures/``, so the figures live in one place.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
MARKDOWN = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>\S+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                      re.S)
YAML = re.compile(r"(?P<indent>[ ]*)# BEGIN GENERATED: (?P<name>\S+)\n(?P<body>.*?)(?P=indent)# END GENERATED: "
                  r"(?P=name)\n", re.S)


class GenerationError(ValueError):
    """A marker or page that cannot be generated; the message says what to fix."""


def _cell(text) -> str:
    """Text safe in a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;").replace("\n", " ")


# --- the CLI reference and the recipe keys ----------------------------------------------------------------

def _default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{}" if not value else str(value)
    return str(value)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=100)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = ["| argument | default | meaning |", "|---|---|---|"]
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = ", ".join(action.option_strings) or action.dest
        if action.option_strings and action.nargs != 0:
            name += f" {action.metavar or action.dest.upper()}"
        default = "" if action.nargs == 0 or action.default in (None, []) else _default(action.default)
        meaning = action.help or ""
        if action.choices:
            meaning += f" (one of: {', '.join(map(str, action.choices))})"
        if action.required:
            meaning = "required. " + meaning
        rows.append(f"| `{_cell(name)}` | {_cell(default)} | {_cell(meaning)} |")
    return rows


def subcommands() -> dict[str, argparse.ArgumentParser]:
    """``dpl-zoo``'s subcommand parsers, in the order ``--help`` lists them."""
    from dpl_zoo.cli import build_parser
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def cli_reference(link) -> str:
    from dpl_zoo.cli import build_parser
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in action._choices_actions}
    out = [f"```text\n{_usage(parser)}\n```"]
    for name, sub in action.choices.items():
        out += [f"### `dpl-zoo {name}`", _cell(sub.description or helps.get(name) or ""),
                f"```text\n{_usage(sub)}\n```", "\n".join(_argument_rows(sub))]
    return "\n\n".join(out)


def recipe_keys(kind: str) -> str:
    from dpl_zoo.config import PretrainConfig, TrainConfig
    from dpl_zoo.schema import sections
    root = {"train": TrainConfig, "pretrain": PretrainConfig}[kind]
    out = []
    for section in sections(root):
        title = f"`{section.prefix}`" if section.prefix else "Top level"
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        rows += [f"| `{k.key}` | {k.type} | `{_cell(_default(k.default))}` | {_cell(k.help)} |" for k in section.keys]
        out += [f"#### {title}", _cell(section.doc), "\n".join(rows)]
    return "\n\n".join(out)


# --- tables from the library's own data ------------------------------------------------------------------

def zoo_table(link) -> str:
    """The registry: every entry, its timm name, where its weights come from and its numbers."""
    from dpl_zoo.zoo import list_models, model_info
    rows = ["| entry | timm name | weights from | labels | top-1 of the weights | paper | baseline | licence |",
            "|---|---|---|---|---|---|---|---|"]
    for name in list_models():
        e = model_info(name)
        top1 = "-" if not e.metrics else f"{e.metrics.top1:.1f} ({e.metrics.provenance})"
        paper = "-" if not e.paper else f"{e.paper.top1:.1f}"
        base = "-" if not e.baseline else f"{e.baseline.top1:.1f} ({e.baseline_method})"
        rows.append(f"| `{name}` | {f'`{e.timm_name}`' if e.timm_name else '-'} | {e.source} | "
                    f"{_cell(e.label_budget)} | {top1} | {paper} | {_cell(base)} | {e.license} |")
    return "\n".join(rows)


def recipes_table(link) -> str:
    """The shipped recipes and the first sentence of each one's header comment."""
    from dpl_zoo.config import recipe_dir
    rows = ["| recipe | what |", "|---|---|"]
    for path in sorted(recipe_dir().glob("*.yaml")):
        header = []
        for line in path.read_text().splitlines():
            if not line.startswith("#") or not line.strip("# "):
                break
            header.append(line.lstrip("#").strip())
        text = " ".join(header)
        first = re.split(r"\.\s+(?=[A-Z`])", text, maxsplit=1)[0].rstrip(".")
        rows.append(f"| `{path.stem}` | {_cell(first)} |")
    return "\n".join(rows)


def gpu_parts(link) -> str:
    """The GPU check's parts and their time budget, from its ``PARTS`` list."""
    import runpy
    check = runpy.run_path(str(REPO / "benchmarks" / "gpu_check.py"), run_name="gpu_check_parts")
    parts = check["PARTS"]
    rows = ["| phase | part | planned s (its deadline) | CPU cores | stopped early by s, to report | what |",
            "|---|---|---|---|---|---|"]
    rows += [f"| {p.phase} | `{p.name}` | {p.seconds:.0f} | {p.cores or 'all'} | {p.reserve:.0f} | {_cell(p.title)} |"
             for p in parts]
    one = sum(p.seconds for p in parts if p.phase == 1)
    two = max(p.seconds for p in parts if p.phase == 2)
    rows += ["", f"Phase 1 adds up to {one:.0f} s (its parts in turn) and phase 2 to {two:.0f} s (side by side): "
                 f"{(one + two) / 60:.2f} minutes of the check's {check['BUDGET_MINUTES']:g}-minute budget "
                 f"(`--minutes M` scales every deadline)."]
    return "\n".join(rows)


# --- blocks, pages and files ------------------------------------------------------------------------------

def results_nav() -> str:
    return "\n".join(f'- "{s.title}": results/{s.slug}.md' for s in report.present())


BLOCKS: dict[str, Callable] = {
    "headline": report.headline, "decisions": report.decision_table, "results-index": report.results_index,
    "peer": report.peer,
    "zoo": zoo_table, "recipes": recipes_table, "cli": cli_reference, "gpu-parts": gpu_parts,
    "recipe-keys/train": lambda link: recipe_keys("train"), "recipe-keys/pretrain": lambda link: recipe_keys("pretrain"),
}


def render(name: str, where: Path) -> str:
    """The block ``name`` as it belongs in the file ``where`` (links relative to that file)."""
    def link(target: str) -> str:
        return Path(os.path.relpath(DOCS / target, where.parent)).as_posix()
    if name.startswith("results/"):
        slug = name.split("/", 1)[1]
        if not any(s.slug == slug for s in report.STUDIES):
            raise GenerationError(f"{where}: no study {slug!r} in benchmarks/report.py STUDIES")
        return report.page_block(report.study(slug))
    if name not in BLOCKS:
        raise GenerationError(f"{where}: unknown generated block {name!r} (known: {', '.join(sorted(BLOCKS))}, "
                              f"results/<study>)")
    return BLOCKS[name](link)


def regenerate(path: Path, text: str) -> str:
    """``text`` (the content of ``path``) with every generated block rewritten."""
    if path.suffix in (".yml", ".yaml"):
        def yaml_block(m: re.Match) -> str:
            if m["name"] != "results-nav":
                raise GenerationError(f"{path}: unknown generated block {m['name']!r}")
            body = "".join(f"{m['indent']}{line}\n" for line in results_nav().splitlines())
            return f"{m['indent']}# BEGIN GENERATED: {m['name']}\n{body}{m['indent']}# END GENERATED: {m['name']}\n"
        return YAML.sub(yaml_block, text)
    return MARKDOWN.sub(lambda m: f"{m.group(1)}{render(m['name'], path)}\n{m.group(4)}", text)


def page_skeleton(s) -> str:
    """A new study's page: its title, summary and generated block; prose can be added around them."""
    return (f"# {s.title}\n\n{s.summary}\n\n<!-- BEGIN GENERATED: results/{s.slug} -->\n"
            f"<!-- END GENERATED: results/{s.slug} -->\n")


def targets() -> dict[Path, str]:
    """Every file with generated parts, and what it should hold now."""
    paths = [REPO / "README.md", REPO / "mkdocs.yml", *sorted(DOCS.rglob("*.md"))]
    out = {p: p.read_text() for p in paths if p.is_file()}
    for s in report.present():
        page = DOCS / "results" / f"{s.slug}.md"
        text = out.get(page, page_skeleton(s))
        if f"<!-- BEGIN GENERATED: results/{s.slug} -->" not in text:
            text += f"\n<!-- BEGIN GENERATED: results/{s.slug} -->\n<!-- END GENERATED: results/{s.slug} -->\n"
        out[page] = text
    return {p: regenerate(p, text) for p, text in out.items()}


def stale() -> list[Path]:
    """Files whose generated parts differ from their sources."""
    return [p for p, text in targets().items() if not p.is_file() or p.read_text() != text]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="list stale files and exit 1; write nothing")
    args = p.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"stale: {path.relative_to(REPO)} (run python benchmarks/docgen.py)")
        return 1 if old else 0
    for path, text in targets().items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 0


# --- MkDocs hook -------------------------------------------------------------------------------------------

def on_files(files, config):
    """Serve the figures of benchmarks/results/ at results/figures/ (they are not copied into docs/)."""
    from mkdocs.structure.files import File
    for path in sorted(report.RESULTS.rglob("*.png")):
        relative = path.relative_to(report.RESULTS)
        if "runs" not in relative.parts:
            files.append(File.generated(config, f"results/figures/{relative.as_posix()}", abs_src_path=str(path)))
    return files


if __name__ == "__main__":
    sys.exit(main())
