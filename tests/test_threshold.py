"""The self-adaptive threshold (FreeMatch's SAT) against hand values, alone and inside DebiasPL."""
import json
import socket

import pytest
import torch

from dpl_zoo.checkpoint import CheckpointError
from dpl_zoo.config import ConfigError
from dpl_zoo.evaluate import pseudo_label_counts
from dpl_zoo.method import DebiasPLLoss, debiased_pseudo_labels
from dpl_zoo.threshold import SelfAdaptiveThreshold
from dpl_zoo.train import fit


def freematch_masks(batches, momentum):
    """FreeMatch's thresholding written from the paper, independently of dpl_zoo: update with the
    batch, then mask ``max p >= g * p~[argmax] / max p~``."""
    c = batches[0].shape[1]
    g, p = torch.tensor(1.0 / c), torch.full((c,), 1.0 / c)
    masks = []
    for probs in batches:
        maxp, idx = probs.max(dim=1)
        g = momentum * g + (1 - momentum) * maxp.mean()
        p = momentum * p + (1 - momentum) * probs.mean(dim=0)
        masks.append((maxp >= g * (p / p.max())[idx]).float())
    return masks


def test_one_step_by_hand():
    sat = SelfAdaptiveThreshold(3, momentum=0.5)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    thresholds = sat.update(probs)
    # g = 0.5/3 + 0.5 * (0.7 + 0.6)/2 = 0.491667;  p~ = 0.5/3 + 0.5 * [0.4, 0.4, 0.2] = [0.366667, 0.366667, 0.266667]
    assert float(sat.global_confidence) == pytest.approx(0.1666667 + 0.325, abs=1e-6)
    assert sat.class_confidence.flatten().tolist() == pytest.approx([0.3666667, 0.3666667, 0.2666667], abs=1e-6)
    g = 0.4916667
    assert thresholds.flatten().tolist() == pytest.approx([g, g, g * 0.2666667 / 0.3666667], abs=1e-6)
    _, targets, mask = debiased_pseudo_labels(torch.log(probs), torch.zeros(1, 3), 0.0, thresholds)
    assert targets.tolist() == [0, 1] and mask.tolist() == [1.0, 1.0]   # 0.7 and 0.6 >= 0.4917


def test_per_class_thresholds_gate_each_pseudo_label_by_its_own_class():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]])
    _, targets, mask = debiased_pseudo_labels(torch.log(probs), torch.zeros(1, 3), 0.0, torch.tensor([[0.5, 0.7, 0.6]]))
    assert targets.tolist() == [0, 1, 2] and mask.tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="2 values for 3 classes"):
        debiased_pseudo_labels(torch.log(probs), torch.zeros(1, 3), 0.0, torch.tensor([0.5, 0.7]))


@pytest.mark.parametrize("views", [1, 2])
def test_tau_zero_with_the_self_adaptive_threshold_is_freematchs_masking(views):
    g = torch.Generator().manual_seed(3)
    n, c, steps = 32, 5, 6
    weak = [[torch.randn(n, c, generator=g) * 2 for _ in range(views)] for _ in range(steps)]
    strong = [[torch.randn(n, c, generator=g) for _ in range(views)] for _ in range(steps)]
    crit = DebiasPLLoss(c, tau=0.0, threshold_mode="self_adaptive", threshold_momentum=0.7)
    means = [torch.softmax(sum(w) / len(w), dim=-1) for w in weak]
    expected = freematch_masks(means, 0.7)
    rates = []
    for w, s, m in zip(weak, strong, expected):
        out = crit(w, s)
        assert torch.equal(out.mask, m)
        rates.append(float(out.mask_rate))
    assert any(0 < r < 1 for r in rates), "thresholds should split some batches, or the test is too weak"


def test_with_tau_the_thresholds_follow_the_debiased_pseudo_labels():
    g = torch.Generator().manual_seed(4)
    weak, strong = torch.randn(16, 4, generator=g) * 2, torch.randn(16, 4, generator=g)
    qhat = torch.tensor([[0.55, 0.25, 0.15, 0.05]])
    crit = DebiasPLLoss(4, tau=1.0, qhat_momentum=0.9, threshold_mode="self_adaptive", threshold_momentum=0.5)
    crit.prior.qhat.copy_(qhat)
    out = crit(weak, strong)
    debiased = torch.softmax(weak - torch.log(qhat), dim=-1)     # the prior from before this step's update
    assert crit.adaptive.class_confidence.flatten().tolist() == pytest.approx(
        (0.5 * 0.25 + 0.5 * debiased.mean(0)).tolist(), abs=1e-6)
    assert float(crit.adaptive.global_confidence) == pytest.approx(
        0.5 * 0.25 + 0.5 * float(debiased.max(1).values.mean()), abs=1e-6)
    expected = freematch_masks([debiased], 0.5)[0]
    assert torch.equal(out.mask, expected) and 0 < out.mask_rate < 1


def test_the_fixed_threshold_is_untouched_and_bad_modes_are_refused():
    assert DebiasPLLoss(4).adaptive is None and DebiasPLLoss(4).current_threshold() == 0.95
    crit = DebiasPLLoss(4, threshold_mode="self_adaptive")
    assert crit.current_threshold().flatten().tolist() == pytest.approx([0.25] * 4)
    with pytest.raises(ValueError, match="threshold_mode must be one of fixed, self_adaptive"):
        DebiasPLLoss(4, threshold_mode="adaptive")
    with pytest.raises(ValueError, match="threshold momentum"):
        SelfAdaptiveThreshold(4, momentum=1.0)


def test_state_round_trip_and_an_empty_batch():
    a = SelfAdaptiveThreshold(3, momentum=0.9)
    a.update(torch.softmax(torch.randn(8, 3), -1))
    b = SelfAdaptiveThreshold(3, momentum=0.9)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.thresholds(), b.thresholds())
    before = a.thresholds().clone()
    a.update(torch.empty(0, 3))
    assert torch.equal(a.thresholds(), before)


def test_diagnostics_count_what_the_current_thresholds_accept():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]))
    counts = pseudo_label_counts(logits, torch.tensor([0, 1, 1]), torch.zeros(1, 3), 0.0,
                                 torch.tensor([[0.5, 0.7, 0.6]]))
    assert counts[:4].tolist() == [2.0, 1.0, 2.0, 3.0]   # accepted, accepted right, right, total


# --- under torch.distributed ------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, batches, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)   # a forked child must not enter the parent's OpenMP pool (it can hang)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sat = SelfAdaptiveThreshold(4, momentum=0.5)
        queue.put((rank, sat.update(batches[rank]).tolist()))
    finally:
        dist.destroy_process_group()


def test_two_processes_hold_the_thresholds_of_their_concatenated_batch():
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(9)
    batches = [torch.softmax(torch.randn(n, 4, generator=g) * 2, -1) for n in (5, 11)]
    ctx = mp.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, batches, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: torch.tensor(t) for rank, t in (queue.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert torch.equal(results[0], results[1])
    single = SelfAdaptiveThreshold(4, momentum=0.5)
    assert torch.allclose(results[0], single.update(torch.cat(batches)), atol=1e-7)


# --- through a run ------------------------------------------------------------------------------

SAT = {"dpl.threshold_mode": "self_adaptive", "dpl.threshold_momentum": 0.9}


def test_a_resumed_self_adaptive_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    from conftest import straight_and_resumed
    straight, resumed, a, b = straight_and_resumed(tiny_config, tmp_path / "runs", **SAT)
    a, b = a["task_state"], b["task_state"]
    assert resumed["resumed"]
    assert set(a["threshold"]) == {"global_confidence", "class_confidence"}
    assert all(torch.equal(a["threshold"][k], b["threshold"][k]) for k in a["threshold"])
    assert float(a["threshold"]["global_confidence"]) != pytest.approx(1 / 3), "the thresholds never moved"
    rows = [json.loads(line) for line in (tmp_path / "runs" / "straight" / "metrics.jsonl").read_text().splitlines()]
    logged = [r["thresholds"] for r in rows if r["kind"] == "train"]
    assert len(logged) == 6 and logged[-1] == straight["thresholds"] == resumed["thresholds"]
    assert straight["threshold_mode"] == "self_adaptive"
    training = json.loads((tmp_path / "runs" / "straight" / "export" / "config.json").read_text())["dpl_zoo"]["training"]
    assert training["threshold_mode"] == "self_adaptive" and training["thresholds"] == straight["thresholds"]


def test_a_resume_that_changes_the_threshold_mode_is_refused(tiny_config, tmp_path):
    fit(tiny_config(epochs=1), quiet=True)
    with pytest.raises(CheckpointError, match="dpl.threshold_mode"):
        fit(tiny_config(epochs=2, **SAT), resume=str(tmp_path / "runs" / "run" / "last.pth.tar"))


def test_a_checkpoint_without_thresholds_is_refused_by_a_self_adaptive_task():
    from dpl_zoo.task import DebiasPLTask
    task = DebiasPLTask(torch.nn.Linear(2, 3), DebiasPLLoss(3, threshold_mode="self_adaptive"))
    with pytest.raises(ValueError, match="no self-adaptive threshold"):
        task.load_task_state({"qhat": torch.full((1, 3), 1 / 3)})


def test_bad_threshold_settings_are_refused(tiny_config):
    with pytest.raises(ConfigError, match="threshold_mode must be one of fixed, self_adaptive.*self_adaptive"):
        tiny_config(**{"dpl.threshold_mode": "self-adaptive"})
    with pytest.raises(ConfigError, match="threshold_momentum"):
        tiny_config(**{"dpl.threshold_momentum": 1.0})
