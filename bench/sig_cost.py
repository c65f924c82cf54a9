"""What the tie signatures and the occupancy read-out cost on the CPU: per-thread CPU
time of one fused pass with histograms (1 thread, so the caller's thread does all the
work and a loaded machine inflates it little), and of HistState.sparse(), on the bench
image (bench/common.py make_inputs: 1 x 19 x 512 x 1024 float32). Checks first.

    python bench/sig_cost.py                          # the installed build
    python bench/sig_cost.py --build old=/path/to/site-packages --rounds 5

With --build, the builds (each a directory holding an installed `anomfast`, put first on
PYTHONPATH; "installed" is this environment's own) run in alternating child processes,
round after round, so that the machine's load drifts over all of them alike; each
figure is the median over rounds of each child's best call.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CASES = {"4 methods": ["max_logit", "msp", "energy", "sml"], "max_logit": ["max_logit"],
         "energy": ["energy"]}


def child(repeat: int) -> dict:
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    import anomfast
    from anomfast import _fused, binning
    from anomfast.methods import resolve
    from common import check_state, fit_stats, make_inputs

    torch.set_num_threads(1)
    x, y = make_inputs()
    st = fit_stats(x)
    out = {"file": anomfast.__file__, "occ_shift": binning.OCC_SHIFT}
    for name, methods in CASES.items():
        spec = resolve(methods, sml=st)
        hist, _, maps = _fused.fused_pass(x, y, spec, want_maps=True, num_threads=1)
        if name == "4 methods":
            # counts and occupancy exact; signatures exact where this build fills them
            # (every method before sig_mask, EXACT_COORDINATES since; the CPU core filled
            # none before signatures)
            filled = hist.sig.reshape(len(methods), -1).ne(0).any(dim=1).tolist()
            out["sig_filled"] = "".join("1" if f else "0" for f in filled)
            if any(filled):
                check_state(hist, maps, y, torch.isfinite(x).all(dim=1), name,
                            names=None if all(filled) else methods)
            h = hist.hist.reshape(-1).numpy()
            nz = np.flatnonzero(h)
            o = hist.occ.numpy()
            if o.any():  # (the CPU core marked no occupancy before signatures either)
                assert np.array_equal(np.flatnonzero(o), np.unique(nz >> binning.OCC_SHIFT)), "occupancy not exact"
            out["bins"] = int(nz.size)
            out["blocks"] = int(np.count_nonzero(o))
            out["slots_copied"] = int(np.count_nonzero(o)) << binning.OCC_SHIFT
            cpu, wall = [], []
            for _ in range(repeat):
                t0, w0 = time.thread_time(), time.perf_counter()
                hist.sparse()
                cpu.append(time.thread_time() - t0)
                wall.append(time.perf_counter() - w0)
            out["sparse_cpu_ms"] = 1e3 * min(cpu)
            out["sparse_wall_ms"] = 1e3 * min(wall)
        hist = _fused.new_histogram(len(methods), "cpu")
        _fused.fused_pass(x, y, spec, hist=hist, num_threads=1)  # warm: scratch pages, hist pages
        ts = []
        for _ in range(repeat):
            t0 = time.thread_time()
            _fused.fused_pass(x, y, spec, hist=hist, num_threads=1)
            ts.append(time.thread_time() - t0)
        out[f"pass_{name}_ms"] = 1e3 * min(ts)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", action="append", default=[], help="name=dir of an installed anomfast")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.repeat)))
        return
    builds = [("installed", None)] + [tuple(b.split("=", 1)) for b in args.build]
    runs = {name: [] for name, _ in builds}
    for _ in range(args.rounds):
        for name, path in builds:
            env = dict(os.environ)
            if path:
                env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
            r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--repeat",
                                str(args.repeat)], env=env, cwd="/", capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: {r.stderr[-3000:]}")
            runs[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    keys = [k for k in runs[builds[0][0]][0] if k.endswith("_ms")]
    print("| build | " + " | ".join(keys) + " | blocks x slots | sig filled |")
    print("|:--|" + "--:|" * len(keys) + ":--|:--|")
    for name, rs in runs.items():
        med = [statistics.median(r[k] for r in rs) if k in rs[0] else float("nan") for k in keys]
        r0 = rs[0]
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in med)
              + f" | {r0.get('blocks')} x {1 << r0['occ_shift']} ({r0.get('bins')} bins) | {r0.get('sig_filled')} |")
    print("per round:", json.dumps({n: [[round(r[k], 2) for k in keys] for r in rs] for n, rs in runs.items()}))


if __name__ == "__main__":
    main()
