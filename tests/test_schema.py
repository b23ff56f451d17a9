"""The recipe schema the CLI reference is generated from: every key, its type, default and meaning."""
from dataclasses import dataclass, field
from typing import Optional

import pytest
import yaml

from dpl_zoo.config import PretrainConfig, TrainConfig, load_config, load_pretrain_config
from dpl_zoo.schema import UndocumentedKey, recipe_keys, sections


def test_every_recipe_key_has_type_default_and_meaning():
    for root in (TrainConfig, PretrainConfig):
        keys = recipe_keys(root)          # raises if a field has no comment
        assert all(k.help for k in keys)
    keys = {k.key: k for k in recipe_keys(TrainConfig)}
    assert keys["dpl.tau"].type == "float" and keys["dpl.tau"].default == 0.4 and "FixMatch" in keys["dpl.tau"].help
    assert keys["data.label_fraction"].type == "float or null" and keys["data.label_fraction"].default is None
    assert keys["data.scale"].type == "list" and keys["model_kwargs"].type == "mapping"
    # comment lines above a field, then its own comment
    assert "uniform (the paper)" in keys["dpl.target_prior"].help and keys["dpl.target_prior"].type == "any"
    assert keys["initial_checkpoint_required"].help.startswith("recipes whose method needs")
    assert [s.prefix for s in sections(TrainConfig)] == ["", "dpl.", "data."]
    assert [s.prefix for s in sections(PretrainConfig)] == ["", "moco.", "data.", "knn."]


def _yaml(value) -> str:
    return yaml.safe_dump(list(value) if isinstance(value, tuple) else value, default_flow_style=True) \
        .replace("\n...\n", "").strip()


def test_every_listed_key_and_default_is_one_the_loader_accepts():
    for key in recipe_keys(TrainConfig):
        load_config(None, [f"{key.key}={_yaml(key.default)}"])
    for key in recipe_keys(PretrainConfig):
        load_pretrain_config(None, [f"{key.key}={_yaml(key.default)}"])


@dataclass
class _Section:
    """A section."""
    said: int = 1        # what it means
    silent: Optional[str] = None


@dataclass
class _Root:
    """A root."""
    top: bool = False    # a switch
    sub: _Section = field(default_factory=_Section)


def test_a_key_without_a_comment_is_refused():
    with pytest.raises(UndocumentedKey, match=r"_Section\.silent .* have no comment"):
        sections(_Root)
