"""The view cache's store, its fill and the views a step draws from it (dpl_zoo.view_cache)."""
import pytest
import torch

from dpl_zoo import view_cache
from dpl_zoo.augment import RandAugmentSpec
from dpl_zoo.data import Batch, ViewSpec, eval_transform
from dpl_zoo.datasets import ImageFolderDataset
from dpl_zoo.view_cache import CachedViewMaker, CachedViews, FeatureStore, train_view_features


def _values(rows):
    """A compute() for a store of 1 view x 2 numbers per row: row r holds (r, -r)."""
    rows = list(rows)
    yield rows, torch.tensor([[[float(r), -float(r)]] for r in rows])


def test_a_store_opened_before_another_process_filled_it_reads_the_rows(tmp_path):
    """Under torchrun every rank opens the store, rank 0 fills it, then the others read it."""
    reader = FeatureStore(tmp_path / "store", {"kind": "test"}, 6, 1, (2,))
    writer = FeatureStore(tmp_path / "store", {"kind": "test"}, 6, 1, (2,))
    assert writer.fill([1, 3, 4], _values) == 3
    assert reader.read([4, 1]).tolist() == [[[4.0, -4.0]], [[1.0, -1.0]]]
    assert reader.fill([1, 3, 4, 5], _values) == 1            # only the row nobody filled yet
    with pytest.raises(RuntimeError, match="lacks 1 rows"):
        writer.read([0, 1])


def test_a_fill_is_one_loader_whose_workers_share_each_chunk(image_data, monkeypatch):
    """Every worker decodes and augments: each chunk of a fill is split over them, and one loader
    serves the whole fill (its workers start once, not once per chunk). The features do not
    depend on the workers."""
    loaders = []

    class Recorded(view_cache.DataLoader):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            loaders.append(self)

    monkeypatch.setattr(view_cache, "DataLoader", Recorded)
    base = ImageFolderDataset(image_data / "train", verify=False)          # 30 images
    spec = ViewSpec(size=16, scale=(0.5, 1.0), ratio=(0.75, 1.33), hflip=0.5,
                    strong=RandAugmentSpec.parse("rand-m10-n2"), mean=(0.5,) * 3, std=(0.25,) * 3)
    tf = eval_transform({"input_size": (3, 16, 16), "mean": (0.5,) * 3, "std": (0.25,) * 3, "crop_pct": 1.0,
                         "interpolation": "bilinear"})

    def fill(workers):
        compute = train_view_features(base, spec, 2, "ready", lambda x: x.flatten(1)[:, :32],
                                      torch.device("cpu"), tf, workers=workers, chunk=8)
        return list(compute(list(range(30))))

    shared = fill(2)
    assert len(loaders) == 1 and loaders[0].num_workers == 2 and loaders[0].batch_size == 4   # 8 = 2 workers x 4
    assert [part for part, _ in shared] == [list(range(i, min(i + 8, 30))) for i in range(0, 30, 8)]
    alone = fill(0)
    assert [part for part, _ in alone] == [part for part, _ in shared]
    for (_, a), (_, b) in zip(shared, alone):
        assert a.shape[1:] == (5, 32) and torch.equal(a, b)    # 2 weak + 2 strong + the evaluation view


@pytest.mark.parametrize("k", [2, 3])
def test_multiviews_take_distinct_cached_slots(k):
    """The two weak (and the two strong) views of an image are two different cached views."""
    n = 600
    features = torch.arange(2 * k + 1, dtype=torch.float16).repeat(n, 1).unsqueeze(-1)   # slot s holds s
    cached = CachedViews(features, range(n), [0] * n, k)
    maker = CachedViewMaker(cached, ["weak", "weak", "strong", "strong"], seed=3, device=torch.device("cpu"))
    batch = Batch([], torch.zeros(n, dtype=torch.int64), torch.arange(n), torch.arange(n), "cached")
    w1, w2, s1, s2 = (v.flatten().long() for v in maker(batch))
    assert (w1 != w2).all() and (s1 != s2).all()
    for pair, first_slot in (((w1, w2), 0), ((s1, s2), k)):
        for view in pair:   # every slot about equally often, for either view
            share = torch.bincount(view - first_slot, minlength=k).float() / n
            assert share.min() > 0.7 / k and share.max() < 1.3 / k, share
