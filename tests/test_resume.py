"""What a resume may change and what it compares (dpl_zoo.resume), and resumes that used to go wrong."""
import json
import threading

import pytest
import torch

from dpl_zoo.checkpoint import CheckpointError
from dpl_zoo.config import flatten
from dpl_zoo.train import fit

from conftest import as_bmp, make_start_folder, repaint


def _rows(run_dir, kind="train"):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["kind"] == kind]


def test_resume_with_more_epochs_continues_the_schedule_instead_of_training_at_lr_0(tiny_config, tmp_path):
    run = tmp_path / "runs" / "run"
    fit(tiny_config(epochs=2, sched="cosine"), quiet=True)
    (run / "summary.json").unlink()          # as if it had stopped after its last checkpoint
    used = []   # the lr each optimiser step of the resumed run trains at (the log shows it after the update)
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    hook = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: used.append(max(g["lr"] for g in opt.param_groups)))
    try:
        summary = fit(tiny_config(epochs=4, sched="cosine"), resume=str(run / "last.pth.tar"), quiet=True)
    finally:
        hook.remove()
    assert summary["steps"] == 8
    # steps 5..8 only (none retrained from the start), each at the 4-epoch cosine's lr after step t - 1
    assert used == pytest.approx([0.01 * (1 + torch.cos(torch.tensor(torch.pi * t / 8)).item()) / 2
                                  for t in (4, 5, 6, 7)], rel=1e-5)
    assert [r["step"] for r in _rows(run)] == list(range(1, 9))
    lrs = {r["step"]: r["lr"] for r in _rows(run)}
    # the cosine of 4 epochs (8 steps) continues from step 4: lr(t) = 0.01 * (1 + cos(pi t / 8)) / 2 after step t
    for step in (5, 6, 7):
        assert lrs[step] == pytest.approx(0.01 * (1 + torch.cos(torch.tensor(torch.pi * step / 8)).item()) / 2,
                                          rel=1e-5), step
    assert lrs[5] > 0 and lrs[6] > 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
@pytest.mark.parametrize("augment_on", ["workers", "device"])
def test_channels_last_run_cut_off_and_resumed_trains_on_from_its_checkpoint(tiny_config, tmp_path, augment_on,
                                                                             device):
    from dpl_zoo.progress import Reporter
    sets = dict(channels_last=True, epochs=2, device=device, amp=device == "cuda", **{"data.augment_on": augment_on})
    straight = fit(tiny_config(experiment="straight", **sets), quiet=True)

    class CutOff(Reporter):   # the process dies after epoch 0's checkpoint
        def start_epoch(self, epoch, steps):
            if epoch == 1:
                raise KeyboardInterrupt
            super().start_epoch(epoch, steps)
    cfg = tiny_config(experiment="cut", **sets)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, reporter=CutOff(quiet=True))
    run = tmp_path / "runs" / "cut"
    cut = torch.load(run / "last.pth.tar", weights_only=True)
    assert cut["epoch"] == 0
    resumed = fit(cfg, resume=str(run / "last.pth.tar"), quiet=True)
    assert resumed["resumed"] and resumed["steps"] == straight["steps"] == 4
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4]          # epoch 1 trained once, after the resume
    end = torch.load(run / "last.pth.tar", weights_only=True)
    assert end["epoch"] == 1 and not all(torch.equal(end["state_dict"][k], v) for k, v in cut["state_dict"].items())
    if device == "cpu":   # deterministic here: the same weights as the run that was never cut off
        same = torch.load(tmp_path / "runs" / "straight" / "last.pth.tar", weights_only=True)["state_dict"]
        assert all(torch.equal(end["state_dict"][k], v) for k, v in same.items())


def test_auto_resume_of_a_finished_run_with_more_epochs_trains_on(tiny_config, tmp_path):
    first = fit(tiny_config(epochs=2), resume="auto", quiet=True)
    assert first["steps"] == 4
    again = fit(tiny_config(epochs=2), resume="auto", quiet=True)       # finished with this recipe: its summary
    assert again["steps"] == 4 and again["seconds"] == first["seconds"] and not again["resumed"]
    longer = fit(tiny_config(epochs=3), resume="auto", quiet=True)
    assert longer["steps"] == 6 and longer["resumed"]
    assert [r["step"] for r in _rows(tmp_path / "runs" / "run")] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(CheckpointError, match="has trained 3 epochs"):
        fit(tiny_config(epochs=2), resume="auto", quiet=True)


def test_resume_after_a_labeled_csv_run_checks_the_data(tiny_config, image_data, tmp_path):
    from PIL import Image
    import shutil
    first = tiny_config(epochs=1)
    fit(first, quiet=True)
    run = tmp_path / "runs" / "run"
    split = tmp_path / "split.csv"
    shutil.copy(run / "labeled.csv", split)
    shutil.rmtree(run)
    fit(tiny_config(epochs=1, **{"data.labels_per_class": None, "data.labeled_csv": str(split)}), quiet=True)
    (run / "summary.json").unlink()
    # another labeled CSV on the same data: other images labeled, refused
    from dpl_zoo.data import read_split_csv, write_split_csv
    other = tmp_path / "other.csv"
    write_split_csv(other, [i + 1 if (i + 1) % 10 else i - 1 for i in read_split_csv(split)])   # same classes
    assert set(read_split_csv(other)) != set(read_split_csv(split))
    with pytest.raises(CheckpointError, match="labeled split differs"):
        fit(tiny_config(epochs=2, **{"data.labels_per_class": None, "data.labeled_csv": str(other)}),
            resume=str(run / "last.pth.tar"), quiet=True)
    # an image added to the data folder shifts the positions the split file points at
    Image.new("RGB", (16, 16), "red").save(image_data / "train" / "cat" / "000a.png")
    with pytest.raises(CheckpointError, match="training data differ"):
        fit(tiny_config(epochs=2, **{"data.labels_per_class": None, "data.labeled_csv": str(split)}),
            resume=str(run / "last.pth.tar"), quiet=True)


def test_prefetch_thread_leaves_the_process_thread_setting_alone(tiny_config):
    from dpl_zoo.inputs import prefetched_inputs
    from dpl_zoo.run import build_run
    run = build_run(tiny_config(**{"data.augment_on": "device"}))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        list(prefetched_inputs(run, 0))
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert torch.get_num_threads() == 2 and seen == [2]
    finally:
        torch.set_num_threads(saved)


# --- the rules, as a table ---------------------------------------------------------------------------

def _saved(cfg, **evidence):
    from dpl_zoo.resume import DATA_DIGEST_VERSION
    base = {"data": "d", "labeled": "l", "teacher_predictions": None, "unlabeled": "u", "data_digest_version": DATA_DIGEST_VERSION}
    base.update(evidence)
    return {"config": json.loads(json.dumps(cfg.to_dict())), "epoch": 1, "evidence": base}


CONFIG_CASES = [
    # (override on resume, allowed)
    ({"epochs": 5}, True), ({"output": "elsewhere"}, True), ({"workers": 3}, True), ({"log_interval": 7}, True),
    ({"device": "cpu"}, True), ({"compile": True}, True), ({"data.root": "/moved/train"}, True),
    ({"data.verify_images": False}, True), ({"eval_interval": 2}, True),
    ({"lr": 0.5}, False), ({"dpl.tau": 1.0}, False), ({"seed": 3}, False), ({"data.split_seed": 1}, False),
    ({"batch_size": 4}, False), ({"freeze": "backbone"}, False), ({"backbone_lr_scale": 0.1}, False),
    ({"data.cached_views": 2, "freeze": "backbone"}, False), ({"model_ema_warmup": True}, False),
    ({"epochs": 1}, False),   # ends before the epochs already trained
]


def test_cached_views_alone_may_not_change_on_resume(tiny_config, tmp_path):
    """On a frozen backbone, cached views on or off (or another K) train on other inputs (K fixed
    views per image instead of fresh ones at every step): refused, with nothing else changed."""
    from dpl_zoo import resume
    for before, after in ((None, 2), (2, None), (2, 4)):
        saved = _saved(tiny_config(epochs=3, freeze="backbone", **{"data.cached_views": before}))
        with pytest.raises(CheckpointError, match=r"differs in: data\.cached_views\)"):
            resume.check(saved, tiny_config(epochs=3, freeze="backbone", **{"data.cached_views": after}), tmp_path)


@pytest.mark.parametrize("change,allowed", CONFIG_CASES, ids=[",".join(c) for c, _ in CONFIG_CASES])
def test_what_a_resume_may_change(tiny_config, tmp_path, change, allowed):
    from dpl_zoo import resume
    saved = _saved(tiny_config(epochs=3))
    now = tiny_config(**{"epochs": 3, **change})
    if allowed:
        resume.check(saved, now, tmp_path)
    else:
        with pytest.raises(CheckpointError):
            resume.check(saved, now, tmp_path)


def test_a_checkpoint_with_the_older_data_record_is_refused_for_what_it_is(tiny_config, tmp_path):
    """Before content digests a folder was recorded by file names and sizes: such a record cannot
    match, and the refusal says why (not "the data differ"); in-memory data kept its digest."""
    from dpl_zoo import resume
    cfg = tiny_config(epochs=3)
    now = resume.evidence("pixels", [1, 2])

    def older(data):
        saved = _saved(cfg, **{**now, "data": data})
        del saved["evidence"]["data_digest_version"]
        return saved
    resume.check(older("pixels"), cfg, tmp_path, now=now)                    # the same digest: resumes
    with pytest.raises(CheckpointError, match="older dpl-zoo, which recorded a data folder by its file names"):
        resume.check(older("names and sizes"), cfg, tmp_path, now=now)


EVIDENCE_CASES = [("data", "other", "training data differ"), ("labeled", "other", "labeled split differs"),
                  ("teacher_predictions", "abc", "started without data.teacher_predictions"),
                  ("unlabeled", "other", "unlabeled images differ")]


@pytest.mark.parametrize("key,value,message", EVIDENCE_CASES, ids=[k for k, _, _ in EVIDENCE_CASES])
def test_what_a_resume_compares(tiny_config, tmp_path, key, value, message):
    from dpl_zoo import resume
    cfg = tiny_config(epochs=3)
    saved = _saved(cfg)
    now = dict(saved["evidence"])
    resume.check(saved, cfg, tmp_path, now=now)
    now[key] = value
    with pytest.raises(CheckpointError, match=message):
        resume.check(saved, cfg, tmp_path, now=now)
    assert set(resume.EVIDENCE) == {k for k, _, _ in EVIDENCE_CASES}   # every recorded item has a case
    # a checkpoint from before data.unlabeled_csv recorded no unlabeled positions: not compared
    older = {**saved, "evidence": {k: v for k, v in saved["evidence"].items() if k != "unlabeled"}}
    resume.check(older, cfg, tmp_path, now={**saved["evidence"], "unlabeled": "other"})
    from dpl_zoo.config import PretrainConfig
    keys = set(flatten(cfg.to_dict())) | set(flatten(PretrainConfig().to_dict()))
    assert not set(resume.MAY_CHANGE) - keys   # every rule names a real key of a training or pretraining config


# --- the rules on real runs: what changed on disk between a run and its resume -------------------------

def _repaint_an_image(image, start):
    repaint(image)                                               # same file size, other pixels


def _rewrite_the_start_folder(image, start):
    make_start_folder(start, seed=1, mean=(0.6, 0.6, 0.6))      # same path, other weights and preprocessing


DISK_CASES = [
    # (what changes, the refusal's words; None: the resume goes on, on what the run trained with)
    ("an image rewritten at the same size", _repaint_an_image, "training data differ"),
    ("the start folder rewritten", _rewrite_the_start_folder, None),
]


@pytest.mark.parametrize("change,refused", [c[1:] for c in DISK_CASES], ids=[c[0] for c in DISK_CASES])
def test_what_a_resume_does_after_a_change_on_disk(tiny_config, image_data, tmp_path, change, refused):
    start = make_start_folder(tmp_path / "start", seed=0, mean=(0.2, 0.3, 0.4))
    image = as_bmp(image_data / "train" / "cat" / "000.png")
    fit(tiny_config(epochs=1, initial_checkpoint=str(start)), quiet=True)
    last = tmp_path / "runs" / "run" / "last.pth.tar"
    before = last.read_bytes()
    change(image, start)
    if refused:
        with pytest.raises(CheckpointError, match=refused):
            fit(tiny_config(epochs=2, initial_checkpoint=str(start)), resume="auto", quiet=True)
        assert last.read_bytes() == before                           # nothing written
        return
    assert fit(tiny_config(epochs=2, initial_checkpoint=str(start)), resume="auto", quiet=True)["resumed"]
    # the weights come from the checkpoint, and with them the preprocessing they trained with
    assert torch.load(last, weights_only=True)["data_config"]["mean"] == [0.2, 0.3, 0.4]
