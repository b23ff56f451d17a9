"""Zoo weights from their sources, end to end on 127.0.0.1: the authors' release through a
Drive-like HTTPS proxy (gdown's real requests) or a mirror, conversion, records and checks,
timm tags, and the maintainers' publish-zoo to a loopback Hub."""
import importlib
import json
import re
import warnings

import pytest
import timm
import torch

import dpl_zoo
from dpl_zoo.cli import main
from dpl_zoo.integrity import sha256_of
from dpl_zoo.zoo import HubWeights, Metric, Release, ZooEntry, ZooError, model_info, register, unregister

from drive_server import DriveFile, DriveProxy, ReleaseMirror
from drive_server import authors_checkpoint

DRIVE_ID = "1TestDriveFileId_0123456789abcdefgh"


@pytest.fixture
def release(tmp_path):
    """A small checkpoint in the authors' layout (test_resnet, 10 classes) and its student."""
    path = tmp_path / "authors" / "dpl.pth.tar"
    path.parent.mkdir()
    student, _ = authors_checkpoint(path, arch="test_resnet", num_classes=10)
    return path, student


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DPL_ZOO_CACHE", str(tmp_path / "dpl-cache"))
    monkeypatch.delenv("DPL_ZOO_MIRROR", raising=False)
    # gdown keeps Drive's cookies in a file under the home folder: keep it inside the test
    monkeypatch.setattr(importlib.import_module("gdown.download"), "DEFAULT_COOKIES_FILE",
                        str(tmp_path / "gdown-cookies.txt"))
    return tmp_path / "dpl-cache"


def make_entry(name="tiny-dpl", sha256=None, **extra):
    fields = dict(name=name, architecture="test_resnet", num_classes=10, label_set="synthetic",
                  dataset="synthetic", label_budget="1 label", recipe="mnist_demo",
                  metrics=Metric(50.0, provenance="reported", source="a synthetic checkpoint"),
                  release=Release(drive_id=DRIVE_ID, epochs=1, sha256=sha256), timm_tag=name.replace("-", "_"))
    fields.update(extra)
    return ZooEntry(**fields)


@pytest.fixture
def entry(cache):
    made = []

    def add(**kw):
        made.append(register(make_entry(**kw), overwrite=True))
        return made[-1]
    yield add
    for e in made:
        if e.name in dpl_zoo.list_models():
            unregister(e.name)


@pytest.fixture
def mirror(release, monkeypatch):
    with ReleaseMirror() as server:
        server.add("tiny-dpl.pth.tar", release[0].read_bytes())
        monkeypatch.setenv("DPL_ZOO_MIRROR", server.url + "/")
        yield server


@pytest.fixture
def drive(tmp_path, release, monkeypatch):
    with DriveProxy(tmp_path / "drive-ca.pem") as proxy:
        for var in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "CURL_CA_BUNDLE"):
            monkeypatch.delenv(var, raising=False)
        for var in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(var, proxy.url)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", proxy.ca_bundle)
        yield proxy


def _out(model, size=32):
    torch.manual_seed(0)
    return model.eval()(torch.randn(2, 3, size, size))


def _record(cache, name="tiny-dpl"):
    return json.loads((cache / "zoo" / name / "source.json").read_text())


# --- the authors' release through a mirror ---------------------------------------------------

def test_mirror_first_load_converts_records_and_warns_then_later_loads_check(entry, mirror, release, cache):
    e = entry()
    with pytest.warns(UserWarning, match=r"sha256 [0-9a-f]{64}.*Release\(\.\.\., sha256="):
        model = dpl_zoo.load("tiny-dpl")
    assert torch.equal(_out(model), _out(release[1]))  # the authors' student, converted
    assert mirror.requests == [("GET", "/tiny-dpl.pth.tar")]
    record = _record(cache)
    assert record["release"]["sha256"] == sha256_of(release[0]) and not record["release"]["pinned"]
    assert record["weights"]["sha256"] == sha256_of(cache / "zoo" / "tiny-dpl" / "model.safetensors")
    assert not (cache / "releases" / "tiny-dpl.pth.tar").exists()  # deleted after the conversion

    # warm: no download, no warning; offline (the mirror gone) it still loads
    mirror.requests.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = dpl_zoo.load("tiny-dpl")
    assert torch.equal(_out(again), _out(release[1])) and mirror.requests == []

    # touched but unchanged: hashed again, trusted, record updated
    weights = cache / "zoo" / "tiny-dpl" / "model.safetensors"
    weights.touch()
    dpl_zoo.load("tiny-dpl")
    assert _record(cache)["weights"]["mtime_ns"] == weights.stat().st_mtime_ns
    # changed: refused against the record, nothing loaded
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ZooError, match="cached conversion.*sha256 .* expected .*force_download=True"):
        dpl_zoo.load("tiny-dpl")
    # without its record a cached conversion cannot be checked: refused, not trusted
    (cache / "zoo" / "tiny-dpl" / "source.json").unlink()
    with pytest.raises(ZooError, match="no readable source.json"):
        dpl_zoo.load("tiny-dpl")
    # force_download starts over from the source (and records the new download)
    with pytest.warns(UserWarning, match="recorded"):
        assert torch.equal(_out(dpl_zoo.load("tiny-dpl", force_download=True)), _out(release[1]))
    assert e.source == "authors' release"


def test_keep_release_and_pinned_hash(entry, mirror, release, cache):
    good = sha256_of(release[0])
    entry(sha256=good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # pinned: no "recorded" warning
        dpl_zoo.load("tiny-dpl", keep_release=True)
    assert sha256_of(cache / "releases" / "tiny-dpl.pth.tar") == good
    assert _record(cache)["release"]["pinned"]

    # a registry pinning another hash refuses the cached conversion made from this file
    entry(sha256="f" * 64)
    with pytest.raises(ZooError, match="release file with sha256 .* registry pins f{64}"):
        dpl_zoo.load("tiny-dpl")


def test_pinned_mismatch_converts_and_loads_nothing(entry, mirror, cache):
    entry(sha256="0" * 64)
    with pytest.raises(ZooError, match="sha256 [0-9a-f]{64}, the registry pins 0{64}.*nothing was converted"):
        dpl_zoo.load("tiny-dpl")
    assert not (cache / "zoo" / "tiny-dpl").exists()
    assert (cache / "releases" / "tiny-dpl.pth.tar.rejected").is_file()  # kept for inspection
    assert not (cache / "releases" / "tiny-dpl.pth.tar").exists()


MANUAL = r"Manual route: download https://drive\.google\.com/file/d/.*/view by hand.*dpl-zoo convert FILE --out DIR"


@pytest.mark.parametrize("mode, message", [
    ("html", "HTML page, not a checkpoint"),
    ("truncated", "broke off .*incomplete"),
    ("unsized", "cannot be converted .*truncated or corrupt"),
    ("missing", "could not be downloaded .*404"),
])
def test_mirror_failures_are_clear_errors(entry, mirror, cache, mode, message):
    entry()
    if mode == "missing":
        mirror.files.clear()
    else:
        mirror.add("tiny-dpl.pth.tar", mirror.files["tiny-dpl.pth.tar"][0], mode)
    with pytest.raises(ZooError, match=f"{message}.*{MANUAL}"):
        dpl_zoo.load("tiny-dpl")
    assert not (cache / "zoo" / "tiny-dpl").exists() and not (cache / "releases" / "tiny-dpl.pth.tar").exists()


LOAD_AT_ONCE = """
import sys, time
from pathlib import Path
import dpl_zoo
from dpl_zoo.zoo import Metric, Release, ZooEntry, register
register(ZooEntry(name="tiny-dpl", architecture="test_resnet", num_classes=10, label_set="synthetic",
                  dataset="synthetic", label_budget="1 label", recipe="mnist_demo",
                  metrics=Metric(50.0, provenance="reported", source="a synthetic checkpoint"),
                  release=Release(drive_id="%s", epochs=1), timm_tag="tiny_dpl"))
Path(sys.argv[1]).touch()  # imports done: ready
while not Path(sys.argv[2]).exists():
    time.sleep(0.01)
dpl_zoo.load("tiny-dpl")
""" % DRIVE_ID


def test_two_processes_loading_one_entry_at_once_do_not_break_each_other(release, cache, tmp_path):
    """Every DDP rank calling timm.create_model("resnet50.dpl_1pct", pretrained=True): the first
    process downloads and converts under a file lock, the other waits and loads the conversion.
    The mirror answers two requests at the same moment, so without the lock both downloads run at
    once and one process deletes the release file or the conversion folder the other one uses."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path
    with ReleaseMirror(together_timeout=3) as mirror:
        mirror.add("tiny-dpl.pth.tar", release[0].read_bytes(), "together")
        env = {**os.environ, "DPL_ZOO_CACHE": str(cache), "DPL_ZOO_MIRROR": mirror.url,
               "HOME": str(tmp_path / "home"),  # gdown keeps its cookies under the home folder
               "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
        ready = [tmp_path / f"ready-{i}" for i in range(2)]
        go = tmp_path / "go"
        procs = [subprocess.Popen([sys.executable, "-c", LOAD_AT_ONCE, str(r), str(go)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in ready]
        deadline = time.monotonic() + 240
        while not all(r.exists() for r in ready) and time.monotonic() < deadline and \
                all(p.poll() is None for p in procs):
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert mirror.requests == [("GET", "/tiny-dpl.pth.tar")]  # one download; the other process waited
    assert (cache / "zoo" / "tiny-dpl" / "model.safetensors").is_file()


def test_the_conversion_stays_locked_until_timm_has_read_it(entry, mirror, release, cache, monkeypatch):
    """Another process's force_download replaces the conversion folder under the entry's lock:
    a load holds that lock until timm has read the weights, not only while checking them."""
    import timm.models._builder as builder
    from filelock import FileLock, Timeout
    entry()
    with pytest.warns(UserWarning, match="recorded"):
        dpl_zoo.load("tiny-dpl")
    real, seen = builder.load_state_dict, []

    def reading(path, *args, **kwargs):
        other = FileLock(cache / "zoo" / "tiny-dpl.lock")   # what a concurrent force_download takes
        try:
            other.acquire(timeout=0)
        except Timeout:
            seen.append("held")
        else:
            other.release()
            seen.append("free")
        return real(path, *args, **kwargs)
    monkeypatch.setattr(builder, "load_state_dict", reading)
    assert torch.equal(_out(dpl_zoo.load("tiny-dpl")), _out(release[1]))
    assert seen == ["held"]


def test_mirror_must_be_a_url(entry, cache, monkeypatch):
    entry()
    monkeypatch.setenv("DPL_ZOO_MIRROR", "/srv/releases")
    with pytest.raises(ZooError, match="DPL_ZOO_MIRROR=.* is not an http"):
        dpl_zoo.load("tiny-dpl")


# --- the authors' release through Google Drive (gdown, HTTPS proxy on loopback) ---------------

def test_drive_confirm_page_then_file(entry, drive, release, cache):
    drive.add(DriveFile(DRIVE_ID, release[0].read_bytes(), mode="confirm"))
    entry()
    with pytest.warns(UserWarning, match="recorded"):
        model = dpl_zoo.load("tiny-dpl")
    assert torch.equal(_out(model), _out(release[1]))
    hosts = [(host, path.split("?")[0]) for host, path in drive.requests]
    assert hosts == [("drive.google.com", "/uc"), ("drive.usercontent.google.com", "/download"),
                     ("drive.usercontent.google.com", "/download")]
    assert drive.requests[0][1] == f"/uc?id={DRIVE_ID}"  # what gdown.download(id=...) asks
    assert "confirm=t" in drive.requests[2][1] and drive.files[DRIVE_ID].uuid in drive.requests[2][1]
    # warm cache: no network at all
    drive.requests.clear()
    dpl_zoo.load("tiny-dpl")
    assert drive.requests == []


@pytest.mark.parametrize("mode, message", [
    ("quota", "too many users have viewed or downloaded this file recently"),
    ("signin", "Google Drive did not hand out the file"),
    ("truncated", "broke off .*incomplete"),
])
def test_drive_failures_are_clear_errors(entry, drive, release, cache, mode, message):
    drive.add(DriveFile(DRIVE_ID, release[0].read_bytes(), mode=mode))
    entry()
    with pytest.raises(ZooError, match=f"{message}.*{MANUAL}"):
        dpl_zoo.load("tiny-dpl")
    assert not (cache / "zoo" / "tiny-dpl").exists()


def test_drive_error_through_the_cli_is_one_line(entry, drive, release, cache, capsys):
    drive.add(DriveFile(DRIVE_ID, release[0].read_bytes(), mode="quota"))
    entry()
    assert main(["eval", "tiny-dpl", "--data", "mnist"]) == 2
    out = capsys.readouterr().out
    assert "too many users" in out and "Traceback" not in out


# --- timm tags --------------------------------------------------------------------------------

def test_timm_create_model_with_the_tag_is_dpl_zoo_load(entry, mirror, release):
    entry()
    with pytest.warns(UserWarning, match="recorded"):
        via_timm = timm.create_model("test_resnet.tiny_dpl", pretrained=True)  # fetches on its own
    via_zoo = dpl_zoo.load("tiny-dpl")
    assert torch.equal(_out(via_timm), _out(via_zoo)) and torch.equal(_out(via_zoo), _out(release[1]))
    assert via_timm.pretrained_cfg == via_zoo.pretrained_cfg
    assert timm.data.resolve_data_config(model=via_zoo) == {
        "input_size": (3, 224, 224), "interpolation": "bilinear", "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225), "crop_pct": 0.875, "crop_mode": "center"}
    # a new head, as timm does
    assert timm.create_model("test_resnet.tiny_dpl", pretrained=True, num_classes=3).num_classes == 3
    assert "test_resnet.tiny_dpl" in timm.list_pretrained("test_resnet.*")
    # timm's own default tag is untouched
    assert timm.models.get_pretrained_cfg("test_resnet").tag == "r160_in1k"


def test_reference_entries_are_timm_tags_with_the_authors_preprocessing():
    reference = timm.models.get_pretrained_cfg("resnet50.tv_in1k")
    tags = {}
    for name in dpl_zoo.list_models("resnet50-*"):
        e = model_info(name)
        cfg = timm.models.get_pretrained_cfg(e.timm_name)
        assert (cfg.input_size, cfg.interpolation, cfg.crop_pct, cfg.mean, cfg.std) == (
            reference.input_size, reference.interpolation, reference.crop_pct, reference.mean, reference.std)
        assert cfg.num_classes == 1000 and len(cfg.label_names) == 1000
        assert not cfg.url and not cfg.hf_hub_id and not cfg.file  # weights only through dpl-zoo
        assert "CC-BY-NC-4.0" in cfg.notes and cfg.license == e.license == "cc-by-nc-4.0"
        tags[name] = e.timm_tag
    assert tags["resnet50-dpl-1pct"] == "dpl_1pct" and len(set(tags.values())) == 6
    model = timm.create_model("resnet50.dpl_1pct")  # no download without pretrained=True
    assert timm.data.resolve_data_config(model=model)["crop_pct"] == 0.875


def test_entries_without_a_source_say_how_to_reproduce(cache):
    with pytest.raises(ZooError, match="no source that can deliver.*dpl-zoo train.*about 6 minutes"):
        dpl_zoo.load("test_resnet-dpl-mnist")
    with pytest.raises(ZooError, match="dpl-zoo train vit_small_dpl_1pct"):
        dpl_zoo.load("vit_small-dpl-1pct")


# --- config.json is checked against the registry ------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(num_classes=5), r"num_classes \[10\] \(registry: 5\)"),
    (dict(architecture="resnet18"), "does not fit|architecture 'test_resnet'"),
    (dict(crop_pct=0.95), r"crop_pct 0.875 \(registry: 0.95\)"),
])
def test_a_conversion_that_does_not_match_the_registry_is_refused(entry, mirror, cache, change, message):
    entry(**change)
    with pytest.raises(ZooError, match=message):
        dpl_zoo.load("tiny-dpl")
    assert not (cache / "zoo" / "tiny-dpl").exists()


# --- maintainers: publish-zoo ------------------------------------------------------------------

def test_publish_zoo_then_load_from_the_hub(hub, entry, mirror, release, cache, tmp_path, capsys):
    entry()
    with pytest.warns(UserWarning, match="recorded"):
        assert main(["publish-zoo", "tiny-dpl", "--org", "tester", "--stage-dir", str(tmp_path / "stage")]) == 0
    out = capsys.readouterr().out
    line = re.search(r'"tiny-dpl": HubWeights\("tester/tiny-dpl", revision="([0-9a-f]{40})", '
                     r'sha256="([0-9a-f]{64})"\),', out)
    assert line, out
    repo = hub.state.repos["tester/tiny-dpl"]
    assert line.group(1) == repo["sha"]
    assert line.group(2) == sha256_of(cache / "zoo" / "tiny-dpl" / "model.safetensors")
    assert {"README.md", "config.json", "model.safetensors"} <= set(repo["files"])
    assert ".dpl-zoo-staging" not in repo["files"]

    # the pasted line makes the Hub the first source: no mirror request, the same weights
    published = entry(hub=HubWeights("tester/tiny-dpl", revision=line.group(1), sha256=line.group(2)))
    assert published.source == "hub"
    mirror.requests.clear()
    hub.state.requests.clear()
    model = dpl_zoo.load("tiny-dpl")
    assert torch.equal(_out(model), _out(release[1])) and mirror.requests == []
    assert not any(p.endswith("pytorch_model.bin") for _, p in hub.state.requests)  # never asks for pickle
    # warm and pinned: no Hub round trip
    hub.state.requests.clear()
    assert torch.equal(_out(timm.create_model("test_resnet.tiny_dpl", pretrained=True)), _out(release[1]))
    assert hub.state.requests == []


def test_publish_zoo_dry_run_with_evaluation(entry, mirror, cache, image_data, tmp_path, capsys):
    entry(num_classes=3, sha256=None)
    mirror.files.clear()
    path = tmp_path / "three.pth.tar"
    authors_checkpoint(path, arch="test_resnet", num_classes=3)
    mirror.add("tiny-dpl.pth.tar", path.read_bytes())
    with pytest.warns(UserWarning, match="recorded"):
        assert main(["publish-zoo", "tiny-dpl", "--org", "tester", "--data", str(image_data / "val"),
                     "--dry-run", "--keep-release", "--stage-dir", str(tmp_path / "stage")]) == 0
    out = capsys.readouterr().out
    assert "nothing uploaded" in out and "measured top-1" in out and "HubWeights" not in out
    card = (tmp_path / "stage" / "tiny-dpl" / "README.md").read_text()
    assert "measured" in card and str(tmp_path) not in card
    staged_eval = json.loads((tmp_path / "stage" / "tiny-dpl" / "eval.json").read_text())
    assert staged_eval["data"] == "val" and staged_eval["images"] == 12  # local path reduced to its base name
    assert (cache / "releases" / "tiny-dpl.pth.tar").is_file()


def test_publish_zoo_refuses_entries_without_a_release(capsys):
    assert main(["publish-zoo", "test_resnet-dpl-mnist", "--org", "tester", "--dry-run"]) == 2
    assert "no released checkpoint" in capsys.readouterr().out
