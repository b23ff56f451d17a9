"""The README's guarantees, each proved by injecting the fault."""
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from dpl_zoo import checkpoint as ckpt
from dpl_zoo.config import load_config
from dpl_zoo.train import fit

from conftest import tiny_overrides

TIMING = ("img_per_s", "seconds")


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(image_data, tmp_path, seed):
    sets = tiny_overrides(image_data, tmp_path / "runs", epochs=4, steps_per_epoch=15, experiment="killed")
    straight = fit(load_config("mnist_demo", [*sets, "experiment=straight"]), quiet=True)  # as `train` does
    args = [sys.executable, "-m", "dpl_zoo", "train", "--quiet", "--methods", "debiaspl"] + \
        [a for s in sets for a in ("--set", s)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "runs" / "killed" / "last.pth.tar"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(random.Random(seed).uniform(0.0, 0.6))  # somewhere inside a later epoch
    killed_alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed_alive, "the run ended before it could be killed; lengthen it"
    resumed = fit(load_config("mnist_demo", sets), resume=str(last), quiet=True)
    a = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)
    b = torch.load(last, weights_only=True)
    for key in ("state_dict", "state_dict_ema", "optimizer"):
        assert json.dumps(a[key], default=lambda t: t.tolist()) == json.dumps(b[key], default=lambda t: t.tolist())
    assert torch.equal(a["task_state"]["qhat"], b["task_state"]["qhat"])
    assert {k: v for k, v in resumed.items() if k not in ("seconds", "resumed", "output")} == \
        {k: v for k, v in straight.items() if k not in ("seconds", "resumed", "output")}
    assert _rows(tmp_path / "runs" / "killed" / "metrics.jsonl") == _rows(tmp_path / "runs" / "straight" / "metrics.jsonl")


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, failure):
    path = tmp_path / "last.pth.tar"
    ckpt.atomic_save({"epoch": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        real_save({"partial": torch.zeros(1000)}, f)  # some bytes reach the disk, then the failure
        raise failure

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(type(failure)):
        ckpt.atomic_save({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = ckpt.load(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["last.pth.tar"]  # no temporary file left behind


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "last.pth.tar"
    ckpt.atomic_save({"epoch": 1, "w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ckpt.CheckpointError, match="truncated, corrupt"):
        ckpt.load(path)


def test_checkpoints_hold_no_pickled_objects(tiny_config, tmp_path):
    fit(tiny_config(epochs=1), quiet=True)
    for name in ("last.pth.tar", "best.pth.tar"):
        torch.load(tmp_path / "runs" / "run" / name, weights_only=True)  # raises on any non-weights object
