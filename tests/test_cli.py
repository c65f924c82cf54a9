"""The command line end to end on a small grid in a temporary folder."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import anomfast
from anomfast.cli import main

from conftest import random_labels, random_logits

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_grid(tmp_path, rng, n=4, H=16, W=20, C=5):
    from PIL import Image
    (tmp_path / "labels").mkdir()
    for m in ("a", "b"):
        (tmp_path / m).mkdir()
    data = {"a": [], "b": [], "y": []}
    for i in range(n):
        y = random_labels(rng, 1, H, W, p_anomaly=0.2, p_void=0.1)[0]
        y[0, 0], y[0, 1] = 0, 1
        Image.fromarray(y.numpy()).save(tmp_path / "labels" / f"img{i}.png")
        data["y"].append(y)
        for m in ("a", "b"):
            x = random_logits(rng, 1, C, H, W)[0]
            np.save(tmp_path / m / f"img{i}.npy", x.numpy())
            data[m].append(x)
    (tmp_path / "grid.toml").write_text(
        '[labels]\ndir = "labels"\nanomaly_ids = [1]\nvoid_ids = [255]\nnormal_ids = [0]\n'
        '[[models]]\nname = "Model A"\nlogits = "a"\n[[models]]\nname = "Model B"\nlogits = "b"\n')
    return data


def test_eval_end_to_end_matches_python_api(tmp_path, rng):
    data = make_grid(tmp_path, rng)
    out = tmp_path / "out"
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet",
                 "--methods", "max_logit,msp,energy"]) == 0
    md = (out / "report.md").read_text()
    for section in ("## Main Results", "## F1 Scores (%) - For Threshold Selection", "## Optimal Thresholds",
                    "**Format**: FPR95 / AUROC / AUPR / F1 (all in %)"):
        assert section in md
    assert "| Model | Simple Max Logits | Maximum Softmax Probability | Energy Score |" in md
    doc = json.loads((out / "results.json").read_text())
    assert json.loads(json.dumps(doc)) == doc
    for m, key in (("Model A", "a"), ("Model B", "b")):
        api = anomfast.evaluate(torch.stack(data[key]), torch.stack(data["y"]), methods=["max_logit", "msp", "energy"])
        entry = next(e for e in doc["models"] if e["name"] == m)
        for meth, r in api.items():
            got = entry["results"][meth]
            for k in ("auroc", "ap", "fpr95", "f1"):
                assert got[k] == pytest.approx(getattr(r, k), abs=0, rel=1e-15)
                assert f"{100 * getattr(r, k):.1f}" in md
            assert float(got["threshold"]) == r.threshold
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) >= 4 and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    # re-finalize from the saved histograms with another convention, without the logits
    out2 = tmp_path / "out2"
    assert main(["report", "--histograms", str(out / "histograms.npz"), "--out", str(out2), "--no-plots",
                 "--fpr-mode", "interp"]) == 0
    doc2 = json.loads((out2 / "results.json").read_text())
    assert doc2["conventions"]["fpr_mode"] == "interp"
    assert doc2["models"][0]["results"]["max_logit"]["auroc"] == doc["models"][0]["results"]["max_logit"]["auroc"]


@pytest.mark.parametrize("breakage, message", [
    ("missing_label", "no logits file"),
    ("wrong_shape", "expected (C, 16, 20)"),
    ("unknown_method", "unknown method"),
])
def test_bad_grid_fails_fast_with_clear_message(tmp_path, rng, breakage, message):
    make_grid(tmp_path, rng)
    args = ["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "o"), "--quiet"]
    if breakage == "missing_label":
        (tmp_path / "a" / "img9.npy").write_bytes((tmp_path / "a" / "img0.npy").read_bytes())
        message = "have no label map"
    elif breakage == "wrong_shape":
        np.save(tmp_path / "a" / "img0.npy", np.zeros((5, 16, 21), np.float32))
    else:
        args += ["--methods", "max_logit,bogus"]
    r = subprocess.run([sys.executable, "-m", "anomfast", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)  # not the repo root: its source tree has no compiled core
    assert r.returncode != 0
    assert message in r.stderr and r.stderr.count("\n") <= 2, r.stderr
    assert not (tmp_path / "o" / "report.md").exists()
