"""The command line and the API as a newcomer meets them (issue 15) and the CLI / input
hardening cases of issue 13: every broken or silent case is run as a user would (a
subprocess, its exit code and its one-line message), and each failed before its fix."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

import numpy as np
import pytest
import torch

import anomfast
from conftest import random_labels, random_logits
from test_cli import make_grid, make_heat_grid

REPO = pathlib.Path(__file__).resolve().parents[1]


def cli(*args, cwd, block=(), timeout=180, env=None):
    """`python -m anomfast ARGS` in `cwd`; `block`: modules made unimportable, as in an
    install without them."""
    if block:
        code = ("import sys\nfor m in %r: sys.modules[m] = None\nfrom anomfast.cli import main\n"
                "sys.argv[0] = 'anomfast'\nraise SystemExit(main(sys.argv[1:]))" % (list(block),))
        cmd = [sys.executable, "-c", code, *map(str, args)]
    else:
        cmd = [sys.executable, "-m", "anomfast", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=dict(os.environ, **(env or {})))


def one_line_error(r, *needles):
    """Exit 2 and a single stderr line holding every needle (no traceback)."""
    err = r.stderr.strip()
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert err.count("\n") == 0 and err.startswith("anomfast: error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


def grid_args(tmp_path, *extra):
    return ["eval", "--grid", tmp_path / "grid.toml", "--out", tmp_path / "o", "--quiet", *extra]


# ------------------------------------------------------------------ from the repository root

@pytest.mark.skipif(not (REPO / "anomfast" / "__init__.py").is_file(), reason="needs the source tree")
@pytest.mark.slow
def test_repo_root_commands_use_the_installed_package(tmp_path, rng):
    """From the repository root the source folder comes first on sys.path; it has no
    compiled core and once failed with a circular-import ImportError."""
    r = cli("info", "--json", cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["version"] == anomfast.__version__
    r = subprocess.run([sys.executable, "-c", "import anomfast; print(anomfast.evaluate.__name__)"],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "evaluate", r.stderr[-2000:]
    make_grid(tmp_path, rng)  # the README's torchrun command, from the repository root
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "anomfast", "eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "d"),
                        "--quiet", "--no-plots", "--distributed"], capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "d" / "report.md").is_file()


def test_source_checkout_without_any_build_says_what_to_do(tmp_path):
    """No installed copy to hand over to (python -S: no site-packages): one line."""
    shutil.copytree(pathlib.Path(anomfast.__file__).parent, tmp_path / "anomfast",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    r = subprocess.run([sys.executable, "-S", "-m", "anomfast", "info"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "source checkout without the compiled core" in r.stderr and "pip install" in r.stderr
    r = subprocess.run([sys.executable, "-S", "-c", "import anomfast"], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("ImportError: anomfast:")


def test_editable_install_layout_imports_its_own_source(tmp_path):
    """`pip install -e .` (scikit-build-core's redirect mode): the package is the source
    folder, without a _C file, and an import hook maps anomfast._C to the built core.
    Imitated here with a meta path finder: the source copy must import and run, not hand
    over to another installed copy or stop with 'source checkout without the compiled core'
    (which it did while the check was a glob for _C files in the folder)."""
    src = tmp_path / "src"
    shutil.copytree(pathlib.Path(anomfast.__file__).parent, src / "anomfast",
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    core = str(next(pathlib.Path(anomfast.__file__).parent.glob("_C.*")))
    code = f"""
import importlib.abc, importlib.util, sys
class Redirect(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_file_location(name, {core!r}) if name == "anomfast._C" else None
sys.meta_path.insert(0, Redirect())
sys.path.insert(0, {str(src)!r})
import anomfast, torch
assert anomfast.__file__.startswith({str(src)!r}), anomfast.__file__
r = anomfast.evaluate(torch.randn(1, 3, 8, 8), (torch.rand(1, 8, 8) < 0.3).to(torch.uint8))
print("ok", r["max_logit"].auroc)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr[-2000:]


# ------------------------------------------------------------------ optional dependencies, outputs

def test_demo_without_scikit_learn_stops_at_once(tmp_path):
    r = cli("eval", "--out", tmp_path / "x", "--cache", tmp_path / "cache", cwd=tmp_path, block=["sklearn"],
            timeout=120)
    one_line_error(r, "scikit-learn", "pip install")
    assert not (tmp_path / "x").exists() and not (tmp_path / "cache").exists()


def test_plots_without_matplotlib_stop_before_any_work(tmp_path, rng):
    make_grid(tmp_path, rng)
    r = cli(*grid_args(tmp_path), cwd=tmp_path, block=["matplotlib"])
    one_line_error(r, "matplotlib", "--no-plots", "pip install")
    assert not (tmp_path / "o").exists()
    r = cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path, block=["matplotlib"])
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("case", ["parent_is_file", "out_is_file"])
def test_out_that_cannot_be_written_fails_before_the_work(tmp_path, rng, case):
    make_grid(tmp_path, rng)
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" / "sub" if case == "parent_is_file" else tmp_path / "f"
    r = cli("eval", "--grid", tmp_path / "grid.toml", "--out", out, "--no-plots", cwd=tmp_path)
    one_line_error(r, "--out", str(tmp_path / "f"))
    assert "img" not in r.stderr  # no progress line: nothing was evaluated
    r = cli("report", "--histograms", tmp_path / "grid.toml", "--out", out, "--no-plots", cwd=tmp_path)
    one_line_error(r, "--out")


# ------------------------------------------------------------------ report from saved histograms

def test_report_reads_a_save_histograms_file(tmp_path, rng):
    x, y = random_logits(rng, 2, 5, 12, 14), random_labels(rng, 2, 12, 14, p_anomaly=0.2)
    res = anomfast.evaluate(x, y, methods=["energy", "max_logit", "msp"])
    anomfast.save_histograms(tmp_path / "h.npz", res.histograms)
    hists, meta = anomfast.load_histograms(tmp_path / "h.npz")   # (dict, meta), as the README says
    assert set(hists) == {"energy", "max_logit", "msp"} and meta == {}
    r = cli("report", "--histograms", tmp_path / "h.npz", "--out", tmp_path / "o", "--no-plots", "--quiet",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["h"]
    assert doc["methods"] == ["max_logit", "msp", "energy"]   # the seed table's order
    for k, v in doc["models"][0]["results"].items():
        assert v["auroc"] == res[k].auroc
    assert "Maximum Softmax Probability" in (tmp_path / "o" / "report.md").read_text()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "inconsistent", "empty"])
def test_report_refuses_damaged_histogram_files(tmp_path, rng, damage):
    x, y = random_logits(rng, 2, 5, 12, 14), random_labels(rng, 2, 12, 14, p_anomaly=0.2)
    res = anomfast.evaluate(x, y, methods=["energy"])
    p = tmp_path / "histograms.npz"
    if damage == "inconsistent":  # metadata lists a model the file holds no histogram for
        anomfast.save_histograms(p, {"A::energy": res.histograms["energy"]}, extra={"models": [{"name": "B"}]})
    elif damage == "empty":
        anomfast.save_histograms(p, {})
    else:
        anomfast.save_histograms(p, {"A::energy": res.histograms["energy"]})
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"PK\x03\x04" + bytes(200))
    r = cli("report", "--histograms", p, "--out", tmp_path / "o", "--no-plots", cwd=tmp_path)
    one_line_error(r, str(p))
    assert not (tmp_path / "o" / "report.md").exists()


# ------------------------------------------------------------------ label mapping

@pytest.mark.parametrize("masks", ["0_255", "no_normal"])
def test_a_model_without_anomaly_or_normal_pixels_fails(tmp_path, rng, masks):
    from PIL import Image
    make_grid(tmp_path, rng)
    for f in (tmp_path / "labels").iterdir():
        y = np.array(Image.open(f))
        y = np.where(y == 0, 0, 255) if masks == "0_255" else np.where(y == 0, 1, y)
        Image.fromarray(y.astype(np.uint8)).save(f)
    args = ["eval", "--logits", tmp_path / "a", "--labels", tmp_path / "labels", "--out", tmp_path / "o",
            "--quiet", "--no-plots"]
    r = cli(*args, cwd=tmp_path)
    one_line_error(r, "no anomaly pixel" if masks == "0_255" else "no normal pixel", "anomaly_ids [1]",
                   "--anomaly-ids", "--void-ids", "label values seen: 0:" if masks == "0_255" else "1:")
    r = cli(*args, "--allow-empty-class", cwd=tmp_path)
    assert r.returncode == 0 and "warning" in r.stderr, r.stderr[-2000:]
    if masks == "0_255":  # the mapping the message suggests
        r = cli(*args, "--anomaly-ids", "255", "--void-ids", cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        auroc = json.loads((tmp_path / "o" / "results.json").read_text())["models"][0]["results"]["energy"]["auroc"]
        assert 0 <= auroc <= 1


def test_labels_without_logits_is_an_error_not_the_demo(tmp_path, rng):
    make_grid(tmp_path, rng)
    r = cli("eval", "--labels", tmp_path / "labels", "--out", tmp_path / "o", cwd=tmp_path,
            env={"ANOMFAST_CACHE": str(tmp_path / "cache")}, timeout=60)
    one_line_error(r, "--labels", "--logits")
    assert not (tmp_path / "cache").exists()


# ------------------------------------------------------------------ class counts, NaN, layouts

def test_class_count_must_match_in_every_file(tmp_path, rng):
    make_grid(tmp_path, rng, n=5)
    np.save(tmp_path / "a" / "img2.npy", random_logits(rng, 1, 4, 16, 20)[0].numpy())  # the middle image
    one_line_error(cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path), "img2.npy", "C = 4", "img0.npy")


def test_sml_class_count_names_the_file(tmp_path, rng):
    make_grid(tmp_path, rng)
    anomfast.fit_sml(random_logits(rng, 2, 6, 8, 8)).save(tmp_path / "sml.npz")   # 6 classes, logits have 5
    r = cli("eval", "--logits", tmp_path / "a", "--labels", tmp_path / "labels", "--sml-stats", tmp_path / "sml.npz",
            "--out", tmp_path / "o", "--quiet", "--no-plots", cwd=tmp_path)
    one_line_error(r, "img0.npy", "C = 5", "sml.npz", "for 6")


def test_nonfinite_flag_and_file_name(tmp_path, rng):
    make_grid(tmp_path, rng)
    x = np.load(tmp_path / "a" / "img1.npy")
    x[:, 0, 0] = np.nan   # pixel (0, 0) is labelled normal
    np.save(tmp_path / "a" / "img1.npy", x)
    r = cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path)
    one_line_error(r, "img1.npy", "NaN", "--nonfinite ignore")
    r = cli(*grid_args(tmp_path, "--no-plots", "--nonfinite", "ignore"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    pixels = json.loads((tmp_path / "o" / "results.json").read_text())["models"][0]["pixels"]
    assert pixels["nonfinite"] == 1


def test_channel_last_logits_are_named_as_such(tmp_path, rng):
    x, y = random_logits(rng, 2, 5, 12, 14), random_labels(rng, 2, 12, 14)
    with pytest.raises(ValueError, match=r"channel-last \(B, H, W, C\) with C = 5"):
        anomfast.evaluate(np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), y.numpy())
    make_grid(tmp_path, rng)
    np.save(tmp_path / "a" / "img0.npy", np.moveaxis(np.load(tmp_path / "a" / "img0.npy"), 0, -1))
    one_line_error(cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path), "img0.npy", "channel-last")


# ------------------------------------------------------------------ API: iterables, classes, compute()

def test_evaluate_accepts_an_iterable_of_pairs(rng):
    x, y = random_logits(rng, 4, 5, 10, 12), random_labels(rng, 4, 10, 12, p_anomaly=0.2)
    ref = anomfast.evaluate(x, y, methods=["energy", "msp"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
    for data in (loader, [(x[:2], y[:2]), [x[2:], y[2:]]]):
        got = anomfast.evaluate(data, methods=["energy", "msp"])
        for k in ("energy", "msp"):
            assert got[k].auroc == ref[k].auroc and got.histograms[k] == ref.histograms[k]
    with pytest.raises(TypeError, match="needs labels"):
        anomfast.evaluate(x)


def test_class_count_consistent_across_batches_and_updates(rng):
    y = random_labels(rng, 1, 8, 8)
    xs = [random_logits(rng, 1, C, 8, 8) for C in (5, 4, 5)]
    with pytest.raises(ValueError, match=r"batch 1: logits have C = 4 classes but batch 0 had C = 5"):
        anomfast.evaluate(xs, [y, y, y])
    with pytest.raises(ValueError, match=r"batch 1: logits have C = 4"):
        anomfast.evaluate(list(zip(xs, [y, y, y])))
    ev = anomfast.Evaluator(methods=["energy"])
    ev.update(xs[0], y)
    with pytest.raises(ValueError, match=r"C = 4 classes but earlier update\(\) calls"):
        ev.update(xs[1], y)
    ev.reset()
    ev.update(xs[1], y)   # a reset starts afresh


def test_compute_without_data_raises_before_and_after_reset(rng):
    x, y = random_logits(rng, 1, 5, 8, 8), random_labels(rng, 1, 8, 8, p_anomaly=0.3)
    ev = anomfast.Evaluator(methods=["energy"])
    with pytest.raises(RuntimeError, match="before any update"):
        ev.compute()
    ev.update(x, y)
    assert 0 <= ev.compute()["energy"].auroc <= 1
    ev.reset()
    with pytest.raises(RuntimeError, match="no data"):
        ev.compute()


# ------------------------------------------------------------------ per-model methods

def test_heat_is_kept_for_the_models_that_have_features(tmp_path, rng):
    make_heat_grid(tmp_path, rng)
    g = tmp_path / "grid.toml"
    g.write_text(g.read_text() + '[[models]]\nname = "Plain"\nlogits = "m/logits"\n')
    r = cli("eval", "--grid", g, "--out", tmp_path / "o", "--no-plots", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "heat is not evaluated for model 'Plain'" in r.stderr and "features" in r.stderr
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    got = {m["name"]: list(m["results"]) for m in doc["models"]}
    assert got == {"M": ["max_logit", "msp", "sml", "energy", "heat"], "Plain": ["max_logit", "msp", "energy"]}
    md = (tmp_path / "o" / "report.md").read_text()
    assert "| Plain | " in md and " | - |" in md      # the cell Plain has no HEAT for
    # methods per model in the grid
    g.write_text(g.read_text().replace('name = "Plain"\n', 'name = "Plain"\nmethods = ["energy"]\n'))
    r = cli("eval", "--grid", g, "--out", tmp_path / "o2", "--no-plots", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "o2" / "results.json").read_text())
    assert {m["name"]: list(m["results"]) for m in doc["models"]}["Plain"] == ["energy"]


# ------------------------------------------------------------------ unreadable inputs (issue 13)

def _png_header_only(path, w, h):
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("case", ["pt_not_tensor", "png_truncated", "png_garbage", "png_bomb", "npy_truncated",
                                  "npy_truncated_middle", "safetensors_header", "model_name_colons"])
def test_unreadable_inputs_are_one_line_errors(tmp_path, rng, case):
    make_grid(tmp_path, rng)
    g = tmp_path / "grid.toml"
    a, lab = tmp_path / "a", tmp_path / "labels"
    name = "img1"
    if case == "pt_not_tensor":
        (a / "img1.npy").unlink()
        torch.save(datetime.date(2024, 1, 1), a / "img1.pt")
        name = "img1.pt"
    elif case == "png_truncated":
        data = (lab / "img1.png").read_bytes()
        (lab / "img1.png").write_bytes(data[: len(data) // 2])
        name = "img1.png"
    elif case == "png_garbage":
        (lab / "img0.png").write_bytes(b"this is not a png" * 10)
        name = "img0.png"
    elif case == "png_bomb":
        _png_header_only(lab / "img0.png", 60000, 60000)
        name = "img0.png"
    elif case in ("npy_truncated", "npy_truncated_middle"):
        f = a / ("img0.npy" if case == "npy_truncated" else "img2.npy")
        f.write_bytes(f.read_bytes()[:-50])
        name = f.name
    elif case == "safetensors_header":
        (a / "img1.npy").unlink()
        (a / "img1.safetensors").write_bytes(struct.pack("<Q", 40) + b"{not json" + bytes(40))
        name = "img1.safetensors"
    elif case == "model_name_colons":
        g.write_text(g.read_text().replace('"Model A"', '"Model::A"'))
        name = "'::'"
    one_line_error(cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path), name)
    assert not (tmp_path / "o" / "report.md").exists()


def test_safetensors_without_the_package(tmp_path, rng):
    make_grid(tmp_path, rng)
    (tmp_path / "a" / "img0.npy").rename(tmp_path / "a" / "img0.safetensors")  # never opened: the package is missing
    r = cli(*grid_args(tmp_path, "--no-plots"), cwd=tmp_path, block=["safetensors", "safetensors.numpy"])
    one_line_error(r, "img0.safetensors", "pip install safetensors")


def test_name_with_colons_on_the_command_line(tmp_path, rng):
    make_grid(tmp_path, rng)
    r = cli("eval", "--logits", tmp_path / "a", "--labels", tmp_path / "labels", "--name", "a::b", "--out",
            tmp_path / "o", "--no-plots", cwd=tmp_path)
    one_line_error(r, "'::'")


# ------------------------------------------------------------------ friction

def test_glob_subset_needs_intersect(tmp_path, rng):
    make_grid(tmp_path, rng)
    base = ["eval", "--logits", str(tmp_path / "a" / "img[0-1].npy"), "--labels", tmp_path / "labels",
            "--out", tmp_path / "o", "--no-plots", "--quiet"]
    one_line_error(cli(*base, cwd=tmp_path), "no logits file for 2 image(s)", "--intersect")
    r = cli(*base, "--intersect", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "o" / "results.json").read_text())["models"][0]["images"] == 2


def test_help_texts():
    r = cli("eval", "--help", cwd="/")
    assert r.returncode == 0
    assert ".py" not in r.stdout
    import anomfast.cli.app as c  # every option has a help text
    for action in c.build_parser()._subparsers._group_actions[0].choices["eval"]._actions:
        assert action.help, action.option_strings


def test_report_text_order_tex_and_messages(tmp_path, rng):
    make_grid(tmp_path, rng)
    out = tmp_path / "o"
    r = cli("eval", "--grid", tmp_path / "grid.toml", "--out", out, "--methods", "energy,msp,max_logit",
            "--plot-format", "png,pdf,svg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (out / "report.md").read_text()
    assert "| Model | Simple Max Logits | Maximum Softmax Probability | Energy Score |" in md
    assert "{" not in md and "'fpr_mode'" not in md     # no Python dict printout
    tex = (out / "report.tex").read_text()
    assert tex.count("\\begin{tabular}") == 4 and "Optimal Thresholds" in tex
    assert "finalizing" in r.stderr and "plotting" in r.stderr   # status while finalizing / plotting
    for stem in ("curves_model_a", "scores_model_a", "examples_model_a"):
        assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"{stem}.pdf").read_bytes()[:5] == b"%PDF-"
        assert b"<svg" in (out / f"{stem}.svg").read_bytes()[:2000]


def test_plots_for_a_paper(rng):
    """ROC on a log FPR axis with a marker at TPR 95%, PR with its chance line and no
    point at recall 0, MSP as 1 - MSP on a log axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from anomfast.cli import plots
    x, y = random_logits(rng, 2, 5, 24, 48), random_labels(rng, 2, 24, 48, p_anomaly=0.2)
    res = anomfast.evaluate(x, y, methods=["msp", "energy"])
    maps = anomfast.score_maps(x, methods=["msp", "energy"])
    model = {"name": "M", "results": dict(res), "histograms": res.histograms,
             "examples": [{"stem": "s0", "labels": y[0].numpy(), "image": np.zeros((24, 48), np.uint8),
                           "maps": {k: v[0].numpy() for k, v in maps.items()}}]}
    fig = plots._curves(plt, model, roc_log=True)
    roc, pr = fig.axes[:2]
    assert roc.get_xscale() == "log"
    markers = [ln for ln in roc.lines if ln.get_marker() == "o"]
    assert len(markers) == 2 and all(ln.get_ydata()[0] == 0.95 for ln in markers)
    assert any(ln.get_xdata()[0] == res["energy"].fpr95 for ln in markers)
    prevalence = res["energy"].n_pos / (res["energy"].n_pos + res["energy"].n_neg)
    assert any("chance" in ln.get_label() and np.allclose(ln.get_ydata(), prevalence) for ln in pr.lines)
    assert all(ln.get_xdata().min() > 0 for ln in pr.lines if "AP" in ln.get_label())
    plt.close(fig)
    fig = plots._distributions(plt, model)
    msp = next(a for a in fig.axes if a.get_title() == "Maximum Softmax Probability")
    assert msp.get_xscale() == "log" and "1 - MSP" in msp.get_xlabel() and msp.get_ylabel()
    plt.close(fig)
    fig = plots._examples(plt, model)  # one mosaic image, titles as texts over it
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["input", "ground truth", "Maximum Softmax Probability", "Energy Score", "s0"]
    assert len(fig.axes) == 1 + 2   # the mosaic's text axes and a colorbar per map
    mosaic, xo, yo = fig.anomfast_mosaic  # placed by the writer
    colours = {tuple(c) for c in mosaic.reshape(-1, 3)}
    void = (y[0].numpy() == 255).any()
    assert (255, 127, 14) in colours and ((200, 200, 200) in colours) == bool(void)  # anomaly orange, void grey
    # the PNG writer pastes the mosaic where figimage places it, pixel for pixel
    out = pathlib.Path(tempfile.mkdtemp())
    w = plots._Writer()
    w.save(fig, out, "ex", ("png", "svg"))
    w.close()
    from PIL import Image
    pasted = np.asarray(Image.open(out / "ex.png"))
    assert not fig.images  # the vector format's figimage was taken out again
    fig.figimage(mosaic, xo=xo, yo=yo, origin="upper")
    fig.set_dpi(plots._Writer.PNG_DPI)
    fig.canvas.draw()
    drawn = np.asarray(fig.canvas.buffer_rgba())
    assert pasted.shape == drawn.shape and (pasted == drawn).all()
    assert b"<image" in (out / "ex.svg").read_bytes()
    plt.close(fig)


def test_help_and_missing_inputs_come_before_torch(tmp_path):
    """`anomfast --help`, `anomfast eval --help` and a missing input path need neither torch
    nor the compiled core (torch made unimportable here; matplotlib too for the help texts):
    they answer at once instead of after ~2 s of imports; `import anomfast` is lazy too."""
    for args in (["--help"], ["eval", "--help"]):
        r = cli(*args, cwd=tmp_path, block=("torch", "matplotlib"))
        assert r.returncode == 0 and "eval" in r.stdout, r.stderr[-2000:]
    r = cli("eval", "--logits", tmp_path / "none", "--labels", tmp_path / "none2", "--out", tmp_path / "o",
            cwd=tmp_path, block=("torch",))
    one_line_error(r, "--logits", "does not exist")
    code = ("import sys; sys.modules['torch'] = None\nimport anomfast\nprint(sorted(anomfast.__all__)[:2])\n"
            "try:\n    anomfast.evaluate\nexcept ImportError:\n    print('evaluate needs torch')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 0 and "evaluate needs torch" in r.stdout, r.stderr[-2000:]


@pytest.mark.skipif(not (REPO / "CMakeLists.txt").is_file(), reason="needs the source tree")
def test_cuda_build_decision_is_made_at_configure_time_and_reported(tmp_path):
    """ANOMFAST_CUDA=AUTO builds the CUDA core only where nvcc and a CUDA driver / GPU are
    both present; ON forces it (CI); the decision is what `anomfast info` prints."""
    import shutil
    cmake = shutil.which("cmake")
    if cmake is None:
        try:
            import cmake as _cm  # the cmake wheel (build requirement)
            cmake = str(pathlib.Path(_cm.CMAKE_BIN_DIR) / "cmake")
        except ImportError:
            pytest.skip("no cmake")
    pybind11 = pytest.importorskip("pybind11")
    info = anomfast.build_info()
    assert isinstance(info.get("cuda_build"), str) and info["cuda_build"].startswith("ANOMFAST_CUDA=")
    gpu_here = shutil.which("nvidia-smi") is not None or pathlib.Path("/dev/nvidia0").exists()
    nvcc = shutil.which("nvcc") is not None or pathlib.Path("/usr/local/cuda/bin/nvcc").exists()

    def decision(mode, env_mode=None):
        env = {k: v for k, v in os.environ.items() if k != "ANOMFAST_CUDA"}
        if env_mode:
            env["ANOMFAST_CUDA"] = env_mode
        args = [cmake, "-S", str(REPO), "-B", str(tmp_path / f"{mode}-{env_mode}"), "-DSKBUILD_PROJECT_VERSION=0.0.0",
                f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"] + ([f"-DANOMFAST_CUDA={mode}"] if mode else [])
        r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
        lines = [ln for ln in r.stdout.splitlines() if "anomfast: ANOMFAST_CUDA=" in ln]
        return r.returncode, lines[0].split("anomfast: ", 1)[1] if lines else r.stdout[-1500:] + r.stderr[-1500:]

    rc, said = decision("OFF")
    assert rc == 0 and said == "ANOMFAST_CUDA=OFF: CPU core only", said
    rc, said = decision("AUTO")
    assert rc == 0, said
    if not nvcc:
        assert "no CUDA compiler found" in said
    elif not gpu_here:
        assert "no CUDA driver / GPU visible, CPU core only" in said, said
    else:
        assert "CUDA core built" in said, said
    if nvcc:  # the environment variable works as .ci/run uses it, and wins over the default
        rc, said = decision(None, env_mode="ON")
        assert rc == 0 and said == "ANOMFAST_CUDA=ON: CUDA core built (forced)", said
