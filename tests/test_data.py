"""Datasets, splits, split CSVs and bad data."""
import math

import numpy as np
import pytest
from PIL import Image

from dpl_zoo.data import (
    DataError, ImageFolderDataset, class_balance, load_mnist, read_split_csv, split_from_indices, split_labeled,
    write_split_csv,
)

from conftest import make_image_folder


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
