"""Bad inputs, each through the command line: a clear message, exit code 2, nothing lost.

Every case runs with a file already in the output folder and checks it is untouched.
"""
import pytest
from PIL import Image

from dpl_zoo.cli import main

from conftest import make_image_folder, tiny_overrides


def _sets(image_data, out, **extra):
    """One debiaspl run (without a recipe, `train` would run the DebiasPL/FixMatch comparison)."""
    return ["--methods", "debiaspl"] + [a for s in tiny_overrides(image_data, out, epochs=1, **extra)
                                        for a in ("--set", s)]


def _prepare(case, image_data, tmp_path):
    """Returns (argv, expected message) for one case, creating what it needs."""
    out = tmp_path / "runs"
    if case == "unknown model":
        return ["train", *_sets(image_data, out, model="resnet5O")], "unknown timm model 'resnet5O'"
    if case == "typo in recipe key":
        return ["train", *_sets(image_data, out), "--set", "dpl.thresold=0.9"], "did you mean 'threshold'"
    if case == "wrong type":
        return ["train", *_sets(image_data, out), "--set", "lr=fast"], "lr must be float"
    if case == "missing data dir":
        return ["train", *_sets(image_data, out), "--set", f"data.root={tmp_path / 'nope'}"], "does not exist"
    if case == "empty class folder":
        (image_data / "train" / "empty_class").mkdir()
        return ["train", *_sets(image_data, out)], "empty_class' has no images"
    if case == "corrupt image with --strict":
        (image_data / "train" / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
        return ["train", *_sets(image_data, out), "--strict"], "unreadable image .*bad.png"
    if case == "class left without usable images":
        root = tmp_path / "d"
        make_image_folder(root / "train", classes=("a", "b"), per_class=4)
        make_image_folder(root / "val", classes=("a", "b"), per_class=2)
        for p in (root / "train" / "b").iterdir():
            p.write_bytes(b"")  # every image of class b is zero bytes
        return ["train", *_sets(root, out)], "class 1 has no usable training images"
    if case == "label budget larger than a class":
        return ["train", *_sets(image_data, out), "--set", "data.labels_per_class=50"], "fewer than the 50 labels"
    if case == "num_classes mismatch":
        return ["train", *_sets(image_data, out), "--set", "num_classes=7"], "num_classes is 7 but the data has 3"
    if case == "resume from another recipe":
        main(["train", *_sets(image_data, out, experiment="first")])
        return ["train", *_sets(image_data, out, experiment="first"), "--set", "dpl.tau=0.9", "--resume",
                str(out / "first" / "last.pth.tar")], "different recipe"
    if case == "eval of a missing path":
        return ["eval", str(tmp_path / "gone" / "export"), "--data", str(image_data / "val")], "does not exist"
    if case == "resume from a missing checkpoint":
        return ["train", *_sets(image_data, out), "--resume", str(tmp_path / "none.pth.tar")], "does not exist"
    if case == "NaN loss":
        return ["train", *_sets(image_data, out), "--set", "lr=1e30"], "loss is (nan|inf) at step"
    if case == "eval on data with other classes":
        main(["train", *_sets(image_data, out, experiment="m")])
        other = make_image_folder(tmp_path / "other", classes=("x", "y"), per_class=2)
        return ["eval", str(out / "m" / "export"), "--data", str(other), "--workers", "0"], "model has 3 classes"
    if case == "unknown zoo name":
        return ["eval", "resnet50-dpl-1pc", "--data", str(image_data / "val")], "did you mean resnet50-dpl-1pct"
    if case == "convert a non-checkpoint":
        (tmp_path / "notes.pth.tar").write_text("hello")
        return ["convert", str(tmp_path / "notes.pth.tar"), "--out", str(tmp_path / "o")], "could not be loaded"
    if case == "publish a folder without weights":
        return ["publish", str(tmp_path), "--repo", "me/x", "--dry-run"], "summary.json|model.safetensors"
    if case == "freeze beyond the model's stages":
        return ["train", *_sets(image_data, out), "--set", "freeze=9"], "freeze must be backbone or a number of stages"
    if case == "dry run of cached stage outputs on a ViT":   # the real run refuses it: so must the dry run
        return ["train", "--methods", "debiaspl", "--dry-run", "--set", "model=test_vit", "--set", "freeze=2",
                "--set", "data.cached_views=2"], "cached stage outputs .* not VisionTransformer"
    if case == "unknown recipe":
        return ["train", "resnet50_dpl_2pct", "--dry-run"], "no shipped recipe of that name; did you mean"
    raise AssertionError(case)


CASES = ["unknown model", "typo in recipe key", "wrong type", "missing data dir", "empty class folder",
         "corrupt image with --strict", "class left without usable images", "label budget larger than a class",
         "num_classes mismatch", "resume from another recipe", "resume from a missing checkpoint", "eval of a missing path", "NaN loss",
         "eval on data with other classes", "unknown zoo name", "convert a non-checkpoint",
         "publish a folder without weights", "unknown recipe", "freeze beyond the model's stages",
         "dry run of cached stage outputs on a ViT"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_fast_with_a_clear_message(case, image_data, tmp_path, capsys):
    keep = tmp_path / "runs" / "keep.txt"
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("written before")
    argv, message = _prepare(case, image_data, tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(argv) == 2
    import re
    out, err = capsys.readouterr()
    text = out
    assert re.search(message, text), text
    assert "Traceback" not in out + err
    for path, data in before.items():  # nothing written before is lost or changed
        assert path.read_bytes() == data, path


def test_unreadable_images_are_skipped_and_counted(image_data, tmp_path):
    (image_data / "train" / "cat" / "zero.png").write_bytes(b"")
    (image_data / "train" / "dog" / "text.jpg").write_text("not an image")
    Image.new("L", (16, 16), 90).save(image_data / "train" / "emu" / "gray.png")
    Image.new("RGBA", (16, 16), (9, 9, 9, 9)).save(image_data / "train" / "emu" / "rgba.png")
    from dpl_zoo.config import load_config
    from dpl_zoo.train import fit
    summary = fit(load_config(None, tiny_overrides(image_data, tmp_path / "runs", epochs=1)), quiet=True)
    assert summary["skipped_images"] == 2
