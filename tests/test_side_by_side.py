"""`dpl-zoo train` with several methods side by side: one spawned process per method on the CPU.

The runs here are forced side by side with one thread each (``usable_cores`` is the parent's
decision, so patching it in the test process holds even on a one-core machine)."""
import json
import multiprocessing
import queue
import signal
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import dpl_zoo.side_by_side as sbs
from dpl_zoo.cli import main
from dpl_zoo.progress import RunBoard

from conftest import tiny_overrides

METHODS = ("debiaspl", "fixmatch")


def _train(image_data, tmp_path, *args, **overrides):
    sets = [a for o in tiny_overrides(image_data, tmp_path / "runs", **overrides) for a in ("--set", o)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: test_resnet\n")
    return main(["train", str(recipe), *sets, *args])


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(sbs, "usable_cores", lambda: 2)


def test_side_by_side_only_for_several_runs_on_a_cpu_with_cores(monkeypatch):
    monkeypatch.setattr(sbs, "usable_cores", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert sbs.use_side_by_side("cpu", 2)
    assert not sbs.use_side_by_side("cpu", 1)
    assert not sbs.use_side_by_side("cuda", 2)
    assert not sbs.use_side_by_side("cpu", 2, sequential=True)
    monkeypatch.setenv("WORLD_SIZE", "2")   # under torchrun: the ranks share the work instead
    assert not sbs.use_side_by_side("cpu", 2)
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setattr(sbs, "usable_cores", lambda: 1)
    assert not sbs.use_side_by_side("cpu", 2)
    assert [sbs.threads_per_run(n, cores) for n, cores in ((2, 2), (2, 16), (3, 2), (3, 16))] == [1, 8, 1, 5]


def test_methods_side_by_side_match_each_method_alone(image_data, tmp_path, two_cores, capsys):
    # a threshold low enough for pseudo-labels to be accepted: the two methods train differently
    settings = {"dpl.threshold": 0.3}
    assert _train(image_data, tmp_path, "--methods", ",".join(METHODS), experiment="both", **settings) == 0
    out = capsys.readouterr().out
    assert "2 methods side by side, one process each with 1 torch thread" in out
    # each run's lines, prefixed by its method, whole (not a log of one run broken by the other's)
    for method in METHODS:
        assert f"{method}: {method} | test_resnet" in out and f"{method}: epoch 2 done: loss" in out
        assert f"{method}: epoch 2: top-1" in out
    assert "same data, model and budget" in out
    comparison = json.loads((tmp_path / "runs" / "both-comparison.json").read_text())
    assert [s["method"] for s in comparison] == list(METHODS)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            assert _train(image_data, tmp_path, "--methods", method, "--quiet", experiment=f"alone-{method}",
                          **settings) == 0
    finally:
        torch.set_num_threads(threads)
    for method, together in zip(METHODS, comparison):
        alone = json.loads((tmp_path / "runs" / f"alone-{method}" / "summary.json").read_text())
        assert json.loads((tmp_path / "runs" / f"both-{method}" / "summary.json").read_text()) == together
        for key in ("seconds", "output"):
            together.pop(key), alone.pop(key)
        assert together == alone, method
        assert together["qhat"] is not None and together["steps"] == 4
        a = load_file(tmp_path / "runs" / f"alone-{method}" / "export" / "model.safetensors")
        b = load_file(tmp_path / "runs" / f"both-{method}" / "export" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), method
    assert comparison[0]["mask_rate"] > 0 and comparison[0]["qhat"] != comparison[1]["qhat"]


def test_a_failing_run_stops_the_others_with_one_error_line(image_data, tmp_path, two_cores, capfd):
    # an unlabeled batch larger than the unlabeled split fails DebiasPL when its run is built;
    # the supervised run needs no unlabeled batch and would train on for many epochs
    rc = _train(image_data, tmp_path, "--methods", "supervised,debiaspl", **{"dpl.mu": 10, "epochs": 100})
    out, err = capfd.readouterr()
    assert rc == 2
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert errors == ["error: the unlabeled split has 24 images, fewer than one unlabeled batch (mu x batch_size "
                      "= 30); lower batch_size or dpl.mu"]
    assert "Traceback" not in out + err
    assert not multiprocessing.active_children()
    assert not (tmp_path / "runs" / "run-supervised" / "summary.json").exists()


def test_ctrl_c_stops_every_run_and_resume_auto_finishes_them(image_data, tmp_path, two_cores, monkeypatch, capsys):
    # Ctrl-C reaches only the parent (the children ignore SIGINT): a KeyboardInterrupt in its loop
    # once both runs are past their first checkpoint is what the user's Ctrl-C does
    seen = set()
    handle = RunBoard.handle

    def interrupt(self, message):
        handle(self, message)
        if message[0] == "say" and message[2].startswith("epoch 2 done"):
            seen.add(message[1])
            if len(seen) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(RunBoard, "handle", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _train(image_data, tmp_path, "--methods", ",".join(METHODS), "--quiet", epochs=12)
    monkeypatch.setattr(RunBoard, "handle", handle)
    assert not multiprocessing.active_children()
    assert "continue: the same command with --set experiment=run --resume auto" in capsys.readouterr().out
    for method in METHODS:
        folder = tmp_path / "runs" / f"run-{method}"
        assert not (folder / "summary.json").exists()
        assert 0 <= torch.load(folder / "last.pth.tar", weights_only=True)["epoch"] < 11
    # (--sequential: the same fit(resume="auto") a child runs, without starting processes again)
    assert _train(image_data, tmp_path, "--methods", ",".join(METHODS), "--quiet", "--resume", "auto",
                  "--sequential", epochs=12) == 0
    for method in METHODS:
        summary = json.loads((tmp_path / "runs" / f"run-{method}" / "summary.json").read_text())
        assert summary["resumed"] and summary["steps"] == 24
        # continued from the checkpoint: every step trained (and logged) once, none again from the start
        rows = (tmp_path / "runs" / f"run-{method}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in rows if json.loads(r)["kind"] == "train"] == list(range(1, 25))


def test_a_run_whose_process_died_is_one_error_line():
    events = SimpleNamespace(get=lambda timeout: (_ for _ in ()).throw(queue.Empty()))
    procs = {"debiaspl": SimpleNamespace(exitcode=None), "fixmatch": SimpleNamespace(exitcode=-signal.SIGKILL)}
    with pytest.raises(sbs.RunProcessError, match=r"^the fixmatch run's process was killed by SIGKILL \(often: out "
                                                  r"of memory\) before it finished; the other runs were stopped.*"
                                                  r"--resume auto$"):
        sbs._check_alive(procs, {}, events, RunBoard(list(procs), quiet=True), "; continue: --resume auto")


def test_a_killed_run_stops_the_others_while_they_still_train(image_data, tmp_path, two_cores, monkeypatch, capfd):
    # the fixmatch run's process is killed (as the kernel's out-of-memory killer does) after its first
    # epoch; the debiaspl run keeps sending a message every step, with many epochs left
    import os
    import time
    handle = RunBoard.handle
    killed = {}

    def kill_fixmatch(self, message):
        handle(self, message)
        if message[1] == "fixmatch" and message[0] == "say" and message[2].startswith("epoch 1 done") and not killed:
            proc = next(p for p in multiprocessing.active_children() if p.name == "dpl-zoo-fixmatch")
            os.kill(proc.pid, signal.SIGKILL)
            killed["at"] = time.monotonic()

    monkeypatch.setattr(RunBoard, "handle", kill_fixmatch)
    rc = _train(image_data, tmp_path, "--methods", ",".join(METHODS), "--quiet", epochs=300)
    stopped_after = time.monotonic() - killed["at"]
    out, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in out + err
    assert [line for line in out.splitlines() if line.startswith("error:")] == [
        "error: the fixmatch run's process was killed by SIGKILL (often: out of memory) before it finished; the "
        "other runs were stopped, each keeps its last checkpoint (written at epoch ends); continue them: the same "
        "command with --set experiment=run --resume auto"]
    # noticed while the survivor still trains (it had 300 epochs to go), not when it finishes; a
    # generous bound, as the cores may be shared (seconds on a quiet machine, 81 s before the fix)
    assert stopped_after < 60, stopped_after
    assert not multiprocessing.active_children()
    survivor = tmp_path / "runs" / "run-debiaspl"
    assert not (survivor / "summary.json").exists()
    assert torch.load(survivor / "last.pth.tar", weights_only=True)["epoch"] < 100


def test_a_child_s_user_error_reaches_the_user_as_its_one_line(monkeypatch):
    # a Hub download that fails: the line comes from the error's cause (the HTTP client's), which
    # does not survive pickling; the child makes the line, the parent raises it as it is
    import pickle
    from requests.exceptions import ConnectionError as ConnectError
    import dpl_zoo.train
    from dpl_zoo.errors import UserError, user_error_line

    def offline(cfg, **kw):
        try:
            raise ConnectError("[Errno -2] Name or service not known")
        except ConnectError as e:
            raise RuntimeError("An error happened while trying to locate the file on the Hub") from e

    monkeypatch.setattr(dpl_zoo.train, "fit", offline)
    sent = []
    events = SimpleNamespace(put=lambda m: sent.append(pickle.loads(pickle.dumps(m))))   # as the queue carries it
    previous = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    try:
        sbs._child("fixmatch", None, None, 1, events)
    finally:
        torch.set_num_threads(threads)
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])
    with pytest.raises(UserError) as raised:
        sbs._take(sent[-1], {}, RunBoard(["fixmatch"], quiet=True))
    assert user_error_line(raised.value) == ("the Hub cannot be reached (ConnectionError: [Errno -2] Name or service "
                                             "not known); check the network or HF_ENDPOINT")
    assert raised.value.__cause__ is None


def test_a_freeze_error_in_every_run_is_one_line(image_data, tmp_path, two_cores, capfd):
    assert _train(image_data, tmp_path, "--methods", ",".join(METHODS), freeze=9) == 2
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: freeze must be backbone or a number of stages")
