"""benchmarks/usb_features.py: USB's imbalanced algorithms (ABC, DASO, DARP, CReST) and FixMatch
train a linear head on a small features file, each writing its result JSON.

USB's wheels (0.3 MB) are downloaded here when absent (about 5 s with network); without network
and without prepared wheels the USB runs are skipped, saying so."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import usb_features  # noqa: E402


@pytest.fixture(scope="module")
def wheels():
    from usb_peer import PINS, WHEELS
    if not any(WHEELS.glob("semilearn-*.whl")):
        try:
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "usb_peer.py"), "--prepare", "--wheels",
                            str(WHEELS)], check=True, capture_output=True, timeout=120)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"USB's wheels ({', '.join(PINS)}) are not prepared and could not be downloaded "
                        f"(`python benchmarks/usb_peer.py --prepare` needs network): {type(e).__name__}")
    return WHEELS


def test_synthetic_features_follow_the_contract(tmp_path):
    path = usb_features.synthetic_features(tmp_path / "f.npz", n_l=60, n_u=200, dim=16, classes=3, views=2)
    d = usb_features.load_features(path)
    assert d["labeled_x"].shape == (60, 2, 16) and d["unlabeled_weak"].shape == (200, 2, 16)
    assert d["unlabeled_strong"].shape == (200, 2, 16) and d["test_x"].shape[1] == 16 and d["num_classes"] == 3
    counts = np.bincount(d["labeled_y"], minlength=3)
    assert counts[0] > counts[1] > counts[2] >= 1            # long-tailed, class 0 the head
    np.savez(tmp_path / "bad.npz", **{k: v for k, v in np.load(path).items() if k != "unlabeled_y"})
    with pytest.raises(ValueError, match="unlabeled_y"):
        usb_features.load_features(tmp_path / "bad.npz")


def test_command_lines():
    cmd = usb_features.command("f.npz", "daso", 2, "r.json", steps=30, site="s", extra=("--daso-pretrain-iter", "4"))
    assert cmd[1].endswith("usb_features.py")
    assert cmd[cmd.index("--algorithm") + 1] == "daso" and cmd[cmd.index("--seed") + 1] == "2"
    assert cmd[cmd.index("--steps") + 1] == "30" and cmd[cmd.index("--site") + 1] == "s" and cmd[-1] == "4"
    assert cmd[cmd.index("--threshold") + 1] == "0.7" and cmd[cmd.index("--mu") + 1] == "7"
    with pytest.raises(ValueError):
        usb_features.command("f.npz", "simpro", 0, "r.json")
    assert "--jobs" in usb_features.jobs_command("j.json")


def test_every_usb_algorithm_trains_on_features(tmp_path, wheels):
    features = usb_features.synthetic_features(tmp_path / "f.npz", n_l=60, n_u=200, dim=16, classes=3, views=2)
    algorithms = ("abc", "daso", "darp", "crest", "fixmatch")
    jobs = [{"features": str(features), "algorithm": a, "seed": 0, "out": str(tmp_path / f"{a}.json"), "steps": 30}
            for a in algorithms]
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    cmd = usb_features.jobs_command(tmp_path / "jobs.json", site=tmp_path / "site", wheels=wheels)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for a in algorithms:
        r = json.loads((tmp_path / f"{a}.json").read_text())
        assert r["status"] == "ok", r
        assert r["algorithm"] == a and 0 <= r["top1"] <= 100 and 0 <= r["balanced_top1"] <= 100
        assert len(r["per_class_top1"]) == 3 and sum(r["pl_hist"]) == 200 and r["img_per_s"] > 0
        assert r["usb_settings"]["p_cutoff"] == 0.7 and r["usb_settings"]["uratio"] == 7
        assert r["usb_settings"]["imb_algorithm"] == (None if a == "fixmatch" else a)
    crest = json.loads((tmp_path / "crest.json").read_text())
    assert crest["steps"] == 30 and crest["usb_settings"]["num_train_iter"] == 5     # 6 generations share 30 steps
    assert sum(crest["algorithm_state"]["crest_last_labeled_hist"]) > 60             # pseudo-labels moved in
    daso = json.loads((tmp_path / "daso.json").read_text())
    assert "train/assign_loss" in daso["algorithm_state"]["last_log"]                # DASO past its warm-up
    assert json.loads((tmp_path / "abc.json").read_text())["evaluated"].endswith("auxiliary (balanced) classifier")
    # the single-run command line gives the same result as the jobs file
    single = usb_features.command(features, "abc", 0, tmp_path / "abc-single.json", steps=30, site=tmp_path / "site",
                                  wheels=wheels)
    assert subprocess.run(single, cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("abc.json", "abc-single.json"))
    assert a["pl_hist"] == b["pl_hist"] and a["top1"] == b["top1"]


def test_a_saved_result_is_reused_only_for_the_same_settings_and_features(tmp_path, monkeypatch):
    import argparse
    import os
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import usb_features
    npz = tmp_path / "f.npz"
    npz.write_bytes(b"features")
    args = argparse.Namespace(features=str(npz), algorithm="abc", seed=0, steps=1000, batch=32, mu=7, lr=0.03,
                              weight_decay=0.05, momentum=0.9, ema=0.99, threshold=0.7, schedule="usb")
    saved = usb_features.request(args)
    assert usb_features.request(args) == saved
    assert usb_features.request(argparse.Namespace(**{**vars(args), "steps": 500})) != saved
    st = npz.stat()
    os.utime(npz, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))     # the features exported again
    assert usb_features.request(args) != saved
