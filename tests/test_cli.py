"""The ``dpl-zoo`` command line as a user sees it: what it prints, and only that."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fake_run(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = [{"kind": "epoch", "step": s, "eval": {"student": {"top1": 10.0 * s},
                                                  "pseudo_labels": {"mask_rate": 0.1 * s, "pl_acc": 50.0}}}
            for s in (1, 2)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"method": "debiaspl", "top1": 20.0, "pl_hist": [3, 5, 2]}))
    return folder


def test_third_party_info_logs_stay_out_of_the_output(tmp_path):
    # matplotlib logs "generated new fontManager" at INFO the first time it builds its font cache,
    # which `dpl-zoo train` used to print between its tables; a fresh MPLCONFIGDIR makes it rebuild
    run = _fake_run(tmp_path / "run")
    mpl = tmp_path / "mplconfig"
    code = ("import logging, sys\n"
            "from dpl_zoo.cli import main\n"
            f"rc = main(['plot', {str(run)!r}, '--out', {str(tmp_path / 'fig.png')!r}])\n"
            "logging.getLogger('dpl_zoo.progress').info('our own info line')\n"
            "logging.getLogger('matplotlib').warning('a third-party warning')\n"
            "sys.exit(rc)\n")
    env = {**os.environ, "MPLCONFIGDIR": str(mpl), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert list(mpl.glob("fontlist-*.json")), "matplotlib did not build its font cache in this run"
    assert "fontManager" not in output
    assert "our own info line" in output and "a third-party warning" in output   # ours and warnings still show
