"""MoCo v2 with EMAN: the loss by hand, the queue, the key encoder's BatchNorm update, kNN, the views."""
import math

import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF

from dpl_zoo import moco_views as mv
from dpl_zoo.moco import KeyQueue, MoCoEncoder, info_nce_logits, moco_loss, weighted_knn
from dpl_zoo.task import MoCoTask


def _unit(rows):
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def test_moco_loss_matches_a_hand_computation():
    q = _unit([[1.0, 0.0], [0.6, 0.8]])
    k = _unit([[0.8, 0.6], [0.0, 1.0]])
    queue = _unit([[1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    t = 0.2
    loss, logits = moco_loss(q, k, queue, t)
    expected_rows, expected_loss = [], 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        dots = [sum(a * b for a, b in zip(qi, ki))] + [sum(a * b for a, b in zip(qi, n)) for n in queue.tolist()]
        row = [d / t for d in dots]
        expected_rows.append(row)
        expected_loss += -row[0] + math.log(sum(math.exp(v) for v in row))   # -log softmax(row)[positive]
    assert logits.shape == (2, 4)
    assert torch.allclose(logits, torch.tensor(expected_rows), atol=1e-5)
    assert loss.item() == pytest.approx(expected_loss / 2, abs=1e-5)
    # the keys and the queue carry no gradient: only the query learns
    q.requires_grad_(True)
    k.requires_grad_(True)
    moco_loss(q, k, queue, t)[0].backward()
    assert q.grad is not None and k.grad is None
    assert torch.equal(info_nce_logits(q, k, queue, t), logits)


def test_queue_is_first_in_first_out_and_resumes_from_its_state():
    queue = KeyQueue(5, 2, generator=torch.Generator().manual_seed(0))
    assert queue.keys.shape == (5, 2) and torch.allclose(queue.keys.norm(dim=1), torch.ones(5))
    first = _unit([[1, 0], [0, 1], [1, 1]])
    queue.enqueue(first)
    assert torch.equal(queue.keys[:3], first) and queue.ptr.item() == 3
    second = _unit([[2, 1], [1, 2], [3, 1]])
    kept = queue.keys[3:].clone()
    queue.enqueue(second)                      # wraps around: rows 3, 4, then 0
    assert torch.equal(queue.keys[3:], second[:2]) and torch.equal(queue.keys[0], second[2])
    assert torch.equal(queue.keys[1:3], first[1:]) and queue.ptr.item() == 1
    assert not any(torch.equal(queue.keys[i], kept[0]) for i in range(5))   # the oldest keys went first
    snap = queue.snapshot()
    queue.enqueue(_unit([[1, 3]]))
    assert not torch.equal(snap, queue.keys)   # a snapshot is a copy: the loss never sees later writes
    restored = KeyQueue(5, 2)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.keys, queue.keys) and restored.ptr.item() == queue.ptr.item() == 2
    restored.enqueue(_unit([[1, 0]] * 7))      # longer than the queue: the last 5 fill it
    assert torch.equal(restored.keys, _unit([[1, 0]] * 5)) and restored.ptr.item() == 4


class _TinyBackbone(nn.Module):
    num_features = 4

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).relu().mean((2, 3))


def test_eman_key_encoder_averages_parameters_and_batchnorm_statistics():
    torch.manual_seed(0)
    m = 0.9
    task = MoCoTask(MoCoEncoder(_TinyBackbone(), dim=3, hidden=5), queue_size=8, dim=3, temperature=0.2, momentum=m)
    opt = torch.optim.SGD(task.trainable_module.parameters(), lr=0.5)
    task.train()
    query, key = task.trainable_module, task.key_encoder()
    assert query.training and not key.training            # EMAN: the key encoder runs in eval mode
    before = {k: v.clone() for k, v in key.state_dict().items()}
    x = torch.randn(6, 3, 8, 8)
    out = task(x, x.flip(3))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert torch.equal(key.state_dict()["backbone.bn.running_mean"], before["backbone.bn.running_mean"])
    task.update_ema()
    after, student = key.state_dict(), query.state_dict()
    assert not torch.equal(student["backbone.bn.running_mean"], before["backbone.bn.running_mean"])
    for name in ("backbone.bn.running_mean", "backbone.bn.running_var", "backbone.conv.weight", "head.2.weight"):
        assert torch.allclose(after[name], m * before[name] + (1 - m) * student[name], atol=1e-6), name
    assert after["backbone.bn.num_batches_tracked"].item() == student["backbone.bn.num_batches_tracked"].item() == 1
    # in eval mode a key depends on its own image only, not on the batch it came in
    one = key(x[:1])
    assert torch.allclose(one, key(torch.cat([x[:1], 5 * x[1:]]))[:1], atol=1e-6)
    # the loss is InfoNCE of the query against the key encoder's keys and the queue before them
    queue_before = task.queue.snapshot()
    out = task(x, x)
    with torch.no_grad():
        expected, _ = moco_loss(query(x), key(x), queue_before, 0.2)
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    keys = key(x)   # the second batch of 6 keys in a queue of 8: rows 6, 7, then 0 to 3
    assert torch.allclose(task.queue.keys[6:], keys[:2], atol=1e-6) and torch.allclose(task.queue.keys[:4], keys[2:],
                                                                                         atol=1e-6)
    assert task.queue.ptr.item() == 4


def test_weighted_knn_votes_by_similarity():
    bank = _unit([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [-1, 0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    queries = _unit([[1, 0.05], [0.05, 1], [-1, 0.1]])
    assert weighted_knn(bank, labels, queries, 3, k=2).tolist() == [0, 1, 2]
    # with every neighbour voting, the close ones still win: weights exp(sim / 0.07)
    assert weighted_knn(bank, labels, queries, 3, k=5).tolist() == [0, 1, 2]
    # a tie of one near vote against two far ones goes to the near one
    assert weighted_knn(_unit([[1, 0], [0, 1], [0, 1]]), torch.tensor([0, 1, 1]), _unit([[1, 0.2]]), 2, k=3).item() == 0


# --- the views --------------------------------------------------------------------------------------

@pytest.fixture
def images():
    return torch.randint(0, 256, (4, 3, 20, 24), generator=torch.Generator().manual_seed(0)).float()


@pytest.mark.parametrize("ours,theirs", [(mv.adjust_brightness, TF.adjust_brightness),
                                         (mv.adjust_contrast, TF.adjust_contrast),
                                         (mv.adjust_saturation, TF.adjust_saturation),
                                         (mv.adjust_hue, TF.adjust_hue)])
def test_colour_jitter_ops_follow_torchvision_per_sample(images, ours, theirs):
    factors = torch.tensor([-0.1, 0.05, 0.0, 0.09]) if ours is mv.adjust_hue else torch.tensor([0.6, 1.0, 1.3, 0.8])
    out = ours(images.clone(), factors)
    expected = torch.stack([theirs(images[i] / 255, float(factors[i])) for i in range(4)]) * 255
    assert (out - expected).abs().max() < 1e-3
    grey = images[:, :1]
    expected = torch.stack([theirs(grey[i] / 255, float(factors[i])) for i in range(4)]) * 255
    assert (ours(grey.clone(), factors) - expected).abs().max() < 1e-3


def test_grayscale_and_blur_follow_torchvision(images):
    assert (mv.grayscale(images) - TF.rgb_to_grayscale(images / 255, num_output_channels=3) * 255).abs().max() < 1e-3
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0])
    size = mv.blur_kernel_size(2.0, 20, 24)
    assert size == 13 and mv.blur_kernel_size(2.0, 3, 3) == 5   # reflection needs a kernel narrower than the image
    out = mv.gaussian_blur(images, sigma, size)
    expected = torch.stack([TF.gaussian_blur(images[i] / 255, [size, size], [float(sigma[i])] * 2) for i in range(4)])
    assert (out - expected * 255).abs().max() < 1e-3


def test_views_are_seeded_by_draw_and_differ_between_query_and_key():
    from dpl_zoo.data import Batch
    spec = mv.MoCoViewSpec(size=16, blur_sigma=(0.1, 1.0), mean=(0.5,) * 3, std=(0.5,) * 3)
    views = mv.MoCoViews(spec, seed=3, device=torch.device("cpu"))
    src = torch.randint(0, 256, (6, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    draws = torch.arange(10, 16)
    q, k = views(Batch([src], torch.zeros(6), torch.arange(6), draws, "source"))
    assert q.shape == k.shape == (6, 3, 16, 16) and not torch.equal(q, k)
    # the same draws give the same views, in any batch composition
    q2, k2 = views(Batch([src[3:]], torch.zeros(3), torch.arange(3), draws[3:], "source"))
    assert torch.equal(q[3:], q2) and torch.equal(k[3:], k2)
    views.epoch = 1
    assert not torch.equal(views(Batch([src], torch.zeros(6), torch.arange(6), draws, "source"))[0], q)
    # grey images stay grey through the colour ops and come out as 3 equal channels
    grey = src[:, :1]
    gq, _ = views(Batch([grey], torch.zeros(6), torch.arange(6), draws, "source"))
    assert torch.equal(gq[:, 0], gq[:, 1]) and torch.equal(gq[:, 1], gq[:, 2])


def test_jitter_factors_span_torchvision_ranges():
    u = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    f = mv.jitter_factors(u, (0.4, 0.4, 0.4, 0.1))
    assert torch.allclose(f, torch.tensor([[0.6, 0.6, 0.6, -0.1], [1.4, 1.4, 1.4, 0.1], [1.0, 1.0, 1.0, 0.0]]))
    assert mv.jitter_factors(u[:1], (1.5, 0, 0, 0))[0, 0] == 0   # brightness never below 0
