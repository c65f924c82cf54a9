"""anomfast command line.

    anomfast eval --out DIR                     # the built-in real demo grid
    anomfast eval --grid grid.toml --out DIR    # your models x methods grid
    anomfast fit --logits DIR --out sml.npz     # SML statistics from in-distribution logits
    anomfast fit --method heat --logits DIR --features DIR --labels DIR --out heat.npz
    anomfast report --histograms DIR/histograms.npz --out DIR2 [--fpr-mode interp ...]
    anomfast info
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEMO_METHODS = ["max_logit", "msp", "sml", "energy", "heat"]  # the seed table's columns


def _cmd_info(args) -> int:
    from . import build_info
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:16s} {v}")
    return 0


def _conventions(args) -> dict:
    return {"fpr_mode": args.fpr_mode, "ap_mode": args.ap_mode}


def _init_distributed(args) -> bool:
    """--distributed: join the process group torchrun describes in the environment
    (gloo on the CPU, nccl for --device cuda). Returns True when this call created it."""
    import os

    import torch
    import torch.distributed as dist
    if not args.distributed or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("--distributed: this torch build has no torch.distributed")
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError("--distributed needs a launcher that sets RANK / WORLD_SIZE / MASTER_ADDR, e.g. "
                         "torchrun --nproc_per_node=N -m anomfast eval --distributed ...")
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def _check_device(device: str) -> None:
    """--device: a clear error before any work when it cannot be used."""
    import torch
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r}: not a device (expected cpu or cuda[:N])") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: anomfast runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this torch build or machine has no usable CUDA GPU "
                             f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")


def _cmd_eval(args) -> int:
    import torch.distributed as dist
    _check_device(args.device)
    created = _init_distributed(args)
    try:
        return _eval(args)
    finally:
        if created:
            dist.destroy_process_group()


def _eval(args) -> int:
    import torch.distributed as dist

    from .grid import grid_from_config, load_grid
    from .methods import resolve
    from .report import write_report
    from .runner import evaluate_grid
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    notes = []
    if args.grid or args.logits:
        if args.grid:
            grid = load_grid(args.grid)
        else:
            if not args.labels:
                raise ValueError("--logits needs --labels DIR")
            normal = args.normal_ids
            if normal != ["rest"]:
                try:
                    normal = [int(v) for v in normal]
                except ValueError:
                    raise ValueError(f"--normal-ids: integers or the word rest, got {' '.join(normal)}") from None
            else:
                normal = "rest"
            cfg = {"labels": {"dir": str(Path(args.labels).resolve()), "anomaly_ids": args.anomaly_ids,
                              "void_ids": args.void_ids, "normal_ids": normal},
                   "models": [{"name": args.name or Path(args.logits).name, "logits": str(Path(args.logits).resolve())}]}
            for key in ("sml_stats", "features", "heat_stats"):
                if getattr(args, key):
                    cfg["models"][0][key] = str(Path(getattr(args, key)).resolve())
            grid = grid_from_config(cfg, Path.cwd())
        methods = methods or ["max_logit", "msp", "energy"] + (
            ["sml"] if all(m.has_sml for m in grid.models) else []) + (
            ["heat"] if all(m.has_heat for m in grid.models) else [])
    else:
        from .demo import build_demo
        print("anomfast: no data given, running the built-in demo (digits scenes, Fishyscapes Static protocol)",
              file=sys.stderr)
        dist_on = dist.is_available() and dist.is_initialized()
        if not dist_on or dist.get_rank() == 0:  # one rank builds the cache, the others wait, then read it
            root = build_demo(args.cache, progress=lambda s: print(f"  demo: {s}", file=sys.stderr))
        if dist_on:
            dist.barrier()
            if dist.get_rank() != 0:
                root = build_demo(args.cache)
        grid = load_grid(Path(root) / "grid.toml")
        methods = methods or DEMO_METHODS
        notes.append("Built-in demo: scenes of scikit-learn's real digits; networks trained on digits 0-4, "
                     "digits 5-9 pasted as anomalies with void boundaries. SML and HEAT statistics are fitted on "
                     "held-out in-distribution scenes; HEAT uses each network's 1/4-resolution context features "
                     "and is standardized with the fitted mean / std of its in-distribution score.")
    resolve([m for m in methods if m not in ("sml", "heat")] or ["max_logit"])  # unknown methods fail here, before any work
    for m in grid.models:  # before any long work
        if "sml" in methods and not m.has_sml:
            raise ValueError(f"method 'sml' needs sml_stats or fit_logits for model {m.name!r}")
        if "heat" in methods and not m.has_heat:
            raise ValueError(f"method 'heat' needs features and heat_stats (or fit_logits + fit_features + "
                             f"fit_semantic) for model {m.name!r}")
    if args.refine and args.distributed:
        raise ValueError("--refine with --distributed is not implemented yet (the decisive pixels would have to be "
                         "gathered across ranks); run --refine in one process")
    if args.protocol != "default" and (args.fpr_mode != "first" or args.ap_mode != "step"):
        raise ValueError(f"--protocol {args.protocol} fixes its own FPR95 / AUPR definitions; drop --fpr-mode / --ap-mode")
    if args.protocol != "default" and args.refine:
        raise ValueError(f"--protocol {args.protocol} computes its metrics from per-pixel scores; --refine applies to "
                         "the default (histogram) protocol")
    run = evaluate_grid(grid, methods, device=args.device, progress=not args.quiet,
                        distributed=args.distributed, protocol=args.protocol, refine=args.refine,
                        conventions=_conventions(args))
    run["notes"] = notes
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    write_report(run, Path(args.out), _conventions(args), plots=not args.no_plots)
    print((Path(args.out) / "report.md").read_text())
    print(f"anomfast: wrote {args.out}/report.md, results.json, results.csv, report.tex, histograms.npz"
          + ("" if args.no_plots else " and plots"), file=sys.stderr)
    return 0


def _cmd_fit(args) -> int:
    from .grid import LABEL_EXT, LOGIT_EXT, _files, _match
    from .runner import _Reader
    files = _files(args.logits, Path.cwd(), LOGIT_EXT, "fit logits")
    stems = sorted(files)
    if args.method == "sml":
        from .functional import fit_sml
        stats = fit_sml(_Reader(files, stems, "logits"))
        stats.save(args.out)
        print(f"anomfast: SML statistics for {stats.num_classes} classes from {int(stats.count.sum())} pixels "
              f"-> {args.out}")
        if stats.fallback_classes:
            print(f"anomfast: classes {stats.fallback_classes} use the pooled statistics (too few pixels)")
        return 0
    if not (args.features and args.labels):
        raise ValueError("anomfast fit --method heat needs --features DIR (D, h, w per image) and --labels DIR "
                         "(semantic class-id maps, --ignore-index ignored) matching --logits by file name")
    from .heat import fit_heat
    feats = _files(args.features, Path.cwd(), LOGIT_EXT, "fit features")
    labels = _files(args.labels, Path.cwd(), LABEL_EXT, "fit semantic labels")
    _match("fit", files, feats, kind="features", other="logits file")
    _match("fit", files, labels, kind="semantic label", other="logits file")
    stats = fit_heat(_Reader(files, stems, "logits"), _Reader(feats, stems, "features"),
                     _Reader(labels, stems, "labels"), ignore_index=args.ignore_index,
                     temperature=args.temperature, standardize=not args.raw)
    stats.save(args.out)
    d = stats.describe()
    print(f"anomfast: HEAT statistics, {d['num_classes']} classes x D = {d['dim']} from {d['pixels']} feature "
          f"pixels" + ("" if args.raw else f", score mean {d['score_mean']:.4g} std {d['score_std']:.4g}")
          + f" -> {args.out}")
    return 0


def _cmd_report(args) -> int:
    from .histogram import load_histograms
    from .report import write_report
    hists, extra = load_histograms(args.histograms)
    models, methods = [], extra.get("methods") or []
    for info in extra.get("models", []):
        hs = {k.split("::", 1)[1]: h for k, h in hists.items() if k.split("::", 1)[0] == info["name"]}
        models.append({"name": info["name"], "miou": info.get("miou"), "images": info.get("images"), "histograms": hs})
        methods = methods or list(hs)
    write_report({"models": models, "methods": methods, "notes": extra.get("notes", [])}, Path(args.out),
                 _conventions(args), plots=not args.no_plots)
    print((Path(args.out) / "report.md").read_text())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomfast", description="Fast, certified pixel-level anomaly detection evaluation.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="what this build contains (version, compiler, OpenMP, CUDA)")
    pi.add_argument("--json", action="store_true")
    pi.set_defaults(func=_cmd_info)

    def conventions(sp):
        sp.add_argument("--fpr-mode", default="first", choices=["first", "strict", "interp"],
                        help="FPR95: first threshold with TPR >= 0.95 (default), TPR > 0.95, or interpolated")
        sp.add_argument("--ap-mode", default="step", choices=["step", "trapezoid"],
                        help="AUPR: average precision (default) or trapezoid rule")
        sp.add_argument("--no-plots", action="store_true")

    pe = sub.add_parser("eval", help="evaluate a models x methods grid (no data options: the built-in demo)")
    pe.add_argument("--out", required=True, help="output folder")
    pe.add_argument("--grid", help="grid file (TOML), see anomfast/grid.py")
    pe.add_argument("--logits", help="one model: folder/glob of per-image logits (C, H, W)")
    pe.add_argument("--labels", help="folder of label maps matching --logits by file name")
    pe.add_argument("--name", help="model name for --logits")
    pe.add_argument("--sml-stats", help="SML statistics file (anomfast fit) for --logits")
    pe.add_argument("--features", help="folder of per-image feature maps (D, h, w) for --logits (method heat)")
    pe.add_argument("--heat-stats", help="HEAT statistics file (anomfast fit --method heat) for --logits")
    pe.add_argument("--anomaly-ids", type=int, nargs="+", default=[1], help="label values of anomalies (default 1)")
    pe.add_argument("--void-ids", type=int, nargs="+", default=[255], help="label values to ignore (default 255)")
    pe.add_argument("--normal-ids", nargs="+", default=["0"],
                    help="label values of normal pixels (default 0), or 'rest': every other value; a value in "
                         "no list is an error")
    pe.add_argument("--methods", help="comma-separated methods (default: max_logit,msp,energy, plus sml and heat "
                    "when every model has what they need)")
    pe.add_argument("--device", default="cpu", help="cpu or cuda")
    pe.add_argument("--distributed", action="store_true", help="shard images over torch.distributed ranks")
    pe.add_argument("--cache", help="demo cache folder, used as given (default: a demo-v<version> folder under "
                    "$ANOMFAST_CACHE, or under ~/.cache/anomfast)")
    pe.add_argument("--quiet", action="store_true", help="no progress line")
    pe.add_argument("--refine", action="store_true",
                    help="read the inputs a second time, keeping only the pixels in the bins where FPR95 and the "
                         "best F1 are decided: FPR95, F1 and both thresholds become exact (scikit-learn's)")
    from .protocols import PROTOCOLS
    pe.add_argument("--protocol", default="default", choices=PROTOCOLS,
                    help="ml4cv: the ml4cv-assignment scripts' evaluation (float16 scores, seeded 1M-pixel "
                         "subsample, their FPR95 / F1 / SML rules; see anomfast/protocols.py)")
    conventions(pe)
    pe.set_defaults(func=_cmd_eval)

    pf = sub.add_parser("fit", help="fit SML (or HEAT) statistics from in-distribution data")
    pf.add_argument("--method", default="sml", choices=["sml", "heat"])
    pf.add_argument("--logits", required=True, help="folder/glob of in-distribution logits (C, H, W)")
    pf.add_argument("--features", help="heat: folder of feature maps (D, h, w), same file names")
    pf.add_argument("--labels", help="heat: folder of semantic label maps (class ids), same file names")
    pf.add_argument("--ignore-index", type=int, default=255, help="heat: label value to ignore")
    pf.add_argument("--temperature", type=float, default=1.0, help="heat: T of the energy term")
    pf.add_argument("--raw", action="store_true", help="heat: no standardization of the combined score")
    pf.add_argument("--out", required=True)
    pf.set_defaults(func=_cmd_fit)

    pr = sub.add_parser("report", help="re-finalize saved histograms with other definitions, without the logits")
    pr.add_argument("--histograms", required=True)
    pr.add_argument("--out", required=True)
    conventions(pr)
    pr.set_defaults(func=_cmd_report)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, NotImplementedError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"anomfast: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
