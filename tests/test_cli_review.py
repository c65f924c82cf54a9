"""The command line against the review's findings: a demo cache never replaces a user's
folder, .pt / .safetensors logits of every dtype (bfloat16, requires_grad) are read,
semantic label maps are matched and shape-checked, plot names and Markdown tables survive
any model name, and half-given HEAT inputs are an error or a note."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import anomfast
from anomfast.cli import demo, main

from conftest import random_labels, random_logits
from test_cli import make_grid, make_heat_grid

SMALL = dict(n_test=2, n_fit=2, train_steps=2, n_train=16, quick=True, num_threads=1)


def _tree(root):
    """{relative path: bytes} of every file under root."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_demo_cache_never_replaces_a_users_folder_or_file(tmp_path, capsys, monkeypatch, kind):
    """eval --cache DIR, DIR a non-empty folder that is not a demo cache (or a file): a
    one-line error before any work, nothing changed (the build used to replace the folder,
    deleting its files)."""
    monkeypatch.setattr(demo, "DEFAULT_N_TRAIN", 16)  # should a build start anyway: seconds, not minutes
    monkeypatch.setattr(demo, "DEFAULT_TRAIN_STEPS", 2)
    user = tmp_path / "mine"
    if kind == "folder":
        (user / "sub").mkdir(parents=True)
        (user / "my_thesis.txt").write_text("important")
        (user / "sub" / "data.npy").write_bytes(b"x")
        before = _tree(user)
    else:
        user.write_text("important")
    assert main(["eval", "--cache", str(user), "--out", str(tmp_path / "o"), "--no-plots", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(user) in err, err
    assert ("is not an anomfast demo cache" if kind == "folder" else "is a file, not a folder") in err, err
    if kind == "folder":
        assert _tree(user) == before
    else:
        assert user.read_text() == "important"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no trash or temporary folder either


def test_demo_rebuild_deletes_only_what_a_build_wrote(tmp_path):
    """An empty folder is built into; a damaged demo cache is rebuilt (as before), but not
    when it holds a file no build wrote (it would be lost with the folder); a DONE without a
    file record falls back to the demo's layout; every refusal changes nothing."""
    root = tmp_path / "demo"
    root.mkdir()
    assert demo.build_demo(root, **SMALL) == root  # into an existing empty folder
    f = root / "models" / demo.MODELS[0][1] / "logits" / "scene_0001.npy"
    f.write_bytes(f.read_bytes()[:-10])  # damaged
    (root / "images" / "notes.txt").write_text("mine")
    before = _tree(root)
    with pytest.raises(FileExistsError, match=r"holds images/notes\.txt, which no demo build wrote"):
        demo.build_demo(root, **SMALL)
    assert _tree(root) == before and sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    (root / "images" / "notes.txt").unlink()
    said = []
    assert demo.build_demo(root, progress=said.append, **SMALL) == root  # the damaged cache is rebuilt
    assert any("damaged" in s for s in said) and demo.load_demo(root)["names"] == ["scene_0000", "scene_0001"]
    # a DONE of an older format, without the file record: the files of the demo's layout are its own
    old = tmp_path / "old"
    (old / "models" / "m" / "fit" / "semantic").mkdir(parents=True)
    (old / "DONE").write_text(json.dumps({"version": demo.DEMO_VERSION, "config": {}}))
    (old / "models" / "m" / "fit" / "semantic" / "fit_0000.png").write_bytes(b"x")
    (old / "grid.toml").write_text("")
    demo.check_replaceable(old)
    (old / "models" / "m" / "weights.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="models/m/weights.pt"):
        demo.check_replaceable(old)
    # an unreadable DONE is no record: a folder with a foreign file stays refused
    (old / "DONE").write_text("{")
    with pytest.raises(FileExistsError, match="models/m/weights.pt"):
        demo.check_replaceable(old)


def _one_model(tmp_path, rng, n=4, H=12, W=18, C=5):
    """labels/ (PNG) and the logits tensors of one model (not written)."""
    from PIL import Image
    (tmp_path / "labels").mkdir()
    xs, ys = [], []
    for i in range(n):
        y = random_labels(rng, 1, H, W, p_anomaly=0.2, p_void=0.1)[0]
        y[0, 0], y[0, 1] = 0, 1
        Image.fromarray(y.numpy()).save(tmp_path / "labels" / f"img{i}.png")
        xs.append(random_logits(rng, 1, C, H, W)[0])
        ys.append(y)
    return xs, ys


METHODS = ["max_logit", "msp", "energy"]


@pytest.mark.parametrize("fmt", ["pt_requires_grad", "pt_bf16", "safetensors_bf16", "safetensors_fp32"])
def test_pt_and_safetensors_logits_of_every_dtype(tmp_path, rng, fmt):
    """.pt logits saved with requires_grad=True, bfloat16 .pt and .safetensors logits: read
    (the shape probe included) and evaluated as the API evaluates the same tensors (bf16 as
    bf16), bit for bit."""
    if fmt.startswith("safetensors"):
        pytest.importorskip("safetensors")
        from safetensors.torch import save_file
    xs, ys = _one_model(tmp_path, rng)
    if "bf16" in fmt:
        xs = [x.to(torch.bfloat16) for x in xs]
    d = tmp_path / "m"
    d.mkdir()
    for i, x in enumerate(xs):
        if fmt == "pt_requires_grad":
            torch.save(x.clone().requires_grad_(True), d / f"img{i}.pt")
        elif fmt == "pt_bf16":
            torch.save(x, d / f"img{i}.pt")
        else:
            save_file({"logits": x.contiguous()}, str(d / f"img{i}.safetensors"))
    out = tmp_path / "o"
    assert main(["eval", "--logits", str(d), "--labels", str(tmp_path / "labels"), "--out", str(out), "--quiet",
                 "--no-plots", "--methods", ",".join(METHODS)]) == 0
    got = json.loads((out / "results.json").read_text())["models"][0]["results"]
    api = anomfast.evaluate(torch.stack(xs), torch.stack(ys), methods=METHODS)
    for k in METHODS:
        for a in ("auroc", "ap", "fpr95", "f1"):
            assert got[k][a] == pytest.approx(getattr(api[k], a), abs=0, rel=1e-15), (k, a)
        assert float(got[k]["threshold"]) == api[k].threshold


def test_bf16_pt_label_map_is_an_error_naming_the_file(tmp_path, rng, capsys):
    """A label map saved as a bfloat16 tensor: the probe reads its shape, the reader names
    the file (it used to fail with "Got unsupported ScalarType BFloat16", no file)."""
    xs, ys = _one_model(tmp_path, rng)
    (tmp_path / "m").mkdir()
    (tmp_path / "pt_labels").mkdir()
    for i, (x, y) in enumerate(zip(xs, ys)):
        np.save(tmp_path / "m" / f"img{i}.npy", x.numpy())
        torch.save(y.to(torch.bfloat16), tmp_path / "pt_labels" / f"img{i}.pt")
    assert main(["eval", "--logits", str(tmp_path / "m"), "--labels", str(tmp_path / "pt_labels"),
                 "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "img0.pt: label map must hold integer label values" in err and err.count("\n") == 1, err


SEM_TOML = '[labels]\ndir = "labels"\nsemantic_dir = "semantic"\n[[models]]\nname = "M"\nlogits = "m"\n'


@pytest.mark.parametrize("breakage, message", [
    (None, None),
    ("transposed", "semantic label map {sem}/img0.npy has shape (18, 12), expected (12, 18) like label map "
                   "img0.png; it looks transposed (W, H)"),
    ("extra_rows_in_the_middle", "semantic label map {sem}/img2.npy has shape (14, 18), expected (12, 18)"),
    ("missing", "semantic labels: no semantic label map for 1 image(s) that have a label map, e.g. ['img1']"),
    ("extra", "semantic labels: 1 semantic label map file(s) have no label map, e.g. ['img7']"),
])
def test_semantic_maps_are_matched_and_shape_checked(tmp_path, rng, capsys, breakage, message):
    """semantic_dir (mIoU): one map per image, each the label map's (H, W); a transposed map
    (once a silently wrong mIoU), one with extra rows (once an IndexError traceback), a
    missing map (once an mIoU over the other images) are errors naming the file."""
    xs, ys = _one_model(tmp_path, rng)
    (tmp_path / "m").mkdir()
    sem_dir = tmp_path / "semantic"
    sem_dir.mkdir()
    sems = []
    for i, x in enumerate(xs):
        np.save(tmp_path / "m" / f"img{i}.npy", x.numpy())
        s = torch.randint(0, 5, ys[i].shape, generator=rng).to(torch.uint8)
        s[ys[i] != 0] = 255
        sems.append(s)
        a = s.numpy()
        if breakage == "transposed":
            a = np.ascontiguousarray(a.T)
        elif breakage == "extra_rows_in_the_middle" and i == 2:
            a = np.pad(a, ((0, 2), (0, 0)))
        if not (breakage == "missing" and i == 1):
            np.save(sem_dir / f"img{i}.npy", a)
    if breakage == "extra":
        np.save(sem_dir / "img7.npy", sems[0].numpy())
    (tmp_path / "grid.toml").write_text(SEM_TOML)
    out = tmp_path / "o"
    rc = main(["eval", "--grid", str(tmp_path / "grid.toml"), "--out", str(out), "--quiet", "--no-plots",
               "--methods", "max_logit"])
    err = capsys.readouterr().err
    if breakage is None:
        assert rc == 0, err
        C = xs[0].shape[0]
        cm = np.zeros((C, C), np.int64)
        for x, s in zip(xs, sems):
            keep = s.numpy() < C
            np.add.at(cm, (s.numpy()[keep].astype(np.int64), x.argmax(0).numpy()[keep]), 1)
        from anomfast.metrics import mean_iou
        got = json.loads((out / "results.json").read_text())["models"][0]["miou"]
        assert got == pytest.approx(mean_iou(cm)[0], rel=1e-12)
        return
    assert rc == 2 and message.format(sem=sem_dir) in err and err.count("\n") == 1, err
    assert not (out / "report.md").exists()


def test_plot_names_are_unique_for_models_whose_names_slug_alike(tmp_path, rng):
    """"Model A" and "model-a" both slug to model_a: the second model's plots get _2 (they
    used to overwrite the first's); deterministic, and a model's own slug is never taken."""
    make_grid(tmp_path, rng)
    g = tmp_path / "grid.toml"
    g.write_text(g.read_text().replace('name = "Model B"', 'name = "model-a"'))
    out = tmp_path / "o"
    assert main(["eval", "--grid", str(g), "--out", str(out), "--quiet", "--methods", "max_logit,energy"]) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    for stem in ("curves", "scores", "examples"):
        assert f"{stem}_model_a.png" in names and f"{stem}_model_a_2.png" in names, names
    assert (out / "curves_model_a.png").read_bytes() != (out / "curves_model_a_2.png").read_bytes()
    from anomfast.cli.plots import unique_slugs
    assert unique_slugs(["Model A", "model-a", "model a", "x"]) == ["model_a", "model_a_2", "model_a_3", "x"]
    assert unique_slugs(["A", "a", "a_2"]) == ["a", "a_3", "a_2"]
    assert unique_slugs(["!!", "??"]) == ["model", "model_2"]


def test_pipe_in_a_model_name_is_escaped_in_markdown(tmp_path, rng):
    """A '|' in a model name would end its Markdown cell: escaped as \\| in every table of
    report.md (report.tex escapes LaTeX's own characters)."""
    make_grid(tmp_path, rng)
    out = tmp_path / "o"
    assert main(["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--name", "R50|aug",
                 "--out", str(out), "--quiet", "--no-plots", "--methods", "max_logit,energy"]) == 0
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| R50")]
    assert len(rows) == 4 and all(r.startswith("| R50\\|aug | ") for r in rows), rows
    cells = lambda ln: len(re.split(r"(?<!\\)\|", ln))  # noqa: E731
    header = next(ln for ln in md.splitlines() if ln.startswith("| Model |"))
    assert all(cells(r) == cells(header) for r in rows)


@pytest.mark.parametrize("given, message", [
    ("features", "--features DIR needs --heat-stats FILE"),
    ("heat_stats", "--heat-stats FILE needs --features DIR"),
])
def test_half_of_heat_on_the_command_line_is_an_error(tmp_path, rng, capsys, given, message):
    """--features without --heat-stats (or the reverse) asks for HEAT without what it
    needs: an error before any work (it used to be ignored without a word)."""
    make_heat_grid(tmp_path, rng)
    (tmp_path / "heat.npz").write_bytes(b"x")  # never read: the error comes first
    extra = ["--features", str(tmp_path / "m/features")] if given == "features" else \
        ["--heat-stats", str(tmp_path / "heat.npz")]
    assert main(["eval", "--logits", str(tmp_path / "m/logits"), "--labels", str(tmp_path / "labels"), *extra,
                 "--out", str(tmp_path / "o"), "--quiet", "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_half_of_heat_in_a_grid_is_a_note_or_an_error(tmp_path, rng, capsys):
    """A grid model with features but no HEAT statistics: the README's note (which model,
    which method, why) on stderr and in report.md; with heat in its methods, an error that
    says what is missing. Statistics without features likewise."""
    make_heat_grid(tmp_path, rng)
    g = tmp_path / "grid.toml"
    full = g.read_text()
    g.write_text(full.replace('fit_features = "m/fit/features"\nfit_semantic = "m/fit/semantic"\n', ""))
    out = tmp_path / "o"
    assert main(["eval", "--grid", str(g), "--out", str(out), "--no-plots"]) == 0
    note = "heat is not evaluated for model 'M': it has features but no HEAT statistics"
    assert note in capsys.readouterr().err and note in (out / "report.md").read_text()
    assert "heat" not in json.loads((out / "results.json").read_text())["models"][0]["results"]
    assert main(["eval", "--grid", str(g), "--out", str(tmp_path / "o2"), "--quiet", "--methods", "energy,heat"]) == 2
    assert "for model 'M': it has features but no HEAT statistics" in capsys.readouterr().err
    g.write_text(full.replace('features = "m/features"\n', "").replace('name = "M"\n',
                                                                        'name = "M"\nmethods = ["energy", "heat"]\n'))
    assert main(["eval", "--grid", str(g), "--out", str(tmp_path / "o3"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "it has HEAT statistics but no features" in err and err.count("\n") == 1, err
