"""``dpl-zoo eval`` of run checkpoints: it needs the weights and what they were trained with, not the run's files."""
import json

import torch

from dpl_zoo.cli import main
from dpl_zoo.train import fit


def test_eval_of_a_checkpoint_needs_no_training_files(tiny_config, image_data, tmp_path, monkeypatch):
    prior = tmp_path / "prior.txt"
    prior.write_text("0.5 0.3 0.2\n")
    fit(tiny_config(epochs=1, **{"dpl.target_prior": str(prior)}), quiet=True)
    path = tmp_path / "runs" / "run" / "last.pth.tar"
    # the run's other training-only files, as a run that used them would record them
    state = torch.load(path, weights_only=True)
    state["config"]["data"]["labeled_csv"] = str(tmp_path / "split.csv")
    state["config"]["data"]["teacher_predictions"] = str(tmp_path / "clip.safetensors")
    torch.save(state, path)
    prior.unlink()                                      # none of them exists where eval runs
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = elsewhere / "eval.json"
    assert main(["eval", str(path), "--data", str(image_data / "val"), "--out", str(out), "--workers", "0",
                 "--device", "cpu"]) == 0
    result = json.loads(out.read_text())
    assert result["images"] == 12 and len(result["per_class_top1"]) == 3
