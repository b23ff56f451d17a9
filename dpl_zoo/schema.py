"""The recipe keys: every ``--set`` key with its type, default and meaning, read from the config
dataclasses (:mod:`dpl_zoo.config`) and the comments beside their fields.

The comments in ``config.py`` are the one source of a key's meaning: the CLI reference of the
documentation is generated from them (``benchmarks/docgen.py``), so it cannot drift from the code.
A field's meaning is its trailing comment, after the comment lines directly above it, if any.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RecipeKey:
    """One key of a recipe, as ``--set`` names it."""
    key: str        # dotted path: dpl.tau, data.root
    type: str       # bool, int, float, str, list, mapping, any; "X or null" where null is allowed
    default: Any    # the dataclass default (a recipe may set its own)
    help: str       # the field's comment in dpl_zoo/config.py


@dataclass(frozen=True)
class Section:
    """A group of keys: the top level (``prefix`` empty) or a section such as ``dpl.``."""
    prefix: str
    doc: str        # the dataclass's docstring
    keys: tuple


class UndocumentedKey(ValueError):
    """A config field without a comment: the reference would have no meaning to show for it."""


def field_comments(cls: type) -> dict[str, str]:
    """``{field: comment}`` for a dataclass, from its source: comment lines directly above a
    field and the comment at the end of its line, joined."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][:tok.start[1]].strip():
            trailing[tok.start[0]] = _comment_text(tok.string)
    out = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, row = [], node.lineno - 1
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, _comment_text(lines[row - 1].strip()))
            row -= 1
        text = " ".join(part for part in (*above, trailing.get(node.lineno, "")) if part)
        out[node.target.id] = text
    return out


def _comment_text(comment: str) -> str:
    return comment.lstrip("#").strip()


def type_name(hint: Any) -> str:
    """A field's type as a recipe writer reads it."""
    if hint is Any:
        return "any"
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return f"{type_name(args[0])} or null"
    return {tuple: "list", dict: "mapping"}.get(hint, getattr(hint, "__name__", str(hint)))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def sections(root: type) -> list[Section]:
    """The top level of a config dataclass, then each section, in field order. Raises
    :class:`UndocumentedKey` naming every field without a comment."""
    out, missing = [], []

    def visit(cls: type, prefix: str) -> None:
        hints, comments = typing.get_type_hints(cls), field_comments(cls)
        keys, nested = [], []
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                nested.append((hints[f.name], f"{prefix}{f.name}."))
                continue
            if not comments.get(f.name):
                missing.append(f"{cls.__name__}.{f.name}")
            keys.append(RecipeKey(prefix + f.name, type_name(hints[f.name]), _default(f), comments.get(f.name, "")))
        out.append(Section(prefix, inspect.getdoc(cls) or "", tuple(keys)))
        for sub, sub_prefix in nested:
            visit(sub, sub_prefix)

    visit(root, "")
    if missing:
        raise UndocumentedKey(f"{', '.join(missing)} in {inspect.getsourcefile(root)} have no comment: say what each "
                              f"key means in a comment on its line (the CLI reference is generated from them)")
    return out


def recipe_keys(root: type) -> list[RecipeKey]:
    """Every key of a config dataclass (``TrainConfig``, ``PretrainConfig``), dotted, in order."""
    return [key for section in sections(root) for key in section.keys]
