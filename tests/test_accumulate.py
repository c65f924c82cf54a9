"""The three entry points (anomfast.evaluate, anomfast.Evaluator, the CLI's grid runner)
accumulate through one anomfast.accumulate.Accumulator: same batches, same histograms."""
from __future__ import annotations

import torch

import anomfast
from anomfast.cli.grid import load_grid
from anomfast.cli.runner import evaluate_grid

from test_cli import make_grid

METHODS = ["max_logit", "msp", "energy"]


def test_three_entry_points_accumulate_identical_histograms(tmp_path, rng):
    data = make_grid(tmp_path, rng)
    xs, ys = data["a"], data["y"]
    api = anomfast.evaluate([x[None] for x in xs], [y[None] for y in ys], methods=METHODS)
    ev = anomfast.Evaluator(METHODS)
    for x, y in zip(xs, ys):
        ev.update(x[None], y[None])
    stream = ev.compute()
    run = evaluate_grid(load_grid(tmp_path / "grid.toml"), METHODS, progress=False)
    grid = next(m for m in run["models"] if m["name"] == "Model A")
    whole = anomfast.evaluate(torch.stack(xs), torch.stack(ys), methods=METHODS)
    for n in METHODS:
        h = api.histograms[n]
        assert h.n_anomaly > 0 and h.n_normal > 0
        assert stream.histograms[n] == h and grid["histograms"][n] == h and whole.histograms[n] == h, n
        assert stream[n].as_dict() == api[n].as_dict() == whole[n].as_dict(), n
    assert api.pixels == stream.pixels == grid["pixels"] == whole.pixels
