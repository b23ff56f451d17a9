"""Each benchmark script runs end to end at toy size and writes its JSON (no timing assertions)."""
import json
import runpy
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script, *args):
    argv = sys.argv
    sys.argv = [str(BENCH / script), *args]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(BENCH / script), run_name="__main__")
        assert exit_info.value.code == 0
    finally:
        sys.argv = argv


def test_gain_toy(tmp_path):
    _run("gain.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "gain_toy.json").read_text())
    assert {r["method"] for r in report["runs"]} == {"supervised", "fixmatch", "debiaspl"}
    assert len(report["ablation"]) == 2 and report["machine"]["torch"]
    assert (tmp_path / "pseudo_label_histograms_toy.png").stat().st_size > 1000


def test_speed_toy(tmp_path):
    _run("speed.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "speed_toy.json").read_text())
    assert [m["model"] for m in report["models"]] == ["test_resnet", "test_vit"]
    assert all(m["step_flops"] > 0 and m["img_per_s"] > 0 for m in report["models"])
    assert [p["augment_on"] for p in report["pipeline"]] == ["workers", "device"]
    assert all(p["train_img_per_s"] > 0 and p["step_img_per_s"] > 0 for p in report["pipeline"])


def test_load_toy(tmp_path):
    _run("load.py", "--toy", "--out", str(tmp_path))
    report = json.loads((tmp_path / "load_toy.json").read_text())
    assert report["cold_s"] > 0 and report["ratio"] > 0
