"""Datasets, splits, split CSVs and bad data."""
import math

import numpy as np
import pytest
from PIL import Image

from dpl_zoo.data import read_split_csv, split_from_indices, split_labeled, write_split_csv
from dpl_zoo.datasets import DataError, ImageFolderDataset, class_balance, load_fashion_mnist, load_mnist

from conftest import make_fashion_folder, make_image_folder


def test_split_by_count_is_seeded_and_disjoint():
    targets = [c for c in range(4) for _ in range(25)]
    a = split_labeled(targets, 4, labels_per_class=3, seed=1)
    b = split_labeled(targets, 4, labels_per_class=3, seed=1)
    c = split_labeled(targets, 4, labels_per_class=3, seed=2)
    assert a == b and a.labeled != c.labeled
    assert np.bincount(np.asarray(targets)[a.labeled]).tolist() == [3, 3, 3, 3]
    assert sorted(a.labeled + a.unlabeled) == list(range(100))


def test_split_by_fraction_rounds_with_at_least_one():
    targets = [0] * 250 + [1] * 30 + [2] * 3
    s = split_labeled(targets, 3, label_fraction=0.01, seed=0)
    # round(2.5) = 2 (banker's rounding as in Python), round(0.3) = 0 -> 1, round(0.03) -> 1
    assert np.bincount(np.asarray(targets)[s.labeled]).tolist() == [2, 1, 1]


def test_split_errors():
    with pytest.raises(DataError, match="class 2 has no usable"):
        split_labeled([0, 0, 1, 1], 3, labels_per_class=1)
    with pytest.raises(DataError, match="fewer than the 5 labels"):
        split_labeled([0, 0, 1, 1], 2, labels_per_class=5)
    with pytest.raises(DataError, match="num_classes is 2"):
        split_labeled([0, 1, 2], 2, labels_per_class=1)


def test_split_csv_round_trip_and_authors_format(tmp_path):
    write_split_csv(tmp_path / "s.csv", [4, 8, 15])
    assert read_split_csv(tmp_path / "s.csv") == [4, 8, 15]
    # the authors' files carry the position in a column named Index, possibly beside others
    (tmp_path / "a.csv").write_text("Unnamed: 0,Index,Class\n0,16,a\n1,23,b\n")
    assert read_split_csv(tmp_path / "a.csv") == [16, 23]
    (tmp_path / "bad.csv").write_text("idx\n1\n")
    with pytest.raises(DataError, match="no 'Index' column"):
        read_split_csv(tmp_path / "bad.csv")
    s = split_from_indices([1, 3], size=6, exclude=[5])
    assert s.labeled == [1, 3] and s.unlabeled == [0, 2, 4]
    with pytest.raises(DataError, match="another dataset"):
        split_from_indices([1, 9], size=6)


def test_folder_order_matches_torchvision_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder
    root = make_image_folder(tmp_path / "d", per_class=12)
    ours = ImageFolderDataset(root)
    theirs = ImageFolder(str(root))
    assert [p for p, _ in ours.samples] == [p for p, _ in theirs.samples]  # split CSV positions agree
    assert ours.classes == theirs.classes


def test_bad_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path / "empty_root")
    root = make_image_folder(tmp_path / "d", per_class=2)
    (root / "zebra").mkdir()
    with pytest.raises(DataError, match="zebra.*has no images"):
        ImageFolderDataset(root)


def test_corrupt_images_skipped_and_counted_or_strict(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "cat" / "zero.png").write_bytes(b"")
    (root / "dog" / "junk.jpg").write_bytes(b"not an image at all")
    Image.new("L", (16, 16), 100).save(root / "emu" / "gray.png")     # grayscale and RGBA are fine
    Image.new("RGBA", (16, 16), (1, 2, 3, 4)).save(root / "emu" / "rgba.png")
    ds = ImageFolderDataset(root)
    bad = sorted(ds.samples[i][0].rsplit("/", 1)[-1] for i in ds.bad_indices)
    assert bad == ["junk.jpg", "zero.png"]
    good = [i for i in range(len(ds)) if i not in ds.bad_indices]
    assert all(ds[i][0].mode == "RGB" for i in good)
    with pytest.raises(DataError, match="unreadable image .*--strict"):
        ImageFolderDataset(root, strict=True)
    split = split_labeled(ds.targets, 3, labels_per_class=1, exclude=ds.bad_indices)
    assert not set(ds.bad_indices) & set(split.labeled + split.unlabeled)


def test_embedded_mnist_is_real_and_stratified():
    train, test = load_mnist(0.2)
    assert (len(train), len(test)) == (4000, 1000)
    assert np.bincount(test.targets).tolist() == [100] * 10
    img, target = train[0]
    assert img.size == (28, 28) and img.mode == "RGB" and 0 <= target < 10
    assert np.asarray(img).std() > 20  # real strokes, not blank


def test_class_balance_hand_values():
    b = class_balance([2, 2])
    assert b["kl_uniform"] == 0 and b["max_min_ratio"] == 1
    b = class_balance([3, 1, 0])
    # p = [.75, .25, 0]: KL = .75 ln(2.25) + .25 ln(.75)
    assert math.isclose(b["kl_uniform"], 0.75 * math.log(2.25) + 0.25 * math.log(0.75))
    assert b["max_min_ratio"] == 3.0


def test_nested_and_symlinked_folders_in_torchvision_order(tmp_path):
    """The authors' Index CSVs point into torchvision's ImageFolder list: same order on nested
    sub-folders (per-directory walk, not sorted full paths) and on symlinked class folders."""
    from torchvision.datasets import ImageFolder
    root = tmp_path / "d"
    for cls, rel in (("a", "x.png"), ("a", "sub/b.png"), ("a", "sub-2/a.png"), ("a", "sub.png/c.png"),
                     ("b", "z.png"), ("b", "y/w.png")):
        (root / cls / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (10, 20, 30)).save(root / cls / rel, format="PNG")
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=("c",), per_class=3)
    (root / "c").symlink_to(elsewhere / "c", target_is_directory=True)
    ours, theirs = ImageFolderDataset(root), ImageFolder(str(root))
    assert [p for p, _ in ours.samples] == [p for p, _ in theirs.samples]
    assert ours.classes == theirs.classes == ["a", "b", "c"] and len(ours) == 9


def test_images_are_scanned_once_and_the_result_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "dog" / "junk.jpg").write_bytes(b"not an image")
    import dpl_zoo.datasets as datasets
    calls = []
    real = datasets._image_problem
    monkeypatch.setattr(datasets, "_image_problem", lambda p: calls.append(p) or real(p))
    first = ImageFolderDataset(root)
    assert len(calls) == len(first) and [first.samples[i][0].rsplit("/", 1)[-1] for i in first.bad_indices] == ["junk.jpg"]
    calls.clear()
    second = ImageFolderDataset(root)  # a restart: nothing is opened again
    assert calls == [] and second.bad_indices == first.bad_indices
    (root / "emu" / "new.png").write_bytes(b"")  # the folder changed: scanned again
    third = ImageFolderDataset(root)
    assert len(calls) == len(third) and len(third.bad_indices) == 2


def test_truncated_jpeg_is_found_by_the_scan(tmp_path, monkeypatch):
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "d", per_class=2, size=64)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    img.save(root / "cat" / "whole.jpg", quality=90)
    data = (root / "cat" / "whole.jpg").read_bytes()
    (root / "cat" / "cut.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolderDataset(root)
    assert [ds.samples[i][0].rsplit("/", 1)[-1] for i in ds.bad_indices] == ["cut.jpg"]


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reader_on_tiny_idx_files(tmp_path, gz):
    folder, (train_x, train_y), (test_x, test_y) = make_fashion_folder(tmp_path / "fm", per_class=3,
                                                                         test_per_class=1, gz=gz)
    train, test = load_fashion_mnist(str(folder))
    assert (len(train), len(test)) == (30, 10) and train.classes[0] == "T-shirt/top"
    assert np.array_equal(train.images, train_x) and test.targets == test_y.tolist()
    assert train.tensor().shape == (30, 1, 28, 28) and train[3][0].mode == "RGB"
    (folder / ("t10k-labels-idx1-ubyte" + (".gz" if gz else ""))).unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        load_fashion_mnist(str(folder))


def test_missing_default_fashion_mnist_names_the_package(monkeypatch):
    import dpl_zoo.datasets as datasets
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN", "/nonexistent/fashion-mnist")
    with pytest.raises(DataError, match="apt install dataset-fashion-mnist"):
        load_fashion_mnist()
