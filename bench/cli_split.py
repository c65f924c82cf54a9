"""Where `anomfast eval` spends its wall time on N images of 19 x 512 x 1024 float32 logits
(.npy, in the page cache after a first run): process start-up, waiting for files (read on
a prefetch thread), the fused pass, the rest of the grid loop (checks, label statistics,
finalization), the report, and the plots. The issue's bar: at most 25% of the wall time
outside reading files and the fused pass. Correctness first: the CLI's numbers must equal
anomfast.evaluate on the same arrays.

    python bench/cli_split.py            # 50 images, max_logit,msp,energy
    python bench/cli_split.py --images 8
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_inputs  # noqa: E402

METHODS = "max_logit,msp,energy"


def run_cli(args, env=None):
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "anomfast", *map(str, args)], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})))
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--keep", help="folder to keep the generated data in (default: a temporary one)")
    a = ap.parse_args()
    import anomfast
    root = Path(a.keep or tempfile.mkdtemp(prefix="anomfast-cli-split-"))
    (root / "logits").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    xs, ys = [], []
    for i in range(a.images):
        f = root / "logits" / f"img_{i:03d}.npy"
        x, y = make_inputs(seed=i)
        if not f.exists():
            np.save(f, x[0].numpy())
            np.save(root / "labels" / f"img_{i:03d}.npy", y[0].numpy())
        if i < 4:
            xs.append(x)
            ys.append(y)
    try:
        out = root / "out"
        args = ["eval", "--logits", root / "logits", "--labels", root / "labels", "--methods", METHODS,
                "--out", out, "--quiet"]
        run_cli(args + ["--no-plots"])  # warm: files into the page cache
        # correctness: the CLI on 4 images equals evaluate() on the same arrays
        small = root / "small"
        (small / "logits").mkdir(parents=True, exist_ok=True)
        (small / "labels").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            for k in ("logits", "labels"):
                dst = small / k / f"img_{i:03d}.npy"
                if not dst.exists():
                    os.link(root / k / f"img_{i:03d}.npy", dst)
        run_cli(["eval", "--logits", small / "logits", "--labels", small / "labels", "--methods", METHODS,
                 "--out", small / "out", "--quiet", "--no-plots"])
        got = json.loads((small / "out" / "results.json").read_text())["models"][0]["results"]
        want = anomfast.evaluate(torch.cat(xs), torch.cat(ys), methods=METHODS.split(","))
        for m in METHODS.split(","):
            assert abs(got[m]["auroc"] - want[m].auroc) == 0 and abs(got[m]["fpr95"] - want[m].fpr95) == 0, m

        rows = []
        for plots in (False, True):
            wall = run_cli(args + ([] if plots else ["--no-plots"]))
            t = json.loads((out / "timings.json").read_text())
            rows.append((plots, wall, t))
        print(f"anomfast {anomfast.__version__}, {anomfast.build_info().get('cpu_isa')}, torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {a.images} images of "
              f"19 x 512 x 1024 float32 (.npy, page cache), methods {METHODS}")
        print("| run | wall s | start-up (python, torch, core) | waiting for files | fused pass | rest of the grid loop | report "
              "(+ plots) | outside reading + fused pass |")
        print("|:--|--:|--:|--:|--:|--:|--:|--:|")
        for plots, wall, t in rows:
            start = wall - t["command_s"] + t["imports_s"]  # interpreter, torch and the core
            rest = t["grid_s"] - t["read_wait_s"] - t["fused_pass_s"]
            outside = wall - t["read_wait_s"] - t["fused_pass_s"]
            print(f"| {'with plots' if plots else '--no-plots'} | {wall:.2f} | {start:.2f} | {t['read_wait_s']:.2f} | "
                  f"{t['fused_pass_s']:.2f} | {rest:.2f} | {t['report_s']:.2f} | {outside:.2f} s = "
                  f"{100 * outside / wall:.0f}% |")
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
