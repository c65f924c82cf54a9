"""Command-line fixes from a fuzzing review: non-regular input files, output folder
integrity (short plot names, grey + alpha images, no half report after a failure, no two
runs mixed), fit's channel-last check, eval's semantic values, model names, feature
sizes, and clear one-line errors where tracebacks or misleading messages were. Each test
failed before its fix."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomfast.cli import main

from test_cli import make_grid, make_heat_grid


def _one_error(capsys, *needles) -> str:
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("anomfast: error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


def _eval(tmp_path, out, *extra, plots=False):
    return ["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet",
            *([] if plots else ["--no-plots"]), "--methods", "max_logit,energy", *extra]


def _cli(args, timeout=120, **kw):
    return subprocess.run([sys.executable, "-m", "anomfast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", "/"), **kw)


# ------------------------------------------------------------------ 1. non-regular files

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_among_logits_is_refused_before_reading(tmp_path, rng):
    """A FIFO used to hang the prefetch thread in open() forever."""
    make_grid(tmp_path, rng)
    (tmp_path / "a" / "img1.npy").unlink()
    os.mkfifo(tmp_path / "a" / "img1.npy")
    try:
        r = _cli(_eval(tmp_path, tmp_path / "o"), timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("anomfast eval hung on a FIFO")
    assert r.returncode == 2, r.stderr
    assert "img1.npy" in r.stderr and "FIFO" in r.stderr and "Traceback" not in r.stderr


def test_link_to_dev_zero_is_refused(tmp_path, rng, capsys):
    make_grid(tmp_path, rng)
    (tmp_path / "b" / "img2.npy").unlink()
    os.symlink("/dev/zero", tmp_path / "b" / "img2.npy")
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "img2.npy", "device", "/dev/zero")


# ------------------------------------------------------------------ 2. output integrity

def test_very_long_model_name_gets_short_plot_file_names(tmp_path, rng):
    make_grid(tmp_path, rng, n=2)
    out = tmp_path / "o"
    assert main(["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--name", "x" * 300,
                 "--out", str(out), "--quiet", "--methods", "max_logit"]) == 0
    names = [p.name for p in out.iterdir()]
    assert "report.md" in names and any(n.startswith("curves_x") for n in names)
    assert max(len(n.encode()) for n in names) < 100


def test_grey_alpha_input_image_is_shown(tmp_path, rng):
    from PIL import Image
    make_grid(tmp_path, rng, n=2)
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 20, 2), 100, np.uint8), "LA").save(tmp_path / "images" / f"img{i}.png")
    out = tmp_path / "o"
    assert main(_eval(tmp_path, out, plots=True)) == 0
    assert (out / "examples_model_a.png").is_file()


def test_failure_while_writing_leaves_no_report(tmp_path, rng, capsys, monkeypatch):
    """report.md and results were written before the plots failed, and stayed."""
    make_grid(tmp_path, rng, n=2)
    from anomfast.cli import plots

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(plots, "write_plots", broken)
    assert main(_eval(tmp_path, tmp_path / "new" / "o", plots=True)) == 2
    _one_error(capsys, "disk full")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    assert main(_eval(tmp_path, tmp_path / "kept", plots=True)) == 2
    assert list((tmp_path / "kept").iterdir()) == []


def test_sigterm_while_writing_leaves_no_report(tmp_path, rng):
    make_grid(tmp_path, rng, n=2)
    out = tmp_path / "o"
    code = ("import os, sys, time, signal\n"
            "from anomfast.cli import plots, main\n"
            "def stop(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n"
            "plots.write_plots = stop\n"
            f"sys.exit(main({_eval(tmp_path, out, plots=True)!r}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert r.returncode == 143, (r.returncode, r.stderr)
    assert "terminated" in r.stderr and not out.exists()


# ------------------------------------------------------------------ 3. reusing --out

def test_rerun_into_the_same_out_replaces_the_earlier_outputs(tmp_path, rng):
    make_grid(tmp_path, rng, n=2)
    out = tmp_path / "o"
    assert main(_eval(tmp_path, out, "--components")) == 0
    assert (out / "components.csv").is_file()
    (out / "mine.txt").write_text("the user's")
    assert main(_eval(tmp_path, out)) == 0
    assert not (out / "components.csv").exists()
    assert (out / "mine.txt").read_text() == "the user's" and (out / "report.md").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_out_inside_an_input_folder_is_refused(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=2)
    for bad in (tmp_path / "labels", tmp_path / "a" / "sub"):
        assert main(_eval(tmp_path, bad)) == 2
        _one_error(capsys, "input folder")
    assert not (tmp_path / "a" / "sub").exists() and not (tmp_path / "labels" / "report.md").exists()
    assert main(["fit", "--logits", str(tmp_path / "a"), "--out", str(tmp_path / "a" / "sml.npz")]) == 2
    _one_error(capsys, "input folder")


# ------------------------------------------------------------------ 4. fit channel-last

def test_fit_refuses_channel_last_logits(tmp_path, rng, capsys):
    (tmp_path / "l").mkdir()
    for i in range(2):
        np.save(tmp_path / "l" / f"img{i}.npy", np.random.default_rng(i).normal(size=(16, 32, 5)).astype(np.float32))
    assert main(["fit", "--logits", str(tmp_path / "l"), "--out", str(tmp_path / "s.npz")]) == 2
    _one_error(capsys, "img0.npy", "channel-last")
    assert not (tmp_path / "s.npz").exists()


def test_fit_heat_refuses_channel_last_logits_with_the_hint(tmp_path, rng, capsys):
    make_heat_grid(tmp_path, rng)
    for f in (tmp_path / "m/fit/logits").iterdir():
        np.save(f, np.moveaxis(np.load(f), 0, -1))
    assert main(["fit", "--method", "heat", "--logits", str(tmp_path / "m/fit/logits"), "--features",
                 str(tmp_path / "m/fit/features"), "--labels", str(tmp_path / "m/fit/semantic"),
                 "--out", str(tmp_path / "h.npz")]) == 2
    _one_error(capsys, "fit0.npy", "channel-last")


# ------------------------------------------------------------------ 5. mIoU values

def test_semantic_value_beyond_the_classes_is_refused(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=2)
    (tmp_path / "sem").mkdir()
    for i in range(2):
        s = np.zeros((16, 20), np.uint8)
        s[3, 3] = 255
        if i == 1:
            s[5, 5] = 7  # C = 5
        np.save(tmp_path / "sem" / f"img{i}.npy", s)
    g = (tmp_path / "grid.toml").read_text().replace("normal_ids = [0]\n", 'normal_ids = [0]\nsemantic_dir = "sem"\n')
    (tmp_path / "grid.toml").write_text(g)
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "img1.npy", "value 7")


# ------------------------------------------------------------------ 6. model names

def test_control_characters_in_model_names_are_refused(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=2)
    assert main(["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--name", "A\nB",
                 "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 2
    _one_error(capsys, "control character")
    g = (tmp_path / "grid.toml").read_text().replace('name = "Model A"', 'name = "Model\\tA"')
    (tmp_path / "grid.toml").write_text(g)
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "control character")


# ------------------------------------------------------------------ 7. feature sizes

def test_features_at_another_scale_are_refused_mixed_image_sizes_are_not(tmp_path, rng, capsys):
    make_heat_grid(tmp_path, rng)
    args = ["eval", "--grid", str(tmp_path / "grid.toml"), "--quiet", "--no-plots"]
    np.save(tmp_path / "m/features/img2.npy", np.random.default_rng(0).normal(size=(6, 8, 10)).astype(np.float32))
    assert main(args + ["--out", str(tmp_path / "o1")]) == 2
    _one_error(capsys, "img2.npy", "img0.npy")
    # another image size at the same scale (1/4) is fine
    np.save(tmp_path / "m/logits/img2.npy", np.random.default_rng(1).normal(size=(5, 32, 40)).astype(np.float32))
    y = np.zeros((32, 40), np.uint8)
    y[0, 1] = 1
    from PIL import Image
    Image.fromarray(y).save(tmp_path / "labels/img2.png")
    assert main(args + ["--out", str(tmp_path / "o2")]) == 0, capsys.readouterr().err


# ------------------------------------------------------------------ 8. tracebacks

@pytest.mark.parametrize("cmd", ["eval", "fit", "report"])
def test_out_under_an_unknown_user_is_a_clear_error(tmp_path, rng, capsys, cmd):
    make_grid(tmp_path, rng, n=2)
    out = "~anomfast_no_such_user_x/o"
    args = {"eval": _eval(tmp_path, out), "fit": ["fit", "--logits", str(tmp_path / "a"), "--out", out + ".npz"],
            "report": ["report", "--histograms", str(tmp_path / "h.npz"), "--out", out]}[cmd]
    assert main(args) == 2
    _one_error(capsys, "~anomfast_no_such_user_x")


def test_cache_expands_the_home_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "user_file.txt").write_text("x")  # not a demo cache: refused, naming the expanded path
    assert main(["eval", "--out", str(tmp_path / "o"), "--cache", "~/c", "--quiet"]) == 2
    _one_error(capsys, str(tmp_path / "c"))


def test_npy_header_claiming_a_huge_shape_is_named(tmp_path, rng, capsys):
    make_grid(tmp_path, rng)
    with open(tmp_path / "a" / "img1.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (5, 100000, 100000)})
        f.write(b"\0" * 64)
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "img1.npy", "header")


# ------------------------------------------------------------------ 9. messages

def test_fit_names_the_bad_file_first_or_later(tmp_path, capsys):
    (tmp_path / "l").mkdir()
    good = np.random.default_rng(0).normal(size=(5, 16, 32)).astype(np.float32)
    bad = np.zeros((5, 16, 32), dtype=[("a", "<f4")])
    for name in ("img0", "img2"):
        np.save(tmp_path / "l" / f"{name}.npy", good)
    np.save(tmp_path / "l" / "img1.npy", bad)
    assert main(["fit", "--logits", str(tmp_path / "l"), "--out", str(tmp_path / "s.npz")]) == 2
    _one_error(capsys, "img1.npy")
    np.save(tmp_path / "l" / "img0.npy", bad)
    np.save(tmp_path / "l" / "img1.npy", good)
    assert main(["fit", "--logits", str(tmp_path / "l"), "--out", str(tmp_path / "s.npz")]) == 2
    _one_error(capsys, "img0.npy")


def test_fit_nan_message_names_the_cli_option_which_works(tmp_path, capsys):
    (tmp_path / "l").mkdir()
    x = np.random.default_rng(0).normal(size=(5, 16, 32)).astype(np.float32)
    np.save(tmp_path / "l" / "img0.npy", x)
    x[:, 0, 0] = np.nan
    np.save(tmp_path / "l" / "img1.npy", x)
    assert main(["fit", "--logits", str(tmp_path / "l"), "--out", str(tmp_path / "s.npz")]) == 2
    err = _one_error(capsys, "img1.npy", "--nonfinite ignore")
    assert "nonfinite='ignore'" not in err
    assert main(["fit", "--logits", str(tmp_path / "l"), "--out", str(tmp_path / "s.npz"), "--nonfinite",
                 "ignore"]) == 0


def test_all_nan_logits_with_nonfinite_ignore_say_pixels_were_skipped(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=2)
    for f in (tmp_path / "a").iterdir():
        np.save(f, np.full((5, 16, 20), np.nan, np.float32))
    assert main(["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--out",
                 str(tmp_path / "o"), "--quiet", "--no-plots", "--nonfinite", "ignore"]) == 2
    _one_error(capsys, "skipped as non-finite")


def test_nan_features_error_names_the_features_file(tmp_path, rng, capsys):
    make_heat_grid(tmp_path, rng)
    f = np.load(tmp_path / "m/features/img1.npy")
    f[:] = np.nan
    np.save(tmp_path / "m/features/img1.npy", f)
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "o"), "--quiet",
                 "--no-plots"]) == 2
    _one_error(capsys, "features/img1.npy")


@pytest.mark.parametrize("toml, needle", [
    ('models = ["x"]\n[labels]\ndir = "labels"\n', "[[models]]"),
    ('models = [1]\n[labels]\ndir = "labels"\n', "[[models]]"),
    ('[labels]\ndir = "labels"\n[models]\nname = "A"\nlogits = "a"\n', "[[models]]"),
    ('[labels]\ndir = "labels"\n[[models]]\nname = "A"\nlogits = "a"\nsml_stats = "a"\n', "is a folder")])
def test_grid_structure_errors_are_clear(tmp_path, rng, capsys, toml, needle):
    make_grid(tmp_path, rng, n=2)
    (tmp_path / "grid.toml").write_text(toml)
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, needle)


def test_grid_labels_as_a_list_is_a_clear_error(tmp_path, rng, capsys):
    make_grid(tmp_path, rng, n=2)
    (tmp_path / "grid.toml").write_text('labels = ["dir"]\n[[models]]\nname = "A"\nlogits = "a"\n')
    assert main(_eval(tmp_path, tmp_path / "o")) == 2
    _one_error(capsys, "[labels] table")


def test_grid_with_a_byte_order_mark_is_read(tmp_path, rng):
    make_grid(tmp_path, rng, n=2)
    g = tmp_path / "grid.toml"
    g.write_bytes(b"\xef\xbb\xbf" + g.read_bytes())
    assert main(_eval(tmp_path, tmp_path / "o")) == 0


def test_report_with_a_non_numeric_miou_is_a_clear_error(tmp_path, rng, capsys):
    import anomfast
    make_grid(tmp_path, rng, n=2)
    assert main(_eval(tmp_path, tmp_path / "o")) == 0
    hists, extra = anomfast.load_histograms(tmp_path / "o" / "histograms.npz")
    extra["models"][0]["miou"] = "high"
    anomfast.save_histograms(tmp_path / "h.npz", hists, extra=extra)
    capsys.readouterr()
    assert main(["report", "--histograms", str(tmp_path / "h.npz"), "--out", str(tmp_path / "r"), "--no-plots"]) == 2
    _one_error(capsys, "miou")


def test_logits_dot_names_the_model_after_the_folder(tmp_path, rng, monkeypatch):
    make_grid(tmp_path, rng, n=2)
    monkeypatch.chdir(tmp_path / "a")
    out = tmp_path / "o"
    assert main(["eval", "--logits", ".", "--labels", str(tmp_path / "labels"), "--out", str(out), "--quiet",
                 "--no-plots", "--methods", "max_logit"]) == 0
    assert json.loads((out / "results.json").read_text())["models"][0]["name"] == "a"
