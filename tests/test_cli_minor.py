"""Small command-line fixes: an --out that cannot be written fails before any work (and an
empty --out is an error), `report` says when the histograms come from a refined or
protocol run and keeps the pixel counts, and messages name the file or key at fault.
Each test failed before its fix."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anomfast
from anomfast.cli import main

from conftest import random_logits
from test_cli import make_grid, make_heat_grid


def _one_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("anomfast: error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


def _eval_args(tmp_path, out, *extra):
    return ["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
            "--methods", "max_logit,energy", *extra]


# ------------------------------------------------------------------ --out

@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
def test_out_that_cannot_be_created_fails_before_any_work(tmp_path, rng, capsys, monkeypatch):
    """/proc/x passed the old check (/proc exists and looks writable), the whole
    evaluation ran, then writing failed with "[Errno 2] ..."."""
    make_grid(tmp_path, rng)
    from anomfast.cli import runner

    def no_work(*a, **k):
        raise AssertionError("the evaluation ran before --out was found unwritable")
    monkeypatch.setattr(runner, "evaluate_grid", no_work)
    assert main(_eval_args(tmp_path, "/proc/anomfast_cli_minor/o")) == 2
    _one_error(capsys, "--out /proc/anomfast_cli_minor/o", "cannot create")
    assert main(["fit", "--logits", str(tmp_path / "a"), "--out", "/proc/anomfast_cli_minor.npz"]) == 2
    _one_error(capsys, "--out /proc/anomfast_cli_minor.npz")


def test_out_folders_created_by_a_failed_run_are_removed_and_no_probe_is_left(tmp_path, rng, capsys):
    """The check now creates --out (and writes a file in it) up front: a run that then
    fails leaves no empty folders behind, a run that succeeds no probe file."""
    make_grid(tmp_path, rng)
    np.save(tmp_path / "a" / "img3.npy", np.zeros((4, 7), np.float32))  # read late: fails after the check
    (tmp_path / "kept").mkdir()
    assert main(_eval_args(tmp_path, tmp_path / "kept" / "new" / "deeper")) == 2
    capsys.readouterr()
    assert (tmp_path / "kept").is_dir() and not (tmp_path / "kept" / "new").exists()
    (tmp_path / "ok").mkdir()
    make_grid(tmp_path / "ok", rng)
    assert main(_eval_args(tmp_path / "ok", tmp_path / "kept" / "o")) == 0
    assert not [p for p in (tmp_path / "kept" / "o").iterdir() if p.name.startswith(".")]


def test_empty_out_is_an_error(tmp_path, rng, capsys, monkeypatch):
    """--out '' used to write the report into the current folder without a word."""
    make_grid(tmp_path, rng)
    monkeypatch.chdir(tmp_path)
    assert main(_eval_args(tmp_path, "")) == 2
    _one_error(capsys, "--out", "empty")
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "histograms.npz").exists()
    assert main(["fit", "--logits", str(tmp_path / "a"), "--out", ""]) == 2
    _one_error(capsys, "--out", "empty")
    anomfast.save_histograms(tmp_path / "h.npz", {"energy": anomfast.evaluate(
        random_logits(rng, 1, 3, 4, 4), np.array([[[0, 1, 0, 1]] * 4]), methods=["energy"]).histograms["energy"]})
    assert main(["report", "--histograms", str(tmp_path / "h.npz"), "--out", "", "--no-plots"]) == 2
    _one_error(capsys, "--out", "empty")


# ------------------------------------------------------------------ report on a refined / protocol run

def test_report_on_refined_histograms_says_so_and_keeps_the_pixel_counts(tmp_path, rng, capsys):
    make_grid(tmp_path, rng)
    ev = tmp_path / "ev"
    assert main(_eval_args(tmp_path, ev, "--refine")) == 0
    _, extra = anomfast.load_histograms(ev / "histograms.npz")
    assert extra["run"]["refine"] is True and extra["run"]["protocol"] == "default"
    capsys.readouterr()
    rep = tmp_path / "rep"
    assert main(["report", "--histograms", str(ev / "histograms.npz"), "--out", str(rep), "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "anomfast: note:" in err and "--refine" in err, err
    md = (rep / "report.md").read_text()
    assert "--refine" in md and "certified bounds" in md
    doc_ev = json.loads((ev / "results.json").read_text())
    doc = json.loads((rep / "results.json").read_text())
    for a, b in zip(doc_ev["models"], doc["models"]):
        assert b["pixels"] == a["pixels"] and b["pixels"]["binned"] > 0
    assert doc["run"]["refine"] is True
    # a report of that report still says so, once
    assert main(["report", "--histograms", str(rep / "histograms.npz"), "--out", str(tmp_path / "rep2"),
                 "--no-plots", "--quiet"]) == 0
    md2 = (tmp_path / "rep2" / "report.md").read_text()
    assert md2.count("--refine") == md.count("--refine")
    # a file without the run record (older eval files, anomfast.save_histograms): as before, no note
    hists, extra = anomfast.load_histograms(ev / "histograms.npz")
    anomfast.save_histograms(tmp_path / "old.npz", hists, extra={
        "models": [{"name": m["name"], "miou": m["miou"], "images": m["images"]} for m in extra["models"]],
        "methods": extra["methods"], "notes": []})
    capsys.readouterr()
    assert main(["report", "--histograms", str(tmp_path / "old.npz"), "--out", str(tmp_path / "rep3"),
                 "--no-plots"]) == 0
    assert "note" not in capsys.readouterr().err
    assert json.loads((tmp_path / "rep3" / "results.json").read_text())["models"][0]["pixels"] is None


def test_report_on_ml4cv_histograms_says_so(tmp_path, rng, capsys):
    make_grid(tmp_path, rng)
    ev = tmp_path / "ev"
    assert main(_eval_args(tmp_path, ev, "--protocol", "ml4cv")) == 0
    capsys.readouterr()
    assert main(["report", "--histograms", str(ev / "histograms.npz"), "--out", str(tmp_path / "rep"),
                 "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert "--protocol ml4cv" in err, err
    assert "--protocol ml4cv" in (tmp_path / "rep" / "report.md").read_text()


# ------------------------------------------------------------------ messages naming the file or key

def test_fit_names_the_file_not_a_batch_number(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=5)
    np.save(tmp_path / "a" / "img3.npy", random_logits(rng, 1, 4, 16, 20)[0].numpy())
    assert main(["fit", "--logits", str(tmp_path / "a"), "--out", str(tmp_path / "s.npz")]) == 2
    err = _one_error(capsys, "img3.npy", "C = 4", "img0.npy")
    assert "batch" not in err


@pytest.mark.parametrize("breakage, needles", [
    ("features_dim", ("fit1.npy", "D = 7", "fit0.npy")),
    ("semantic_value", ("fit2", )),
])
def test_fit_heat_names_the_file(tmp_path, rng, capsys, breakage, needles):
    from PIL import Image
    make_heat_grid(tmp_path, rng)
    fit = tmp_path / "m" / "fit"
    if breakage == "features_dim":
        np.save(fit / "features" / "fit1.npy", np.zeros((7, 4, 5), np.float32))
    else:
        s = np.array(Image.open(fit / "semantic" / "fit2.png"))
        s[3, 3] = 40  # a class id the 5-class logits do not have
        Image.fromarray(s).save(fit / "semantic" / "fit2.png")
    assert main(["fit", "--method", "heat", "--logits", str(fit / "logits"), "--features", str(fit / "features"),
                 "--labels", str(fit / "semantic"), "--out", str(tmp_path / "h.npz")]) == 2
    err = _one_error(capsys, *needles)
    assert "batch" not in err


def test_uint64_label_map_is_named(tmp_path, rng, capsys):
    make_grid(tmp_path, rng)
    from PIL import Image
    for i in range(4):
        np.save(tmp_path / "labels" / f"img{i}.npy", np.array(Image.open(tmp_path / "labels" / f"img{i}.png")))
        (tmp_path / "labels" / f"img{i}.png").unlink()
    y = np.load(tmp_path / "labels" / "img2.npy")
    np.save(tmp_path / "labels" / "img2.npy", y.astype(np.uint64))
    assert main(_eval_args(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "img2.npy", "uint64")


@pytest.mark.parametrize("where, line, needles", [
    ("model", "logits = 5", ("model 'M'", "logits = 5", "path")),
    ("model", "sml_stats = true", ("model 'M'", "sml_stats = True", "path")),
    ("model", 'features = ""', ("model 'M'", "features = ''", "path")),
    ("labels", "dir = 5", ("[labels]", "dir = 5", "path")),
])
def test_grid_path_keys_must_be_path_strings(tmp_path, rng, capsys, where, line, needles):
    make_grid(tmp_path, rng)
    labels = '[labels]\n' + (line if where == "labels" else 'dir = "labels"') + "\n"
    model_lines = ['name = "M"', 'logits = "a"']
    if where == "model":
        model_lines = [k for k in model_lines if not line.startswith(k.split(" ")[0] + " ")] + [line]
    model = "[[models]]\n" + "\n".join(model_lines) + "\n"
    (tmp_path / "grid.toml").write_text(labels + model)
    assert main(_eval_args(tmp_path, tmp_path / "o")) == 2
    err = _one_error(capsys, *needles)
    assert "os.PathLike" not in err


# ------------------------------------------------------------------ warnings

def test_allow_empty_class_warns_once_cleanly(tmp_path, rng, capsys):
    """It also printed the library's RuntimeWarning as Python shows it ("anomfast:6:
    RuntimeWarning: ... sys.exit(main())"), with --quiet too."""
    from PIL import Image
    make_grid(tmp_path, rng)
    for f in (tmp_path / "labels").iterdir():
        y = np.array(Image.open(f))
        Image.fromarray(np.where(y == 1, 0, y).astype(np.uint8)).save(f)  # no anomaly pixel
    r = subprocess.run([sys.executable, "-m", "anomfast", *_eval_args(tmp_path, tmp_path / "o", "--allow-empty-class")],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()  # one line per model, nothing else
    assert len(lines) == 2, lines
    for line, name in zip(lines, ("Model A", "Model B")):
        assert line.startswith(f"anomfast: warning: model {name!r}: no anomaly pixel"), lines
    # report: the library's warning, once for all methods, as the CLI's own line
    assert main(["report", "--histograms", str(tmp_path / "o" / "histograms.npz"), "--out", str(tmp_path / "r"),
                 "--no-plots"]) == 0
    err = capsys.readouterr().err
    assert err.count("anomfast: warning: no anomaly (positive) pixels") == 1, err
    assert "RuntimeWarning" not in err, err
