"""The DebiasPL core against hand-computed values and against FixMatch."""
import math
import socket

import pytest
import torch
import torch.nn.functional as F

from dpl_zoo.method import (
    ClassPrior, DebiasPLLoss, adaptive_margin, cld_loss, clip_assisted_loss, debiased_pseudo_labels,
)

LN = math.log


def _log(*probs):
    """Logits whose softmax is exactly the given distribution (up to float rounding)."""
    return torch.log(torch.tensor([list(probs)], dtype=torch.float32))


# --- FixMatch equivalence ---------------------------------------------------------------

def fixmatch_reference(lx, y, weak, strong, threshold, lambda_u):
    """FixMatch written independently of dpl_zoo: the target of the tau = 0 case."""
    def targets_of(lw):
        maxp, t = torch.softmax(lw.detach().float(), dim=-1).max(dim=-1)
        return t, maxp.ge(threshold).float()

    sets = [targets_of(sum(weak) / len(weak))] if len(weak) == 1 else \
        [targets_of((weak[0] + weak[1]) / 2), targets_of(weak[0]), targets_of(weak[1])]
    terms = [(F.cross_entropy(s.float(), t, reduction="none") * m).mean() for t, m in sets for s in strong]
    loss_u = torch.stack(terms).mean()
    return F.cross_entropy(lx.float(), y) + lambda_u * loss_u, sets[0][0], sets[0][1]


@pytest.mark.parametrize("views", [1, 2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tau_zero_is_fixmatch_bit_for_bit(views, seed):
    g = torch.Generator().manual_seed(seed)
    n, c = 48, 10
    weak = [torch.randn(n, c, generator=g) * 3 for _ in range(views)]
    strong = [torch.randn(n, c, generator=g) * 3 for _ in range(views)]
    lx, y = torch.randn(8, c, generator=g), torch.randint(0, c, (8,), generator=g)
    crit = DebiasPLLoss(c, tau=0.0, threshold=0.7, qhat_momentum=0.9, lambda_u=3.0)
    # a non-uniform prior must not matter when tau = 0
    crit.prior.qhat.copy_(torch.softmax(torch.randn(1, c, generator=g), dim=-1))
    for _ in range(2):  # also after the prior has moved
        out = crit(weak, strong, lx, y)
        ref_loss, ref_t, ref_m = fixmatch_reference(lx, y, weak, strong, 0.7, 3.0)
        assert torch.equal(out.loss, ref_loss)
        assert torch.equal(out.targets, ref_t)
        assert torch.equal(out.mask, ref_m)
    assert 0 < out.mask_rate < 1, "the threshold should split this batch, or the test is too weak"


def test_tau_positive_differs_from_fixmatch():
    g = torch.Generator().manual_seed(0)
    weak, strong = torch.randn(32, 5, generator=g), torch.randn(32, 5, generator=g)
    crit = DebiasPLLoss(5, tau=0.5, threshold=0.0, qhat_momentum=0.5)
    crit.prior.qhat.copy_(torch.tensor([[0.6, 0.1, 0.1, 0.1, 0.1]]))
    out = crit(weak, strong)
    ref, _, _ = fixmatch_reference(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long), [weak], [strong], 0.0, 1.0)
    assert not torch.equal(out.loss_u, ref - F.cross_entropy(torch.zeros(1, 5), torch.zeros(1, dtype=torch.long)))


# --- hand-computed cases -----------------------------------------------------------------

def test_debiased_probabilities_and_mask():
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    lw = torch.cat([_log(1 / 3, 1 / 3, 1 / 3), _log(0.6, 0.2, 0.2)])  # exp(lw) prop. to [1,1,1] and [3,1,1]
    probs, targets, mask = debiased_pseudo_labels(lw, log_q, tau=1.0, threshold=0.4)
    # exp(lw)/q: [2, 4, 4] -> [0.2, 0.4, 0.4]; [6, 4, 4] -> [3/7, 2/7, 2/7]
    expected = torch.tensor([[0.2, 0.4, 0.4], [3 / 7, 2 / 7, 2 / 7]])
    assert torch.allclose(probs, expected, atol=1e-6)
    assert targets.tolist() == [1, 0]
    assert mask.tolist() == [1.0, 1.0]
    _, _, mask = debiased_pseudo_labels(lw, log_q, tau=1.0, threshold=0.41)
    assert mask.tolist() == [0.0, 1.0]
    # tau = 0.5 uses q ** 0.5: [1/sqrt(.5), 2, 2] normalised
    probs, _, _ = debiased_pseudo_labels(lw[:1], log_q, tau=0.5, threshold=0.0)
    w = torch.tensor([2 ** 0.5, 2.0, 2.0])
    assert torch.allclose(probs, (w / w.sum()).unsqueeze(0), atol=1e-6)


def test_qhat_update_is_a_class_vector():
    prior = ClassPrior(3, momentum=0.5)
    assert torch.allclose(prior.qhat, torch.full((1, 3), 1 / 3))
    prior.update(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    # 0.5 * 1/3 + 0.5 * [0.5, 0.5, 0]; a scalar mean (1/3) would leave qhat uniform
    expected = torch.tensor([[1 / 6 + 1 / 4, 1 / 6 + 1 / 4, 1 / 6]])
    assert prior.qhat.shape == (1, 3)
    assert torch.allclose(prior.qhat, expected, atol=1e-7)
    assert math.isclose(prior.qhat.sum().item(), 1.0, abs_tol=1e-6)


def test_masked_qhat_and_empty_mask():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    prior = ClassPrior(3, momentum=0.5, masked=True)
    prior.update(probs, torch.tensor([1.0, 0.0, 1.0]))
    expected = torch.tensor([[1 / 6 + 0.225, 1 / 6 + 0.1, 1 / 6 + 0.175]])  # masked mean [.45, .2, .35]
    assert torch.allclose(prior.qhat, expected, atol=1e-7)
    before = prior.qhat.clone()
    prior.update(probs, torch.zeros(3))
    assert torch.equal(prior.qhat, before)
    assert torch.isfinite(prior.qhat).all()
    with pytest.raises(ValueError, match="mask"):
        prior.update(probs)


def test_update_order_pseudo_labels_before_margin_after():
    # momentum 0: the updated prior is exactly softmax(lw) = [2.4, 1, 1] / 4.4
    crit = DebiasPLLoss(3, tau=1.0, threshold=0.35, qhat_momentum=0.0)
    crit.prior.qhat.copy_(torch.tensor([[0.5, 0.25, 0.25]]))
    lw = torch.log(torch.tensor([[2.4, 1.0, 1.0]]))
    out = crit(lw, torch.zeros(1, 3))
    # with the old prior: exp(lw)/q = [4.8, 4, 4] -> max 0.375 >= 0.35, target 0.
    # (with the updated prior the debiased distribution would be uniform: mask 0.)
    assert out.targets.tolist() == [0] and out.mask.tolist() == [1.0]
    assert torch.allclose(out.qhat, torch.tensor([[2.4 / 4.4, 1 / 4.4, 1 / 4.4]]), atol=1e-6)
    # margin with the updated prior: CE(log q1, 0) = -log(2.4 / 4.4); the old prior gives -log 0.5
    assert math.isclose(out.loss_u.item(), LN(4.4 / 2.4), rel_tol=1e-5)


def test_adaptive_margin():
    log_q = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    out = adaptive_margin(torch.tensor([[1.0, 2.0, 3.0]]), log_q, tau=0.5)
    expected = torch.tensor([[1 + 0.5 * LN(0.5), 2 + 0.5 * LN(0.25), 3 + 0.5 * LN(0.25)]])
    assert torch.allclose(out, expected, atol=1e-6)
    # tau = 0 returns the logits unchanged, bit for bit, even with a zero prior entry
    ls = torch.randn(4, 3)
    assert torch.equal(adaptive_margin(ls, torch.log(torch.tensor([[1.0, 0.0, 0.0]])), 0.0), ls)


def test_cld_loss_argmin_groups_and_empty_group():
    weak = torch.cat([_log(0.6, 0.3, 0.1), _log(0.2, 0.5, 0.3)])  # argmin groups: 2 and 0; group 1 empty
    strong = torch.cat([_log(0.5, 0.25, 0.25), _log(1 / 3, 1 / 3, 1 / 3)])
    # centroids: g0 = [.2,.5,.3], g1 = 0 (empty, count 1), g2 = [.6,.3,.1]
    # affinities / 0.07: row a [.3, 0, .4], row b [1/3, 0, 1/3]
    rows = [([0.3, 0.0, 0.4], 2), ([1 / 3, 0.0, 1 / 3], 0)]
    expected = sum(LN(sum(math.exp(a / 0.07) for a in aff)) - aff[t] / 0.07 for aff, t in rows) / 2
    assert math.isclose(cld_loss(strong, weak).item(), expected, rel_tol=1e-5)


def test_clip_assisted_term_only_where_mask_is_zero():
    strong = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.5]])
    mask = torch.tensor([1.0, 0.0, 0.0])
    loss, clip_mask = clip_assisted_loss(strong, mask, torch.tensor([1, 2, 0]), torch.tensor([0.9, 0.3, 0.5]), 0.4)
    assert clip_mask.tolist() == [0.0, 0.0, 1.0]
    # only sample 2 contributes: CE([0, 0, .5], 0) = log(2 + e^.5) - 0, averaged over 3 samples
    assert math.isclose(loss.item(), LN(2 + math.exp(0.5)) / 3, rel_tol=1e-6)


def test_clip_assisted_unlabeled_loss_is_the_average_of_both_terms():
    g = torch.Generator().manual_seed(3)
    weak, strong = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    ct, cc = torch.randint(0, 4, (16,), generator=g), torch.rand(16, generator=g)
    plain = DebiasPLLoss(4, tau=0.4, threshold=0.6, qhat_momentum=0.9)(weak, strong)
    crit = DebiasPLLoss(4, tau=0.4, threshold=0.6, qhat_momentum=0.9)
    out = crit(weak, strong, clip_targets=ct, clip_confidence=cc)
    assert out.loss_clip > 0
    assert torch.allclose(out.loss_u, (plain.loss_u + out.loss_clip) / 2)


def test_cld_term_enters_total_loss():
    g = torch.Generator().manual_seed(4)
    weak, strong = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    out = DebiasPLLoss(4, tau=0.4, threshold=0.5, lambda_cld=0.3, lambda_u=2.0)(weak, strong)
    prior = ClassPrior(4, momentum=0.999)
    prior.update(torch.softmax(weak, -1))
    expected_cld = cld_loss(adaptive_margin(strong, prior.log_prior(), 0.4), weak)  # single view: margin-adjusted
    assert torch.allclose(out.loss_cld, expected_cld)
    assert torch.allclose(out.loss, 2.0 * out.loss_u + 0.3 * out.loss_cld)


def test_components_switch_off_separately():
    g = torch.Generator().manual_seed(5)
    weak, strong = torch.randn(16, 4, generator=g), torch.randn(16, 4, generator=g)
    q = torch.tensor([[0.7, 0.1, 0.1, 0.1]])

    def run(**kw):
        crit = DebiasPLLoss(4, threshold=0.0, qhat_momentum=0.5, **kw)
        crit.prior.qhat.copy_(q)
        return crit(weak, strong)

    only_margin = run(tau=0.5, debias=False)
    only_pl = run(tau=0.5, margin=False)
    assert torch.equal(only_margin.loss_u, run(tau=0.0, tau_margin=0.5).loss_u)
    assert torch.equal(only_pl.loss_u, run(tau=0.0, tau_pl=0.5).loss_u)
    assert not torch.equal(only_margin.loss_u, only_pl.loss_u)
    assert not torch.equal(only_pl.targets, run(tau=0.0).targets)


def test_structured_output_histogram():
    lw = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 0, 0]])
    out = DebiasPLLoss(3, tau=0.0, threshold=0.9)(lw, torch.zeros(4, 3))
    assert out.histogram.tolist() == [2, 0, 1]
    assert out.mask_rate.item() == 0.75
    assert set(out.scalars()) == {"loss", "loss_x", "loss_u", "loss_cld", "loss_clip", "mask_rate"}


# --- gradients, dtypes, state ---------------------------------------------------------------

@pytest.mark.parametrize("views", [1, 2])
def test_gradient_reaches_student_not_teacher(views):
    g = torch.Generator().manual_seed(6)
    weak = [torch.randn(8, 4, generator=g, requires_grad=True) for _ in range(views)]
    strong = [torch.randn(8, 4, generator=g, requires_grad=True) for _ in range(views)]
    lx = torch.randn(4, 4, generator=g, requires_grad=True)
    out = DebiasPLLoss(4, tau=0.4, threshold=0.0, lambda_cld=0.3)(weak, strong, lx, torch.tensor([0, 1, 2, 3]))
    out.loss.backward()
    assert all(w.grad is None for w in weak)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in strong)
    assert lx.grad is not None and lx.grad.abs().sum() > 0


def test_low_precision_logits_computed_in_float32():
    g = torch.Generator().manual_seed(7)
    weak = torch.randn(8, 4, generator=g).bfloat16()
    strong = torch.randn(8, 4, generator=g).bfloat16()
    out = DebiasPLLoss(4, tau=0.4, threshold=0.0)(weak, strong)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.qhat.dtype == torch.float32


def test_qhat_state_dict_round_trip():
    crit = DebiasPLLoss(5, tau=0.4, qhat_momentum=0.9)
    crit(torch.randn(8, 5), torch.randn(8, 5))
    state = crit.state_dict()
    assert "prior.qhat" in state
    fresh = DebiasPLLoss(5, tau=0.4, qhat_momentum=0.9)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.prior.qhat, crit.prior.qhat)


# --- distributed ------------------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port, batches, masked, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        prior = ClassPrior(4, momentum=0.5, masked=masked)
        probs, mask = batches[rank]
        prior.update(probs, mask)
        queue.put((rank, prior.qhat.tolist()))  # plain floats: a shared tensor would die with this process
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("masked", [False, True])
def test_all_reduced_qhat_equals_concatenated_batch(masked):
    import torch.multiprocessing as mp
    g = torch.Generator().manual_seed(8)
    # unequal batch sizes: averaging the two batch means would be wrong here
    batches = [(torch.softmax(torch.randn(n, 4, generator=g), -1), (torch.rand(n, generator=g) > 0.4).float())
               for n in (6, 10)]
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, batches, masked, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {rank: torch.tensor(q, dtype=torch.float32) for rank, q in (queue.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert torch.equal(results[0], results[1])
    single = ClassPrior(4, momentum=0.5, masked=masked)
    single.update(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    assert torch.allclose(results[0], single.qhat, atol=1e-7)


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, name", [
    (dict(tau=-0.1), "tau"),
    (dict(tau_margin=-1.0), "tau_margin"),
    (dict(threshold=1.5), "threshold"),
    (dict(threshold=-0.1), "threshold"),
    (dict(qhat_momentum=1.0), "momentum"),
    (dict(qhat_momentum=-0.5), "momentum"),
    (dict(tau=float("nan")), "tau"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DebiasPLLoss(4, **kwargs)


def test_bad_shapes_name_the_argument():
    crit = DebiasPLLoss(4)
    with pytest.raises(ValueError, match="weak_logits and strong_logits"):
        crit(torch.randn(8, 4), torch.randn(6, 4))
    with pytest.raises(ValueError, match="classes but the class prior has 4"):
        crit(torch.randn(8, 5), torch.randn(8, 5))
    with pytest.raises(ValueError, match="weak_logits"):
        crit(torch.randn(8), torch.randn(8))
    with pytest.raises(ValueError, match="labels"):
        crit(torch.randn(8, 4), torch.randn(8, 4), torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="two of each"):
        crit([torch.randn(8, 4)] * 2, [torch.randn(8, 4)])
    with pytest.raises(ValueError, match="clip_targets"):
        crit(torch.randn(8, 4), torch.randn(8, 4), clip_targets=torch.zeros(3, dtype=torch.long),
             clip_confidence=torch.ones(3))
    with pytest.raises(ValueError, match="probs"):
        ClassPrior(4).update(torch.rand(3, 5))


# --- target prior (debiasing towards the data's own class distribution) ----------------------

@pytest.mark.parametrize("views", [1, 2])
def test_uniform_target_prior_changes_nothing_bit_for_bit(views):
    g = torch.Generator().manual_seed(7)
    n, c = 32, 6
    weak = [torch.randn(n, c, generator=g) * 3 for _ in range(views)]
    strong = [torch.randn(n, c, generator=g) * 3 for _ in range(views)]
    lx, y = torch.randn(8, c, generator=g), torch.randint(0, c, (8,), generator=g)
    outs = []
    for target in (None, [1.0] * c, [0.25] * c):
        crit = DebiasPLLoss(c, tau=0.7, threshold=0.5, qhat_momentum=0.9, lambda_cld=0.2, target_prior=target)
        crit.prior.qhat.copy_(torch.softmax(torch.randn(1, c, generator=torch.Generator().manual_seed(1)), -1))
        outs.append([crit(weak, strong, lx, y) for _ in range(3)])  # three steps: qhat evolves
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            for name in ("loss", "loss_u", "loss_cld", "targets", "mask", "qhat"):
                assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_target_prior_hand_computed():
    # qhat = [0.5, 0.25, 0.25], p* = [0.5, 0.25, 0.25]: log qhat - log p* = 0 -> no adjustment at all
    crit = DebiasPLLoss(3, tau=1.0, threshold=0.0, qhat_momentum=0.0, target_prior=[2, 1, 1])
    assert torch.allclose(crit.prior.target, torch.tensor([[0.5, 0.25, 0.25]]))
    crit.prior.qhat.copy_(torch.tensor([[0.5, 0.25, 0.25]]))
    lw = torch.log(torch.tensor([[0.4, 0.35, 0.25]]))
    out = crit(lw, lw.clone())
    assert out.targets.tolist() == [0]  # uniform target would give exp(lw)/q = [0.8, 1.4, 1.0] -> class 1
    # p* = [0.25, 0.5, 0.25] with qhat [0.5, 0.25, 0.25]: exp(lw) * p*/q = [0.2, 0.7, 0.25] -> [.1739, .6087, .2174]
    prior = ClassPrior(3, target=[1, 2, 1])
    prior.qhat.copy_(torch.tensor([[0.5, 0.25, 0.25]]))
    probs, targets, _ = debiased_pseudo_labels(lw, prior.log_ratio(), tau=1.0, threshold=0.0)
    assert torch.allclose(probs, torch.tensor([[0.2, 0.7, 0.25]]) / 1.15, atol=1e-6) and targets.tolist() == [1]
    # margin: ls + tau * (log qhat - log p*)
    ls = torch.tensor([[1.0, 2.0, 3.0]])
    expected = ls + torch.log(torch.tensor([[2.0, 0.5, 1.0]]))
    assert torch.allclose(adaptive_margin(ls, prior.log_ratio(), 1.0), expected, atol=1e-6)


def test_target_prior_state_round_trip_and_errors():
    crit = DebiasPLLoss(3, target_prior=[3, 1, 1])
    fresh = DebiasPLLoss(3)
    assert fresh.prior.uniform_target
    fresh.load_state_dict(crit.state_dict())
    assert not fresh.prior.uniform_target and torch.allclose(fresh.prior.target, torch.tensor([[0.6, 0.2, 0.2]]))
    assert torch.equal(fresh.prior.log_ratio(), crit.prior.log_ratio())
    for bad in ([1, 2], [1, 0, 1], [1, float("nan"), 1]):
        with pytest.raises(ValueError, match="3 positive numbers"):
            DebiasPLLoss(3, target_prior=bad)
