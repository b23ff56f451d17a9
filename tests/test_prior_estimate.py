"""`dpl.target_prior: estimated`: the estimator on tensors (hand-computed step, EM's fixed point,
not an echo of the pseudo-labels, edges), then through a run (state, resume, logs, export, card)."""
import json

import numpy as np
import pytest
import torch

from dpl_zoo.checkpoint import CheckpointError
from dpl_zoo.config import ConfigError, load_config
from dpl_zoo.prior_estimate import PriorEstimator
from dpl_zoo.train import fit


def tv(a, b) -> float:
    return 0.5 * float((torch.as_tensor(a).flatten() - torch.as_tensor(b).flatten()).abs().sum())


def test_one_step_by_hand():
    """C = 2, D = 1: the probe's SGD step, the pseudo-label counts and the EM step, computed here."""
    est = PriorEstimator(2, 1, labeled_prior=[0.75, 0.25], start="labeled", momentum=0.5, warmup=0,
                         min_accepted=1, lr=0.1, weight_decay=0.0, probe_momentum=0.9, lambda_u=2.0)
    fl, y = torch.tensor([[1.0], [-1.0]]), torch.tensor([0, 1])
    fu, t, m = torch.tensor([[2.0], [0.5]]), torch.tensor([0, 0]), torch.tensor([1.0, 0.0])
    est.step(fl, y, fu, t, m)
    # probe is zero: labeled softmax(0 + log[.75, .25]) = [.75, .25] for both rows
    g_l = np.array([[0.75 - 1, 0.25], [0.75, 0.25 - 1]])
    # pseudo-label prior before the update: no counts -> [1/2, 1/2] (half counts each); one accepted row
    g_u = np.array([[0.5 - 1, 0.5], [0.0, 0.0]])
    # one mean over every row the probe saw: 2 labeled + 2 unlabeled (a rejected one counts as zero)
    gw = (g_l.T @ np.array([[1.0], [-1.0]]) + 2.0 * (g_u.T @ np.array([[2.0], [0.5]]))) / 4
    gb = (g_l.sum(0) + 2.0 * g_u.sum(0)) / 4
    assert est.weight.numpy() == pytest.approx(-0.1 * gw, abs=1e-6)
    assert est.bias.numpy() == pytest.approx(-0.1 * gb, abs=1e-6)
    assert est.pl_counts.tolist() == [1.0, 0.0] and int(est.accepted) == 1
    # EM with the probe before its update (zero): softmax(log pi) = pi, so pi stays the labeled prior
    assert est.prior.flatten().tolist() == pytest.approx([0.75, 0.25])
    # a second step: EM moves pi halfway (momentum 0.5) to the mean of softmax(g(x) + log pi)
    w, b, pi = est.weight.clone(), est.bias.clone(), est.prior.clone()
    est.step(fl, y, fu, t, m)
    post = torch.softmax(fu @ w.t() + b + pi.log(), -1).mean(0)
    assert est.prior.flatten() == pytest.approx((0.5 * pi.flatten() + 0.5 * post).tolist(), abs=1e-6)
    assert bool(est.ready())


def _blobs(n_per_class, rng, dim=8, sep=2.5):
    """Gaussian classes with a known mean each: features a linear probe separates, but not perfectly."""
    means = np.eye(len(n_per_class), dim) * sep
    x = np.concatenate([rng.normal(means[c], 1.0, size=(n, dim)) for c, n in enumerate(n_per_class)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(n_per_class)])
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y)


def _train(est, labeled, unlabeled, steps, rng, pl_of=None, bl=16, bu=64):
    (xl, yl), (xu, yu) = labeled, unlabeled
    for _ in range(steps):
        i = torch.as_tensor(rng.choice(len(xl), bl))
        j = torch.as_tensor(rng.choice(len(xu), bu))
        t, m = pl_of(xu[j], yu[j]) if pl_of else (yu[j], torch.zeros(bu))
        est.step(xl[i], yl[i], xu[j], t, m)


def test_em_finds_a_reversed_unlabeled_prior_from_the_labels_alone():
    """Labeled long-tailed one way, unlabeled the other: no pseudo-label is accepted, so only the
    labels anchor the probe; EM reaches the unlabeled profile, not the labeled one."""
    rng = np.random.default_rng(0)
    labeled, unlabeled = _blobs([60, 30, 12], rng), _blobs([120, 300, 600], rng)
    truth = torch.tensor([120, 300, 600]) / 1020.0
    lab = torch.tensor([60, 30, 12]) / 102.0
    est = PriorEstimator(3, 8, lab, start="labeled", momentum=0.98, warmup=100, lr=0.1, min_accepted=0)
    _train(est, labeled, unlabeled, 600, rng)
    assert tv(est.prior, truth) < 0.03 and tv(lab, truth) > 0.4


def test_the_estimate_is_not_an_echo_of_biased_pseudo_labels():
    """Pseudo-labels that over-predict class 0 (what DebiasPL corrects): the probe is anchored by
    the labels and its pseudo-label loss is adjusted by their own histogram, so the estimate stays
    near the true prior instead of following them."""
    rng = np.random.default_rng(1)
    labeled, unlabeled = _blobs([20, 20, 20], rng), _blobs([200, 400, 400], rng)
    truth = torch.tensor([0.2, 0.4, 0.4])

    means = torch.eye(3, 8) * 2.5

    def biased(x, y):   # a classifier whose boundary leans towards class 0, as a biased model's does
        scores = x @ means.t() + torch.tensor([2.0, 0.0, 0.0])
        return scores.argmax(1), torch.ones(len(y))
    est = PriorEstimator(3, 8, [1 / 3] * 3, momentum=0.98, warmup=100, lr=0.1)
    _train(est, labeled, unlabeled, 600, rng, pl_of=biased)
    hist = torch.bincount(biased(*unlabeled)[0], minlength=3) / len(unlabeled[1])
    assert tv(hist, truth) > 0.075                  # the echo would be this far off
    assert tv(est.prior, truth) < 0.065             # (measured 0.059: the biased pseudo-labels pull a little)


def test_pseudo_labels_train_a_balanced_probe_so_em_does_not_count_the_prior_twice():
    """Correct pseudo-labels on an imbalanced pool, no labels: adjusted by their own histogram the
    probe stays balanced and EM lands on the pool's prior; unadjusted, the probe would carry the
    prior and EM would add it again (measured: TV 0.32, towards the largest class)."""
    rng = np.random.default_rng(6)
    (xu, yu), truth = _blobs([100, 300, 600], rng, sep=1.0), torch.tensor([0.1, 0.3, 0.6])
    est = PriorEstimator(3, 8, [1 / 3] * 3, momentum=0.98, warmup=100, lr=0.03)
    for _ in range(1500):
        j = torch.as_tensor(rng.choice(len(xu), 64))
        est.step(xu[:0], yu[:0], xu[j], yu[j], torch.ones(64))
    assert tv(est.prior, truth) < 0.03


def test_start_prior_until_the_estimate_is_formed_then_the_estimate():
    est = PriorEstimator(2, 1, [0.9, 0.1], start="labeled", warmup=2, min_accepted=5, momentum=0.5)
    f = torch.ones(4, 1)
    est.step(f, torch.tensor([0, 0, 0, 1]), f, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 1, 0, 0]))
    assert not bool(est.ready()) and est.target().flatten().tolist() == pytest.approx([0.9, 0.1])
    est.step(f, torch.tensor([0, 0, 0, 1]), f, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 1, 0, 0]))
    assert not bool(est.ready())     # 2 steps, but only 4 accepted of 5
    est.step(f, torch.tensor([0, 0, 0, 1]), f, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, 0, 0, 0]))
    assert bool(est.ready()) and torch.equal(est.target(), est.prior)


def test_a_class_never_pseudo_labeled_and_a_class_without_labels_keep_finite_shares():
    rng = np.random.default_rng(2)
    # class 2 has no labels (a half count in the labeled prior) and is never pseudo-labeled
    est = PriorEstimator(3, 8, [10, 10, 0.5], momentum=0.9, warmup=5, min_share=1e-3, lr=0.1)
    labeled = _blobs([30, 30, 0], rng)
    unlabeled = _blobs([100, 100, 100], rng)
    _train(est, labeled, unlabeled, 100, rng, pl_of=lambda x, y: (torch.where(y == 2, 0, y), (y != 2).float()))
    p = est.prior.flatten()
    assert bool(torch.isfinite(p).all()) and float(p.min()) >= 1e-3 * 0.99 and float(p.sum()) == pytest.approx(1.0)
    assert bool(torch.isfinite(est.pseudo_label_log_prior()).all())


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_classes"):
        PriorEstimator(1, 4, [1.0])
    with pytest.raises(ValueError, match="labeled_prior"):
        PriorEstimator(3, 4, [1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="start"):
        PriorEstimator(2, 4, [1, 1], start="estimated")
    est = PriorEstimator(2, 4, [1, 1])
    with pytest.raises(ValueError, match="N x 4"):
        est.step(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, 4),
                 torch.zeros(2, dtype=torch.long), torch.zeros(2))


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(3)
    labeled, unlabeled = _blobs([10, 20], rng), _blobs([50, 50], rng)
    a = PriorEstimator(2, 8, [1, 2], warmup=3, min_accepted=0)
    _train(a, labeled, unlabeled, 5, np.random.default_rng(4))
    b = PriorEstimator(2, 8, [1, 2], warmup=3, min_accepted=0)
    b.load_state_dict(a.state_dict())
    _train(a, labeled, unlabeled, 4, np.random.default_rng(5))
    _train(b, labeled, unlabeled, 4, np.random.default_rng(5))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --- through a run ------------------------------------------------------------------------------------

ESTIMATED = {"dpl.target_prior": "estimated", "dpl.estimate_warmup": 1, "dpl.estimate_min_accepted": 0,
             "dpl.threshold": 0.0}


def test_a_run_estimates_logs_saves_exports_and_cards_the_prior(tiny_config, tmp_path):
    from dpl_zoo.hub import card_from_run, model_card
    summary = fit(tiny_config(**ESTIMATED), quiet=True)
    run_dir = tmp_path / "runs" / "run"
    assert summary["target_prior_mode"] == "estimated" and summary["estimate_in_use"] is True
    assert summary["prior_estimate"] == pytest.approx(summary["target_prior"], abs=1e-5)
    assert sum(summary["prior_estimate"]) == pytest.approx(1.0, abs=1e-4)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert len(train_rows) == 4 and all(len(r["prior_estimate"]) == 3 for r in train_rows)
    assert [r["estimate_steps"] for r in train_rows] == [1, 2, 3, 4]
    state = torch.load(run_dir / "last.pth.tar", weights_only=True)["task_state"]
    assert torch.allclose(state["prior_estimate"]["prior"], state["target_prior"])
    training = json.loads((run_dir / "export" / "config.json").read_text())["dpl_zoo"]["training"]
    assert training["target_prior"] == "estimated" and training["prior_estimate"] == summary["prior_estimate"]
    card = str(model_card(card_from_run(run_dir, "me/model")))
    assert "estimated during training" in card and f"{summary['prior_estimate'][0]:.3f}" in card


def test_a_resumed_estimating_run_equals_an_uninterrupted_one(tiny_config, tmp_path):
    from conftest import straight_and_resumed
    straight, resumed, a, b = straight_and_resumed(tiny_config, tmp_path / "runs", **ESTIMATED)
    assert resumed["resumed"] and resumed["prior_estimate"] == straight["prior_estimate"]
    a, b = a["task_state"], b["task_state"]
    assert all(torch.equal(a["prior_estimate"][k], b["prior_estimate"][k]) for k in a["prior_estimate"])


@pytest.mark.parametrize("before,after", [("estimated", "uniform"), ("labeled", "estimated")])
def test_a_resume_that_changes_the_target_prior_is_refused(tiny_config, tmp_path, before, after):
    fit(tiny_config(epochs=1, **{**ESTIMATED, "dpl.target_prior": before}), quiet=True)
    with pytest.raises(CheckpointError, match="dpl.target_prior"):
        fit(tiny_config(epochs=2, **{**ESTIMATED, "dpl.target_prior": after}),
            resume=str(tmp_path / "runs" / "run" / "last.pth.tar"))


def test_two_classes_and_a_fallback_that_says_so(tiny_config, tmp_path, image_data, capsys):
    """Two classes; an estimate that cannot form (no pseudo-label passes the threshold) keeps the
    start prior and the log says so."""
    from conftest import make_image_folder
    make_image_folder(tmp_path / "two" / "train", classes=("a", "b"), per_class=10)
    make_image_folder(tmp_path / "two" / "val", classes=("a", "b"), per_class=2, seed=1)
    cfg = tiny_config(**{**ESTIMATED, "dpl.threshold": 1.0, "dpl.estimate_min_accepted": 5,
                         "data.root": str(tmp_path / "two" / "train"), "dpl.estimate_start": "labeled"})
    summary = fit(cfg)
    assert summary["classes"] == 2 and summary["estimate_in_use"] is False
    assert summary["target_prior"] == pytest.approx([0.5, 0.5])   # labels_per_class 2: the labeled prior
    assert "not formed yet, debiasing towards the start prior (labeled)" in capsys.readouterr().out


def test_only_debiaspl_estimates_and_bad_settings_are_refused(tiny_config):
    from dpl_zoo.run import build_run
    for method in ("fixmatch", "supervised"):
        run = build_run(tiny_config(**{**ESTIMATED, "dpl.method": method}))
        assert run.task.prior_estimator is None
    with pytest.raises(ConfigError, match="estimate_start"):
        tiny_config(**{**ESTIMATED, "dpl.estimate_start": "estimated"})
    with pytest.raises(ConfigError, match="estimate_momentum"):
        tiny_config(**{**ESTIMATED, "dpl.estimate_momentum": 1.0})
    with pytest.raises(ConfigError, match="neither uniform, labeled, estimated"):
        tiny_config(**{"dpl.target_prior": "estimate"})


def test_dpl_zoo_plot_draws_the_estimate_over_steps(tiny_config, tmp_path):
    pytest.importorskip("matplotlib")
    from dpl_zoo.plot import plot_runs, read_run
    fit(tiny_config(**ESTIMATED), quiet=True)
    run = read_run(tmp_path / "runs" / "run")
    assert [s for s, _ in run["estimates"]] == [1, 2, 3, 4] and len(run["estimates"][0][1]) == 3
    out = plot_runs([tmp_path / "runs" / "run"], tmp_path / "p.png")
    assert out.stat().st_size > 1000
