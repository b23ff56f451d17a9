"""What derived artifacts are keyed by (dpl_zoo.identity): the data's content, remembered cheaply."""
import shutil

from dpl_zoo import identity
from dpl_zoo.datasets import ImageFolderDataset
from dpl_zoo.identity import data_digest

from conftest import as_bmp, repaint


def test_a_folders_digest_is_its_content_read_once(image_data, tmp_path, monkeypatch):
    image = as_bmp(image_data / "train" / "cat" / "000.png")      # its size never changes with its pixels
    first = data_digest(ImageFolderDataset(image_data / "train", verify=False))
    reads = []
    real = identity._sha256
    monkeypatch.setattr(identity, "_sha256", lambda path: reads.append(path) or real(path))
    assert data_digest(ImageFolderDataset(image_data / "train", verify=False)) == first
    assert reads == []                                            # a second look reads no image
    repaint(image)                                                # same name, same size, other pixels
    edited = data_digest(ImageFolderDataset(image_data / "train", verify=False))
    assert edited != first and reads == [str(image)]              # only the rewritten file is read again
    image.touch()                                                 # a new time, the same content
    assert data_digest(ImageFolderDataset(image_data / "train", verify=False)) == edited
    moved = shutil.copytree(image_data / "train", tmp_path / "moved")
    assert data_digest(ImageFolderDataset(moved, verify=False)) == edited    # a moved folder is the same data
