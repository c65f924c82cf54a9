"""The built-in demo data (anomfast.cli.demo): layout, label values, determinism, cache reuse,
and that a max-logit score separates real anomalies (digits 5-9) from normal pixels."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import pathlib
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow  # builds demo caches (training the small networks)

try:
    import anomfast.cli.demo as demo
except Exception:  # the package may not be importable (e.g. core not built): load the file
    _path = pathlib.Path(__file__).resolve().parents[1] / "anomfast" / "cli" / "demo.py"
    _spec = importlib.util.spec_from_file_location("anomfast_demo_standalone", _path)
    demo = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(demo)

pytest.importorskip("sklearn")

TINY = dict(n_test=10, n_fit=4, quick=True, num_threads=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The same tiny demo built twice into two directories (1 thread)."""
    a = demo.build_demo(tmp_path_factory.mktemp("demo_a") / "demo", **TINY)
    b = demo.build_demo(tmp_path_factory.mktemp("demo_b") / "demo", **TINY)
    return a, b


def _png(path):
    PIL = pytest.importorskip("PIL.Image")
    with PIL.open(path) as im:
        assert im.mode == "L"
        return np.array(im)


def test_layout_shapes_and_dtypes(built):
    root, _ = built
    idx = demo.load_demo(root)
    assert idx["root"] == root and idx["grid"].is_file()
    assert len(idx["names"]) == TINY["n_test"] and len(idx["fit_names"]) == TINY["n_fit"]
    assert len(idx["models"]) >= 2
    C, D = demo.NUM_CLASSES, demo.FEATURE_DIM
    h, w = demo.H // demo.FEATURE_STRIDE, demo.W // demo.FEATURE_STRIDE
    for name in idx["names"]:
        for sub in ("images", "labels", "semantic"):
            a = _png(root / sub / f"{name}.png")
            assert a.shape == (demo.H, demo.W) and a.dtype == np.uint8
            np.testing.assert_array_equal(a, demo.read_png(root / sub / f"{name}.png"))
        sem = _png(root / "semantic" / f"{name}.png")
        assert set(np.unique(sem).tolist()) <= set(range(C)) | {255}
    for m in idx["models"]:
        for name in idx["names"]:
            lo = np.load(m["logits"] / f"{name}.npy")
            fe = np.load(m["features"] / f"{name}.npy")
            assert lo.shape == (C, demo.H, demo.W) and lo.dtype in (np.float16, np.float32)
            assert fe.shape == (D, h, w) and fe.dtype == np.float16
            assert np.isfinite(lo).all() and np.isfinite(fe).all()
        for name in idx["fit_names"]:
            assert np.load(m["fit_logits"] / f"{name}.npy").shape == (C, demo.H, demo.W)
            assert np.load(m["fit_features"] / f"{name}.npy").shape == (D, h, w)
            sem = _png(m["fit_semantic"] / f"{name}.png")
            assert set(np.unique(sem).tolist()) <= set(range(C))   # fit scenes: in-distribution only
    # no temporary directories are left behind
    assert [p.name for p in root.parent.iterdir()] == [root.name]


def test_labels_values(built):
    root, _ = built
    idx = demo.load_demo(root)
    seen = set()
    for name in idx["names"]:
        lab = _png(root / "labels" / f"{name}.png")
        vals = set(np.unique(lab).tolist())
        assert vals <= {0, 1, 255}
        assert 1 in vals, f"{name} has no anomaly"       # every test scene has an anomaly object
        seen |= vals
        sem = _png(root / "semantic" / f"{name}.png")
        assert (sem[lab != 0] == 255).all()               # anomaly and void are void for mIoU
        assert (sem[lab == 0] != 255).all()
        # the void band surrounds the anomaly: no anomaly pixel touches a normal one (4-neighbours)
        an, no = lab == 1, lab == 0
        assert not (an[1:] & no[:-1]).any() and not (an[:-1] & no[1:]).any()
        assert not (an[:, 1:] & no[:, :-1]).any() and not (an[:, :-1] & no[:, 1:]).any()
    assert seen == {0, 1, 255}


def test_grid_toml(built):
    root, _ = built
    tomllib = pytest.importorskip("tomllib")
    grid = tomllib.loads((root / "grid.toml").read_text())
    assert grid["labels"] == {"dir": "labels", "anomaly_ids": [1], "void_ids": [255], "semantic_dir": "semantic"}
    names = [m["name"] for m in grid["models"]]
    assert len(names) == len(set(names)) >= 2
    for m in grid["models"]:
        for key in ("logits", "features", "fit_logits", "fit_features", "fit_semantic"):
            assert (root / m[key]).is_dir(), (m["name"], key)


def test_done_marker(built):
    root, _ = built
    done = json.loads((root / "DONE").read_text())
    assert done["version"] == demo.DEMO_VERSION
    assert done["n_test"] == TINY["n_test"] and done["n_fit"] == TINY["n_fit"]
    assert done["timings"]["total_s"] > 0 and done["bytes"] > 0
    for m in done["models"]:
        assert 0.0 <= m["miou"] <= 1.0
    assert done["anomaly_pixels"] > 0 and done["void_pixels"] > 0


def test_deterministic(built):
    a, b = built
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "DONE")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "DONE")
    for rel in files:
        if rel.suffix == ".npy":
            np.testing.assert_array_equal(np.load(a / rel), np.load(b / rel), err_msg=str(rel))
        else:
            assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_max_logit_separates_anomalies(built):
    from sklearn.metrics import roc_auc_score
    root, _ = built
    idx = demo.load_demo(root)
    labels = np.stack([_png(root / "labels" / f"{n}.png") for n in idx["names"]])
    keep = labels != 255
    for m in idx["models"]:
        logits = np.stack([np.load(m["logits"] / f"{n}.npy").astype(np.float32) for n in idx["names"]])
        score = -logits.max(1)
        auroc = roc_auc_score(labels[keep], score[keep])
        assert auroc > 0.6, (m["name"], auroc)


def test_reuse_rebuild_and_state(built, tmp_path):
    root, _ = built
    stamp = (root / "DONE").stat().st_mtime_ns
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    assert demo.build_demo(root, **TINY) == root              # complete: reused, not rebuilt
    assert (root / "DONE").stat().st_mtime_ns == stamp
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == det

    # a folder without DONE is no demo cache: never reused, and never replaced (it may be the user's)
    half = tmp_path / "demo"
    (half / "labels").mkdir(parents=True)
    (half / "labels" / "junk.png").write_bytes(b"x")
    with pytest.raises(FileNotFoundError):
        demo.load_demo(half)
    small = dict(TINY, n_test=2, n_fit=2, train_steps=2, n_train=16)
    with pytest.raises(FileExistsError, match="not an anomfast demo cache"):
        demo.build_demo(half, **small)
    assert (half / "labels" / "junk.png").read_bytes() == b"x"
    (half / "labels" / "junk.png").unlink()                          # an empty folder is built into
    rng_state = torch.random.get_rng_state()
    out = demo.build_demo(half, **small)
    assert torch.equal(torch.random.get_rng_state(), rng_state)     # caller's RNG untouched
    assert torch.get_num_threads() == threads
    assert out == half and (half / "DONE").is_file()
    assert len(demo.load_demo(half)["names"]) == 2
    # other settings -> rebuilt in place
    demo.build_demo(half, **dict(small, n_test=3))
    assert len(demo.load_demo(half)["names"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMFAST_CACHE", str(tmp_path))
    assert demo.default_cache_dir() == tmp_path / f"demo-v{demo.DEMO_VERSION}"
    monkeypatch.delenv("ANOMFAST_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert demo.default_cache_dir() == pathlib.Path.home() / ".cache" / "anomfast" / f"demo-v{demo.DEMO_VERSION}"


def test_png_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (5, 7), dtype=np.uint8)
    demo.write_png(tmp_path / "a.png", a)
    np.testing.assert_array_equal(demo.read_png(tmp_path / "a.png"), a)
    np.testing.assert_array_equal(_png(tmp_path / "a.png"), a)


def test_module_imports_only_torch_numpy_stdlib():
    src = pathlib.Path(demo.__file__).read_text()
    top = [ln for ln in src.splitlines() if ln.startswith(("import ", "from "))]
    mods = {ln.split()[1].split(".")[0] for ln in top}
    allowed = {"__future__", "torch", "numpy"} | set(getattr(sys, "stdlib_module_names", mods - {"torch", "numpy"}))
    assert mods <= allowed, mods - allowed


SMALL = dict(n_test=2, n_fit=2, train_steps=2, n_train=16, quick=True, num_threads=1)


def test_stale_temporary_folders_of_killed_builds_are_removed(tmp_path):
    """A SIGKILLed build leaves .demo.tmp-<pid>-<hex> behind; the next build (or reuse)
    removes those whose process is gone, and leaves a running build's alone."""
    import subprocess
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "demo"
    stale = tmp_path / f".demo.tmp-{dead.pid}-0123abcd"
    trash = tmp_path / f".demo.old-{dead.pid}-89abcdef"
    live = tmp_path / f".demo.tmp-{os.getppid()}-0123abcd"   # a process that runs
    for d in (stale, trash, live):
        (d / "labels").mkdir(parents=True)
    said = []
    demo.build_demo(root, progress=said.append, **SMALL)
    assert not stale.exists() and not trash.exists() and live.exists()
    assert any(str(stale) in s for s in said)
    assert all(s.startswith("demo: ") and not s.startswith("demo: demo:") for s in said), said
    # training shows its progress (step, loss, time left), not two silent minutes
    assert any(re.search(r"training .*: step 1/2, loss \d+\.\d+, ETA \d+:\d\d$", s) for s in said), said


def test_damaged_cache_is_detected_and_rebuilt(tmp_path):
    root = demo.build_demo(tmp_path / "demo", **SMALL)
    f = root / "models" / demo.MODELS[0][1] / "logits" / "scene_0001.npy"
    good = f.read_bytes()
    stamp = (root / "DONE").stat().st_mtime_ns
    for damage in (good[:-10], good[:-4] + b"\x00\x00\x00\x01" if good[-4:] != b"\x00\x00\x00\x01" else good[:-4] + b"\x00" * 4):
        f.write_bytes(damage)   # truncated, then the same size with other bytes
        with pytest.raises(OSError, match=f"damaged.*scene_0001.npy.*delete {root}"):
            demo.load_demo(root)
        assert not demo.demo_is_built(root)
        said = []
        assert demo.build_demo(root, progress=said.append, **SMALL) == root
        assert any("damaged" in s and "scene_0001.npy" in s for s in said), said
        assert f.read_bytes() == good and (root / "DONE").stat().st_mtime_ns != stamp
        stamp = (root / "DONE").stat().st_mtime_ns
    assert demo.load_demo(root)["names"] == ["scene_0000", "scene_0001"]
