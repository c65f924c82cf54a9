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
LABELS_TOML = '[labels]\ndir = "labels"\nanomaly_ids = [1]\nvoid_ids = [255]\nnormal_ids = [0]\n'


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
        LABELS_TOML +
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
    # the definitions in the file are those the numbers were computed under
    assert "np.interp" in doc2["definitions"]["fpr95"] and "np.interp" not in doc["definitions"]["fpr95"]
    assert doc2["models"][0]["results"]["max_logit"]["auroc"] == doc["models"][0]["results"]["max_logit"]["auroc"]


def test_eval_refine_matches_the_python_api(tmp_path, rng):
    """--refine: the CLI's second pass over the files gives the API's refine=True numbers
    (FPR95, F1 and both thresholds exact), and the JSON says so."""
    data = make_grid(tmp_path, rng)
    out = tmp_path / "out"
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
                 "--methods", "max_logit,msp,energy", "--refine"]) == 0
    doc = json.loads((out / "results.json").read_text())
    for m, key in (("Model A", "a"), ("Model B", "b")):
        api = anomfast.evaluate(torch.stack(data[key]), torch.stack(data["y"]), methods=["max_logit", "msp", "energy"],
                                refine=True)
        entry = next(e for e in doc["models"] if e["name"] == m)
        for meth, r in api.items():
            got = entry["results"][meth]
            assert "refine" in got["definitions"]
            for k in ("fpr95", "f1", "threshold", "fpr95_threshold", "auroc", "ap"):
                assert float(got[k]) == pytest.approx(getattr(r, k), abs=0, rel=1e-15), (m, meth, k)


@pytest.mark.parametrize("breakage, message", [
    ("missing_label", "no logits file"),
    ("wrong_shape", "expected (C, 16, 20)"),
    ("unknown_method", "unknown method"),
    ("labels_key_typo", "unknown key(s) ['void_id'] in [labels]"),
    ("unknown_top_level_key", "unknown key(s) or table(s) ['bogus']"),
    ("unexpected_label_value", "label map img2.png: value 7 is in none of [labels]'"),
    ("no_cuda", "no usable CUDA GPU"),
])
def test_bad_grid_fails_fast_with_clear_message(tmp_path, rng, breakage, message):
    from PIL import Image
    make_grid(tmp_path, rng)
    grid = tmp_path / "grid.toml"
    args = ["eval", "--grid", str(grid), "--out", str(tmp_path / "o"), "--quiet"]
    if breakage == "missing_label":
        (tmp_path / "a" / "img9.npy").write_bytes((tmp_path / "a" / "img0.npy").read_bytes())
        message = "have no label map"
    elif breakage == "wrong_shape":
        np.save(tmp_path / "a" / "img0.npy", np.zeros((5, 16, 21), np.float32))
    elif breakage == "labels_key_typo":  # once silently the default [255]
        grid.write_text(grid.read_text().replace("void_ids", "void_id"))
    elif breakage == "unknown_top_level_key":
        grid.write_text("bogus = 1\n" + grid.read_text())
    elif breakage == "unexpected_label_value":  # once silently a normal pixel when anomaly_ids was given
        grid.write_text(grid.read_text().replace("normal_ids = [0]\n", ""))
        y = np.array(Image.open(tmp_path / "labels" / "img2.png"))
        y[3, 4] = 7
        Image.fromarray(y).save(tmp_path / "labels" / "img2.png")
    elif breakage == "no_cuda":
        if torch.cuda.is_available():
            pytest.skip("this machine has a CUDA GPU")
        args += ["--device", "cuda"]
    else:
        args += ["--methods", "max_logit,bogus"]
    r = subprocess.run([sys.executable, "-m", "anomfast", *args], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)  # not the repo root: its source tree has no compiled core
    assert r.returncode != 0
    assert message in r.stderr and r.stderr.count("\n") <= 2, r.stderr
    assert not (tmp_path / "o" / "report.md").exists()


def test_eval_logits_labels_normal_ids(tmp_path, rng):
    """--logits/--labels: a label value in no list is an error by default (as in the API),
    counted as normal with --normal-ids rest, and equal to mapping it to 0 by hand."""
    from PIL import Image
    make_grid(tmp_path, rng)
    y = np.array(Image.open(tmp_path / "labels" / "img1.png"))
    y[y == 0] = 7
    Image.fromarray(y).save(tmp_path / "labels" / "img1.png")
    base = ["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--quiet", "--no-plots",
            "--methods", "max_logit,energy"]
    assert main(base + ["--out", str(tmp_path / "o1")]) == 2
    assert main(base + ["--out", str(tmp_path / "o2"), "--normal-ids", "rest"]) == 0
    assert main(base + ["--out", str(tmp_path / "o3"), "--normal-ids", "0", "7"]) == 0
    assert main(base + ["--out", str(tmp_path / "o4"), "--normal-ids", "zero"]) == 2
    r2 = json.loads((tmp_path / "o2" / "results.json").read_text())["models"]
    r3 = json.loads((tmp_path / "o3" / "results.json").read_text())["models"]
    assert r2 == r3 and r2[0]["results"]["energy"]["auroc"] > 0


def make_heat_grid(tmp_path, rng, n=4, n_fit=3, H=16, W=20, C=5, D=6):
    """A one-model grid with per-image features and HEAT fitting data on disk."""
    from PIL import Image
    data = {"x": [], "y": [], "f": [], "fx": [], "ff": [], "fs": []}
    for d in ("labels", "m/logits", "m/features", "m/fit/logits", "m/fit/features", "m/fit/semantic"):
        (tmp_path / d).mkdir(parents=True)
    for i in range(n):
        y = random_labels(rng, 1, H, W, p_anomaly=0.2, p_void=0.1)[0]
        y[0, 0], y[0, 1] = 0, 1
        Image.fromarray(y.numpy()).save(tmp_path / "labels" / f"img{i}.png")
        x = random_logits(rng, 1, C, H, W)[0]
        f = torch.randn(D, H // 4, W // 4, generator=rng)
        np.save(tmp_path / "m/logits" / f"img{i}.npy", x.numpy())
        np.save(tmp_path / "m/features" / f"img{i}.npy", f.numpy())
        data["x"].append(x), data["y"].append(y), data["f"].append(f)
    for i in range(n_fit):
        x = random_logits(rng, 1, C, H, W)[0]
        f = torch.randn(D, H // 4, W // 4, generator=rng)
        s = torch.randint(0, C, (H, W), generator=rng, dtype=torch.int64).to(torch.uint8)
        s[torch.rand(H, W, generator=rng) < 0.1] = 255
        np.save(tmp_path / "m/fit/logits" / f"fit{i}.npy", x.numpy())
        np.save(tmp_path / "m/fit/features" / f"fit{i}.npy", f.numpy())
        Image.fromarray(s.numpy()).save(tmp_path / "m/fit/semantic" / f"fit{i}.png")
        data["fx"].append(x), data["ff"].append(f), data["fs"].append(s.to(torch.int64))
    (tmp_path / "grid.toml").write_text(
        LABELS_TOML +
        '[[models]]\nname = "M"\nlogits = "m/logits"\nfeatures = "m/features"\nfit_logits = "m/fit/logits"\n'
        'fit_features = "m/fit/features"\nfit_semantic = "m/fit/semantic"\n')
    return data


def test_eval_heat_grid_matches_python_api_and_fit_command(tmp_path, rng):
    data = make_heat_grid(tmp_path, rng)
    out = tmp_path / "out"
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots"]) == 0
    doc = json.loads((out / "results.json").read_text())
    got = doc["models"][0]["results"]
    assert set(got) == {"max_logit", "msp", "energy", "sml", "heat"}   # defaults: every method the grid supports
    heat = anomfast.fit_heat([x[None] for x in data["fx"]], [f[None] for f in data["ff"]],
                             [s[None] for s in data["fs"]])
    api = anomfast.evaluate(torch.stack(data["x"]), torch.stack(data["y"]), methods=["heat", "energy"],
                            features=torch.stack(data["f"]), heat=heat)
    for meth in ("heat", "energy"):
        for k in ("auroc", "ap", "fpr95", "f1", "threshold"):
            assert got[meth][k] == pytest.approx(getattr(api[meth], k), abs=0, rel=1e-12), (meth, k)
    assert got["heat"]["auroc"] != got["energy"]["auroc"]
    # anomfast fit --method heat writes the same statistics; a grid that names the file gives the same results
    assert main(["fit", "--method", "heat", "--logits", str(tmp_path / "m/fit/logits"),
                 "--features", str(tmp_path / "m/fit/features"), "--labels", str(tmp_path / "m/fit/semantic"),
                 "--out", str(tmp_path / "heat.npz")]) == 0
    loaded = anomfast.HeatStats.load(tmp_path / "heat.npz")
    np.testing.assert_allclose(loaded.precision, heat.precision, rtol=1e-12)
    assert loaded.score_mean == pytest.approx(heat.score_mean, rel=1e-12)
    out2 = tmp_path / "out2"
    assert main(["eval", "--logits", str(tmp_path / "m/logits"), "--labels", str(tmp_path / "labels"),
                 "--features", str(tmp_path / "m/features"), "--heat-stats", str(tmp_path / "heat.npz"),
                 "--methods", "heat", "--out", str(out2), "--quiet", "--no-plots"]) == 0
    got2 = json.loads((out2 / "results.json").read_text())["models"][0]["results"]["heat"]
    assert got2["auroc"] == pytest.approx(got["heat"]["auroc"], rel=1e-12)


@pytest.mark.parametrize("breakage, message", [
    ("missing_feature", "no features file for 1 image(s)"),
    ("no_features", "method 'heat' needs features"),
    ("partial_fit", "fitting HEAT needs fit_logits, fit_features and fit_semantic"),
    ("unknown_key", "unknown key(s) ['feature']"),
    ("feature_shape", "expected (D, h, w)"),
])
def test_bad_heat_grid_fails_fast(tmp_path, rng, breakage, message, capsys):
    make_heat_grid(tmp_path, rng)
    g = tmp_path / "grid.toml"
    if breakage == "missing_feature":
        (tmp_path / "m/features/img3.npy").unlink()
    elif breakage == "no_features":
        g.write_text(g.read_text().replace('features = "m/features"\n', ""))
    elif breakage == "partial_fit":
        g.write_text(g.read_text().replace('fit_semantic = "m/fit/semantic"\n', ""))
    elif breakage == "unknown_key":
        g.write_text(g.read_text().replace('features = "m/features"', 'feature = "m/features"'))
    else:
        np.save(tmp_path / "m/features/img0.npy", np.zeros((6, 4), np.float32))
    args = ["eval", "--grid", str(g), "--out", str(tmp_path / "o"), "--quiet"]
    if breakage == "no_features":
        args += ["--methods", "energy,heat"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_torchrun_distributed_equals_single_process(tmp_path, rng):
    """`torchrun --nproc_per_node=2 -m anomfast eval --distributed`: images sharded over two
    gloo ranks, one all_reduce of the histograms; the report equals the single-process one
    (the histograms bit for bit, so every number)."""
    make_heat_grid(tmp_path, rng, n=5)
    single = tmp_path / "single"
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(single), "--quiet", "--no-plots"]) == 0
    dist_out = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "anomfast", "eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(dist_out),
                        "--no-plots", "--distributed"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # rank 0's progress bar counts both ranks' images against all 5 (its own share is 3)
    import re
    bars = re.findall(r"\] (\d+)/(\d+) ", r.stderr)
    assert bars and all(t == "5" for _, t in bars), r.stderr[-2000:]
    from anomfast.histogram import load_histograms
    h1, _ = load_histograms(single / "histograms.npz")
    h2, _ = load_histograms(dist_out / "histograms.npz")
    assert set(h1) == set(h2) and len(h1) == 5
    for k in h1:
        assert torch.equal(h1[k].counts, h2[k].counts), k
    assert json.loads((single / "results.json").read_text())["models"] == \
        json.loads((dist_out / "results.json").read_text())["models"]


def test_distributed_flag_without_launcher_is_a_clear_error(tmp_path, rng, capsys, monkeypatch):
    make_grid(tmp_path, rng)
    for k in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(tmp_path / "o"), "--distributed"]) == 2
    assert "--distributed needs a launcher" in capsys.readouterr().err


def test_npy_reader_equals_np_load_and_is_thread_safe(tmp_path):
    """The CLI's .npy reader (its header parsed under a lock: CPython 3.11's AST
    constructor, which np.load's header parser uses, is not thread-safe) returns what
    np.load returns, for C / Fortran order, every header version, empty and 0-d arrays,
    from several threads at once; truncated and object files are errors naming the file."""
    from concurrent.futures import ThreadPoolExecutor
    from anomfast.cli.grid import GridError, load_array
    g = np.random.default_rng(0)
    arrays = {"c": g.standard_normal((3, 5, 7)).astype(np.float32), "f": np.asfortranarray(g.random((4, 6))),
              "u8": g.integers(0, 255, (9, 11)).astype(np.uint8), "empty": np.zeros((0, 3), np.float16),
              "scalar": np.array(7, np.int64), "be": g.random(5).astype(">f4")}
    paths = {}
    for k, a in arrays.items():
        for v in ((1, 0), (2, 0), (3, 0)):
            p = tmp_path / f"{k}_{v[0]}.npy"
            with open(p, "wb") as fh:
                np.lib.format.write_array(fh, a, version=v)
            paths[p] = a
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(load_array, list(paths) * 20))
    for (p, a), b in zip(list(paths.items()) * 20, got):
        np.testing.assert_array_equal(a, b)
        assert b.dtype == a.dtype and b.shape == a.shape and b.flags.f_contiguous == np.load(p).flags.f_contiguous
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "c_1.npy").read_bytes()[:-8])
    with pytest.raises(GridError, match="cut.npy: cannot read it .*truncated"):
        load_array(cut)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(GridError, match="obj.npy: cannot read it"):
        load_array(obj)
