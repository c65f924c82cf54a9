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
import importlib.util
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

# the seed report's columns, in its order; other methods follow in the order given
SEED_ORDER = ["max_logit", "msp", "sml", "energy", "heat"]
DEMO_METHODS = list(SEED_ORDER)
BASE_METHODS = ["max_logit", "msp", "energy"]
WHY_MISSING = {"sml": "it has no sml_stats / fit_logits (--sml-stats)",
               "heat": "it has no features and heat_stats (or fit_logits + fit_features + fit_semantic) "
                       "(--features, --heat-stats)"}


class CLIError(ValueError):
    """A one-line reason the command cannot run (exit 2)."""


def say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def order_methods(methods) -> list:
    """The seed table's column order (Max Logit, MSP, SML, Energy, HEAT), then the rest."""
    methods = list(dict.fromkeys(methods))
    return [m for m in SEED_ORDER if m in methods] + [m for m in methods if m not in SEED_ORDER]


def _extra_providing(packages) -> str | None:
    """The extra of the installed anomfast that brings all of `packages` (from the
    package's own metadata, so it follows pyproject.toml), or None."""
    try:
        from importlib.metadata import requires
        reqs = requires("anomfast") or []
    except Exception:  # not installed (a source run) or no metadata
        return None
    extras: dict = {}
    for r in reqs:
        m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", r)
        if m:
            name = re.split(r"[\s;<>=!~\[(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
            extras.setdefault(m.group(1), set()).add(name)
    want = {p.lower() for p in packages}
    fits = [e for e, pk in extras.items() if want <= pk]
    return min(fits, key=lambda e: (len(extras[e]), e)) if fits else None


def require(needs: dict, why: str) -> None:
    """needs: {import name: pip name}. One line naming what to install when any is missing."""
    missing = [pip for mod, pip in needs.items() if importlib.util.find_spec(mod) is None]
    if not missing:
        return
    extra = _extra_providing(missing)
    how = f"pip install 'anomfast[{extra}]'" if extra else "pip install " + " ".join(missing)
    raise CLIError(f"{why} need{'s' if len(missing) == 1 else ''} {', '.join(missing)}, which "
                   f"{'is' if len(missing) == 1 else 'are'} not installed: {how}")


# folders check_writable created for this command, innermost first: main() removes them
# again (those still empty) when the command fails
_CREATED: list = []


def check_writable(path, kind: str = "folder", what: str = "--out") -> Path:
    """Before any long work: proves that `path` can be written, a folder or a file, by
    creating the folder (or the file's folder) where it is missing and a temporary file in
    it, removed at once. A folder created here is removed again when the command fails
    while it is still empty (main)."""
    if not str(path).strip():
        raise CLIError(f"{what} is empty: give a {'folder' if kind == 'folder' else 'file name'}"
                       + (" ('.' for the current folder)" if kind == "folder" else ""))
    p = expand_user(path, what)
    if kind == "folder" and p.exists() and not p.is_dir():
        raise CLIError(f"{what} {p} is an existing file; give a folder (it is created if needed)")
    if kind == "file" and p.is_dir():
        raise CLIError(f"{what} {p} is a folder; give a file name")
    folder = p if kind == "folder" else p.parent
    missing, probe = [], folder  # the folders to create, innermost first; the first that exists
    while not probe.exists() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise CLIError(f"{what} {p}: {probe} is a file, so the output cannot be created there")
    _CREATED.extend(missing)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. under /proc, which exists and looks writable
        raise CLIError(f"{what} {p}: cannot create the folder {folder} ({exc.strerror or exc})") from None
    existing_file = kind == "file" and p.exists()
    try:
        if existing_file:
            with open(p, "ab"):  # appends nothing: the file stays as it is
                pass
        fd, tmp = tempfile.mkstemp(prefix=".anomfast-write-check-", dir=folder)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise CLIError(f"{what} {p}: cannot write {'it' if existing_file else f'in {folder}'} "
                       f"({exc.strerror or exc})") from None
    return p


def expand_user(path, what: str) -> Path:
    """Path(path).expanduser(), with a one-line error for a user that does not exist
    (Path raises RuntimeError "Could not determine home directory")."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise CLIError(f"{what} {path}: cannot expand {str(path).split('/')[0]!r} (no such user or no home folder)") \
            from None


# staging folders (inside --out) this command writes its outputs into; removed when it fails
_STAGES: list = []
# what `eval` / `report` write into --out: these names, and the plots (ROC / PR curves, score
# distributions, examples) named <kind>_<model slug>.<format>
OUTPUT_FILES = ("report.md", "results.json", "results.csv", "report.tex", "histograms.npz", "components.csv",
                "timings.json")
_PLOT_FILE = re.compile(r"(curves|scores|examples)_.+\.(png|pdf|svg)")


def _stage(out: Path) -> Path:
    """A new, hidden folder inside --out for this run's outputs: moved into --out only when
    everything is written (_commit), removed when the command fails or is interrupted, so
    a failed run never leaves a report that looks complete."""
    d = Path(tempfile.mkdtemp(prefix=".anomfast-partial-", dir=out))
    _STAGES.append(d)
    return d


def _earlier_outputs(out: Path) -> list:
    """The files an earlier `anomfast eval` / `report` wrote into `out` (recognized by its
    results.json): replaced by this run's, so two runs' files never mix (e.g. the first
    run's components.csv or another model's plots next to the second run's report)."""
    try:
        doc = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return []
    if not (isinstance(doc, dict) and "definitions" in doc and "models" in doc):
        return []  # not anomfast's: nothing in the folder is taken for an earlier run's output
    return [f for f in out.iterdir() if (f.name in OUTPUT_FILES or _PLOT_FILE.fullmatch(f.name))
            and f.is_file() and not f.is_symlink()]


def _commit(stage: Path, out: Path) -> None:
    """Moves the staged outputs into --out (replacing an earlier run's), with SIGINT /
    SIGTERM held back for those few renames."""
    held = hasattr(signal, "pthread_sigmask")
    if held:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        for f in _earlier_outputs(out):
            f.unlink()
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
        stage.rmdir()
        _STAGES.remove(stage)
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _remove_stages() -> None:
    for d in _STAGES:
        shutil.rmtree(d, ignore_errors=True)
    _STAGES.clear()


def check_out_not_in_inputs(out: Path, folders, what: str = "--out") -> None:
    """--out is neither an input folder nor inside one: its report files (histograms.npz,
    PNG plots) would be read as inputs by the next run, and a rerun would mix them in."""
    o = Path(out).resolve()
    for d in dict.fromkeys(Path(f).resolve() for f in folders):
        if o == d or d in o.parents:
            raise CLIError(f"{what} {out} is {'the' if o == d else 'inside the'} input folder {d}: write the "
                           "outputs elsewhere (its files would be read as inputs next time)")


def _remove_created() -> None:
    """The folders check_writable created, where still empty (a failed command's)."""
    for d in _CREATED:
        try:
            d.rmdir()
        except OSError:  # not empty (the command wrote there), or already gone
            pass
    _CREATED.clear()


def _warning_printer(seen: set):
    """warnings.showwarning for the commands: a warning (the library's: an undefined metric,
    SML / HEAT fallbacks...) as one line "anomfast: warning: ...", each text once, instead
    of Python's "file:line: RuntimeWarning: ..." plus the source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = str(message).strip()
        if text not in seen:
            seen.add(text)
            print(f"anomfast: warning: {text}", file=sys.stderr, flush=True)
    return show


def _cmd_info(args) -> int:
    from .. import build_info
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


def _check_inputs_exist(args) -> None:
    """An input option naming nothing fails here, at once: before torch is imported (about
    2 s of start-up). The grid loader checks everything again in full."""
    for opt in ("grid", "logits", "labels", "sml_stats", "features", "heat_stats"):
        given = getattr(args, opt, None)
        if given and not any(ch in given for ch in "*?[") and not Path(given).exists():
            raise CLIError(f"--{opt.replace('_', '-')}: {given} does not exist")


def _cmd_eval(args) -> int:
    _check_inputs_exist(args)
    t = time.perf_counter()
    import torch.distributed as dist
    import anomfast._fused  # noqa: F401  (torch and the compiled core: start-up, not work)
    args._t_imports = time.perf_counter() - t
    _check_device(args.device)
    created = _init_distributed(args)
    try:
        return _eval(args)
    except RuntimeError as exc:  # a collective torn down by another rank's exit (gloo / nccl)
        text = str(exc)
        peer = isinstance(exc, getattr(dist, "DistError", ())) or any(
            k in text for k in ("Connection reset by peer", "Connection closed by peer", "gloo", "NCCL", "nccl"))
        if args.distributed and dist.is_available() and dist.is_initialized() and peer:
            raise CLIError(f"rank {dist.get_rank()}: another process of the distributed run failed (its error is "
                           "above); this one stopped waiting for it") from None
        raise
    finally:
        if created:
            dist.destroy_process_group()


def _label_config(args) -> dict:
    normal = args.normal_ids if args.normal_ids is not None else ["0"]
    if normal != ["rest"]:
        try:
            normal = [int(v) for v in normal]
        except ValueError:
            raise CLIError(f"--normal-ids: integers or the word rest, got {' '.join(normal)}") from None
    else:
        normal = "rest"
    return {"dir": str(Path(args.labels).resolve()),
            "anomaly_ids": args.anomaly_ids if args.anomaly_ids is not None else [1],
            "void_ids": args.void_ids if args.void_ids is not None else [255], "normal_ids": normal}


def _model_methods(grid, args, notes: list) -> dict:
    """{model name: methods}: --methods for every model, else the grid's per-model
    methods = [...], else what each model supports (saying what was left out and why)."""
    from ..methods import resolve
    given = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    out = {}
    for m in grid.models:
        if given is not None:
            ms = given
        elif m.methods is not None:
            ms = list(m.methods)
        else:
            ms = BASE_METHODS + (["sml"] if m.has_sml else []) + (["heat"] if m.has_heat else [])
            for k in ("sml", "heat"):
                others = [o.name for o in grid.models if (o.has_sml if k == "sml" else o.has_heat)]
                gap = m.heat_gap if k == "heat" else None  # some of HEAT's inputs given: say what is missing
                if k not in ms and (others or gap):
                    note = (f"{k} is not evaluated for model {m.name!r}: {gap or WHY_MISSING[k]}"
                            + (f" (evaluated for {', '.join(repr(o) for o in others)})" if others else ""))
                    notes.append(note)
                    say(f"anomfast: note: {note}", args.quiet)
        resolve([k for k in ms if k not in ("sml", "heat")] or ["max_logit"])  # unknown methods fail here
        if "sml" in ms and not m.has_sml:
            raise CLIError(f"method 'sml' needs sml_stats or fit_logits for model {m.name!r}")
        if "heat" in ms and not m.has_heat:
            raise CLIError(f"method 'heat' needs features and heat_stats (or fit_logits + fit_features + "
                           f"fit_semantic) for model {m.name!r}" + (f": {m.heat_gap}" if m.heat_gap else ""))
        out[m.name] = order_methods(ms)
    return out


def _eval(args) -> int:
    import torch.distributed as dist

    from .grid import grid_from_config, load_grid
    from .runner import evaluate_grid
    notes = []
    data_opts = [f"--{k.replace('_', '-')}" for k in ("labels", "name", "sml_stats", "features", "heat_stats",
                                                      "anomaly_ids", "void_ids", "normal_ids")
                 if getattr(args, k) is not None]
    if not (args.grid or args.logits) and data_opts:
        raise CLIError(f"{' '.join(data_opts)} without --logits DIR: give the model's logits (or a --grid file); "
                       "anomfast eval without any data option runs the built-in demo")
    if args.grid and (args.logits or data_opts):
        raise CLIError(f"--grid takes its data from the grid file; drop {' '.join(data_opts or ['--logits'])}")
    if args.name is not None:
        from .grid import check_model_name
        check_model_name(args.name, "--name")
    if (args.features is None) != (args.heat_stats is None):  # asked for HEAT, half of what it needs
        raise CLIError("--features DIR needs --heat-stats FILE (anomfast fit --method heat) for method heat"
                       if args.heat_stats is None else
                       "--heat-stats FILE needs --features DIR (per-image feature maps (D, h, w)) for method heat")
    out = check_writable(args.out)
    if not args.no_plots:
        require({"matplotlib": "matplotlib"}, "plots (leave them out with --no-plots)")
    formats = _plot_formats(args)
    dist_on = dist.is_available() and dist.is_initialized()
    if args.grid or args.logits:
        if args.grid:
            grid = load_grid(args.grid, intersect=args.intersect)
        else:
            if not args.labels:
                raise CLIError("--logits needs --labels DIR (label maps with the same file names)")
            cfg = {"labels": _label_config(args),
                   "models": [{"name": args.name or _default_name(args.logits),
                               "logits": str(Path(args.logits).resolve())}]}
            for key in ("sml_stats", "features", "heat_stats"):
                if getattr(args, key):
                    cfg["models"][0][key] = str(Path(getattr(args, key)).resolve())
            grid = grid_from_config(cfg, Path.cwd(), intersect=args.intersect)
    else:
        from .demo import build_demo, check_replaceable, demo_is_built
        cache = None if args.cache is None else expand_user(args.cache, "--cache")
        if not demo_is_built(cache):
            check_replaceable(cache)  # a build replaces the folder: never a user's folder
            require({"sklearn": "scikit-learn"}, "building the built-in demo (scenes of scikit-learn's digits)")
        say("anomfast: no data given, running the built-in demo (digits scenes, Fishyscapes Static protocol)",
            args.quiet)
        if not dist_on or dist.get_rank() == 0:  # one rank builds the cache, the others wait, then read it
            root = build_demo(cache, progress=lambda s: say(f"  {s}", args.quiet))
        if dist_on:
            dist.barrier()
            if dist.get_rank() != 0:
                root = build_demo(cache)
        grid = load_grid(Path(root) / "grid.toml")
        if not args.methods:
            for m in grid.models:
                m.methods = list(DEMO_METHODS)
        notes.append("Built-in demo: scenes of scikit-learn's real digits; networks trained on digits 0-4, "
                     "digits 5-9 pasted as anomalies with void boundaries. SML and HEAT statistics are fitted on "
                     "held-out in-distribution scenes; HEAT uses each network's 1/4-resolution context features "
                     "and is standardized with the fitted mean / std of its in-distribution score.")
    if any(p.suffix == ".png" for p in grid.labels.values()):
        require({"PIL": "pillow"}, "PNG label maps")
    check_out_not_in_inputs(out, _input_folders(grid))
    methods = _model_methods(grid, args, notes)
    if args.refine and args.distributed:
        raise CLIError("--refine with --distributed is not implemented yet (the decisive pixels would have to be "
                       "gathered across ranks); run --refine in one process")
    if args.protocol != "default" and (args.fpr_mode != "first" or args.ap_mode != "step"):
        raise CLIError(f"--protocol {args.protocol} fixes its own FPR95 / AUPR definitions; drop --fpr-mode / --ap-mode")
    if args.protocol != "default" and args.refine:
        raise CLIError(f"--protocol {args.protocol} computes its metrics from per-pixel scores; --refine applies to "
                       "the default (histogram) protocol")
    run = evaluate_grid(grid, methods, device=args.device, progress=not args.quiet,
                        distributed=args.distributed, protocol=args.protocol, refine=args.refine,
                        conventions=_conventions(args), nonfinite=args.nonfinite,
                        allow_empty_class=args.allow_empty_class, components=_component_spec(args))
    run["notes"] = notes + run.get("notes", [])
    run["methods"] = order_methods(run["methods"])
    # what, besides the histograms, made this run's numbers: saved in histograms.npz, so
    # that `anomfast report` can say where its re-finalized table differs from this one
    run["options"] = {"command": "eval", "refine": bool(args.refine), "protocol": args.protocol,
                      **_conventions(args), "nonfinite": args.nonfinite,
                      "components": ({"track": args.components_track, "mode": args.components_mode}
                                     if args.components else None)}
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return 0
    _write_report_timed(run, out, args, formats)
    print((out / "report.md").read_text())
    say(f"anomfast: wrote {out}/report.md, results.json, results.csv, report.tex, histograms.npz"
        + ("" if args.no_plots else f" and plots ({', '.join(formats)})"), args.quiet)
    return 0


def _default_name(logits) -> str:
    """--logits' model name: the folder's name (of the resolved path: '.' or 'a/..' name
    the folder they are); a glob's last part as it is."""
    p = Path(logits)
    return (p.resolve().name if p.exists() else p.name) or "model"


def _input_folders(grid) -> list:
    """The folders the grid's per-image files come from (labels, semantic maps, images,
    each model's logits, features and fitting files)."""
    dicts = [grid.labels, grid.semantic, grid.images]
    for m in grid.models:
        dicts += [m.logits, m.features, m.fit_logits, m.fit_features, m.fit_semantic]
    return [p.parent for d in dicts for p in d.values()]


def _write_report_timed(run: dict, out: Path, args, formats) -> None:
    """write_report, then timings.json: where the command's time went (rank 0's view;
    bench/cli_split.py reads it). Written into a staging folder inside `out`, moved into
    `out` at the end (an earlier run's outputs there are replaced): a failure or an
    interrupt leaves no half report."""
    from .report import write_report
    final, out = out, _stage(out)
    t_report = time.perf_counter()
    write_report(run, out, _conventions(args), plots=not args.no_plots, formats=formats,
                 progress=None if args.quiet else say, roc_log=args.roc_scale == "log")
    tm = dict(run.get("timings", {}))
    tm["report_s"] = time.perf_counter() - t_report
    tm["command_s"] = time.perf_counter() - args._t_start
    tm["imports_s"] = getattr(args, "_t_imports", 0.0)
    (out / "timings.json").write_text(json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                  for k, v in tm.items()}, indent=2))
    _commit(out, final)


def _component_spec(args):
    """--components [--components-track T] [--components-mode M] -> a ComponentSpec, or None."""
    from ..components import ComponentSpec
    if not args.components:
        if args.components_track != "anomaly" or args.components_mode != "benchmark":
            raise CLIError("--components-track / --components-mode need --components")
        return None
    if args.protocol != "default":
        raise CLIError(f"--components binarizes at the default protocol's best-F1 threshold; drop --protocol "
                       f"{args.protocol}")
    return ComponentSpec(track=args.components_track, mode=args.components_mode)


def _plot_formats(args) -> list:
    formats = [f.strip().lower() for f in (args.plot_format or "png").split(",") if f.strip()]
    bad = [f for f in formats if f not in ("png", "pdf", "svg")]
    if bad or not formats:
        raise CLIError(f"--plot-format {args.plot_format!r}: choose from png, pdf, svg (comma-separated)")
    return formats


def _cmd_fit(args) -> int:
    from .grid import LABEL_EXT, LOGIT_EXT, _files, _match
    from .runner import _Reader, naming_the_file
    from .runner import check_fit_logits_layout
    out = check_writable(args.out, "file")
    files = _files(args.logits, Path.cwd(), LOGIT_EXT, "fit logits")
    stems = sorted(files)
    if args.nonfinite != "error" and args.method != "sml":
        raise CLIError("--nonfinite ignore: fit --method heat cannot skip non-finite logits or features; fix or drop "
                       "those files")
    if args.method == "sml":
        from ..fitting import fit_sml
        check_out_not_in_inputs(out.parent, [f.parent for f in files.values()], "--out folder")
        check_fit_logits_layout(files)
        logits = _Reader(files, stems, "logits")
        with naming_the_file(logits), _fit_messages():
            stats = fit_sml(logits, nonfinite=args.nonfinite)
        stats.save(out)
        print(f"anomfast: SML statistics for {stats.num_classes} classes from {int(stats.count.sum())} pixels "
              f"-> {args.out}")
        if stats.fallback_classes:
            print(f"anomfast: classes {stats.fallback_classes} use the pooled statistics (too few pixels)")
        return 0
    if not (args.features and args.labels):
        raise CLIError("anomfast fit --method heat needs --features DIR (D, h, w per image) and --labels DIR "
                         "(semantic class-id maps, --ignore-index ignored) matching --logits by file name")
    from ..fitting import fit_heat
    feats = _files(args.features, Path.cwd(), LOGIT_EXT, "fit features")
    labels = _files(args.labels, Path.cwd(), LABEL_EXT, "fit semantic labels")
    _match("fit", files, feats, kind="features", other="logits file")
    _match("fit", files, labels, kind="semantic label", other="logits file")
    check_out_not_in_inputs(out.parent, [f.parent for d in (files, feats, labels) for f in d.values()], "--out folder")
    check_fit_logits_layout(files, labels)
    readers = (_Reader(files, stems, "logits"), _Reader(feats, stems, "features"), _Reader(labels, stems, "labels"))
    with naming_the_file(*readers), _fit_messages(heat=True):
        stats = fit_heat(*readers, ignore_index=args.ignore_index, temperature=args.temperature,
                         standardize=not args.raw)
    stats.save(out)
    d = stats.describe()
    print(f"anomfast: HEAT statistics, {d['num_classes']} classes x D = {d['dim']} from {d['pixels']} feature "
          f"pixels" + ("" if args.raw else f", score mean {d['score_mean']:.4g} std {d['score_std']:.4g}")
          + f" -> {args.out}")
    return 0


@contextmanager
def _fit_messages(heat: bool = False):
    """The library's advice in terms of the command line: "pass nonfinite='ignore'" (a
    Python keyword) becomes fit's --nonfinite ignore (SML; HEAT fitting cannot skip them)."""
    try:
        yield
    except ValueError as exc:
        msg = str(exc).splitlines()[0] if str(exc) else ""
        if "nonfinite='ignore'" not in msg:
            raise
        m = re.search(r"pass nonfinite='ignore'[^;)]*(\([^)]*\))?", msg)
        fix = ("fix or drop those files (fit --method heat cannot skip them)" if heat else
               "anomfast fit --nonfinite ignore leaves them out of the statistics")
        raise CLIError(msg[:m.start()] + fix + msg[m.end():] if m else msg) from None


def read_histogram_file(path) -> dict:
    """A histograms.npz as a run for write_report: the models and methods `anomfast eval`
    recorded in it, or, for a file from anomfast.save_histograms(path, results.histograms),
    one model named after the file (keys 'model::method' group into models)."""
    import zipfile

    from ..histogram import load_histograms
    from ..methods import CODES
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--histograms {p} does not exist" if not p.exists() else f"--histograms {p} is a folder")
    try:
        hists, extra = load_histograms(p)
    except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"{p}: not a readable anomfast histogram file (truncated or damaged?): {msg}") from None
    if not hists:
        raise CLIError(f"{p}: the file holds no histograms")
    extra = extra if isinstance(extra, dict) else {}
    groups: dict = {}
    for key, h in hists.items():
        model, _, method = key.rpartition("::")  # model names never hold '::'; methods never do
        groups.setdefault(model or p.stem, {})[method or key] = h
    infos = extra.get("models") if isinstance(extra.get("models"), list) else None
    if infos is None:  # a file from anomfast.save_histograms: no run metadata
        infos = [{"name": name} for name in groups]
    models, seen = [], set()
    for info in infos:
        name = info.get("name") if isinstance(info, dict) else None
        if name not in groups:
            raise CLIError(f"{p}: inconsistent file: model {name!r} is listed but has no histograms "
                           f"(histogram keys: {sorted(hists)[:4]})")
        seen.add(name)
        hs = groups[name]
        for method, h in hs.items():
            if h.method != method and method in CODES:
                raise CLIError(f"{p}: inconsistent file: key {name}::{method} holds a {h.method!r} histogram")
        miou = info.get("miou")
        if miou is not None and (isinstance(miou, bool) or not isinstance(miou, (int, float))):
            raise CLIError(f"{p}: inconsistent file: model {name!r} has miou = {miou!r} in its metadata, expected a "
                           "number or null")
        models.append({"name": name, "miou": miou, "images": info.get("images"),
                       "pixels": info.get("pixels"), "histograms": hs})
    if set(groups) - seen:
        raise CLIError(f"{p}: inconsistent file: histograms for models {sorted(set(groups) - seen)} that its "
                       "metadata does not list")
    methods = order_methods([k for m in models for k in m["histograms"]])
    notes = extra.get("notes") if isinstance(extra.get("notes"), list) else []
    options = extra.get("run") if isinstance(extra.get("run"), dict) else None  # absent in older files
    return {"models": models, "methods": methods, "notes": notes, "options": options}


def _cmd_report(args) -> int:
    out = check_writable(args.out)
    if not args.no_plots:
        require({"matplotlib": "matplotlib"}, "plots (leave them out with --no-plots)")
    formats = _plot_formats(args)
    run = read_histogram_file(args.histograms)
    from .report import source_notes
    for note in source_notes(run["options"]):
        say(f"anomfast: note: {note}", args.quiet)
        if note not in run["notes"]:  # a report of a report's histograms: once
            run["notes"].append(note)
    _write_report_timed(run, out, args, formats)
    print((out / "report.md").read_text())
    return 0


EPILOG = """examples:
  anomfast eval --out DIR                                   built-in demo (built once, cached)
  anomfast eval --grid grid.toml --out DIR                  your models x methods grid (TOML, see the
                                                            README's "Command line" section)
  anomfast eval --logits DIR --labels DIR --out DIR         one model; --anomaly-ids / --void-ids /
                                                            --normal-ids map your label values
  anomfast fit --logits ID_LOGITS --out sml.npz             SML statistics
  anomfast report --histograms DIR/histograms.npz --out DIR2 --fpr-mode interp
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anomfast", description="Fast, certified pixel-level anomaly detection "
                                "evaluation for semantic segmentation.", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pi = sub.add_parser("info", help="what this build contains (version, compiler, OpenMP, CUDA)")
    pi.add_argument("--json", action="store_true", help="print it as JSON")
    pi.set_defaults(func=_cmd_info)

    def conventions(sp):
        sp.add_argument("--fpr-mode", default="first", choices=["first", "strict", "interp"],
                        help="FPR95: first threshold with TPR >= 0.95 (default), TPR > 0.95, or interpolated")
        sp.add_argument("--ap-mode", default="step", choices=["step", "trapezoid"],
                        help="AUPR: average precision (default) or trapezoid rule")
        sp.add_argument("--no-plots", action="store_true",
                        help="write the tables, results and histograms only (no plots; matplotlib not needed)")
        sp.add_argument("--plot-format", default="png", metavar="FMT[,FMT]",
                        help="plot file formats: png (default), pdf, svg, or several, e.g. png,pdf")
        sp.add_argument("--roc-scale", default="log", choices=["log", "linear"],
                        help="FPR axis of the ROC plots (default log: the low-FPR range papers compare)")
        sp.add_argument("--quiet", action="store_true", help="no progress or status messages")

    pe = sub.add_parser("eval", help="evaluate a models x methods grid (no data options: the built-in demo)",
                        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    pe.add_argument("--out", required=True, help="output folder (created if needed)")
    pe.add_argument("--grid", help="grid file (TOML): [labels] dir / anomaly_ids / void_ids / normal_ids and "
                    "[[models]] name / logits / sml_stats / features / heat_stats / methods; paths relative to it")
    pe.add_argument("--logits", help="one model: folder (or quoted glob) of per-image logits (C, H, W) "
                    ".npy/.npz/.pt/.safetensors")
    pe.add_argument("--labels", help="folder of label maps matching --logits by file name")
    pe.add_argument("--intersect", action="store_true",
                    help="evaluate only the images that have a label map and a logits (and features) file for "
                         "every model, e.g. when a --logits glob selects a subset; default: every label map "
                         "needs them")
    pe.add_argument("--name", help="model name for --logits (default: the folder name)")
    pe.add_argument("--sml-stats", help="SML statistics file (anomfast fit) for --logits")
    pe.add_argument("--features", help="folder of per-image feature maps (D, h, w) for --logits (method heat)")
    pe.add_argument("--heat-stats", help="HEAT statistics file (anomfast fit --method heat) for --logits")
    pe.add_argument("--anomaly-ids", type=int, nargs="+", help="label values of anomalies (default 1)")
    pe.add_argument("--void-ids", type=int, nargs="*",
                    help="label values to ignore (default 255; give the flag alone for none)")
    pe.add_argument("--normal-ids", nargs="+",
                    help="label values of normal pixels (default 0), or 'rest': every other value; a value in "
                         "no list is an error")
    pe.add_argument("--methods", help="comma-separated methods for every model (default: max_logit, msp, energy, "
                    "plus sml and heat for each model that has what they need)")
    pe.add_argument("--nonfinite", default="error", choices=["error", "ignore"],
                    help="NaN / inf logits on valid pixels: an error naming the file (default), or skip and "
                         "count them")
    pe.add_argument("--allow-empty-class", action="store_true",
                    help="warn instead of failing when a model's images hold no anomaly (or no normal) pixel "
                         "under the label mapping (every metric is then n/a)")
    pe.add_argument("--device", default="cpu", help="cpu or cuda")
    pe.add_argument("--distributed", action="store_true", help="shard images over torch.distributed ranks "
                    "(under torchrun)")
    pe.add_argument("--cache", help="demo cache folder, used as given (default: a demo-v<version> folder under "
                    "$ANOMFAST_CACHE, or under ~/.cache/anomfast)")
    pe.add_argument("--refine", action="store_true",
                    help="read the inputs a second time and re-score in float64 the pixels of the bins where "
                         "FPR95 and the best F1 are decided and of those that widen the AUROC / AP bounds (up to "
                         "16M pixels): every metric and both thresholds become exact (scikit-learn's)")
    from ..protocols import PROTOCOLS
    pe.add_argument("--protocol", default="default", choices=PROTOCOLS,
                    help="ml4cv: the ml4cv-assignment scripts' evaluation (float16 scores, seeded 1M-pixel "
                         "subsample, their FPR95 / F1 / SML rules; see the README)")
    pe.add_argument("--components", action="store_true",
                    help="also the SegmentMeIfYouCan component metrics (sIoU / PPV / mean F1) at each method's "
                         "best pixel-F1 threshold: one more pass over the inputs")
    pe.add_argument("--components-track", default="anomaly", choices=["anomaly", "obstacle"],
                    help="component size limits: anomaly (segments >= 500 px, instances >= 100 px) or obstacle "
                         "(50 / 10)")
    pe.add_argument("--components-mode", default="benchmark", choices=["benchmark", "clean"],
                    help="benchmark: the benchmark code's quirks (default); clean: the definition (README)")
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
    pf.add_argument("--nonfinite", default="error", choices=["error", "ignore"],
                    help="sml: NaN / inf logits: an error naming the file (default), or leave those pixels out")
    pf.add_argument("--out", required=True, help="statistics file to write (.npz)")
    pf.set_defaults(func=_cmd_fit)

    pr = sub.add_parser("report", help="re-finalize saved histograms with other definitions, without the logits")
    pr.add_argument("--histograms", required=True, help="histograms.npz from anomfast eval, or a file written by "
                    "anomfast.save_histograms")
    pr.add_argument("--out", required=True, help="output folder (created if needed)")
    conventions(pr)
    pr.set_defaults(func=_cmd_report)
    return p


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the clean-up of an interrupt runs."""


def _on_sigterm():
    """Installs a SIGTERM handler raising _Terminated; returns [the previous handler], or
    None where signals cannot be set (not the main thread)."""
    def handler(signum, frame):
        raise _Terminated()
    try:
        return [signal.signal(signal.SIGTERM, handler)]
    except (ValueError, OSError, AttributeError):
        return None


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = build_parser().parse_args(argv)
    args._t_start = t_start
    _CREATED.clear()
    _STAGES.clear()
    ok = False
    old_term = _on_sigterm()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(set())
            rc = args.func(args)
        ok = rc == 0
        return rc
    except (ValueError, TypeError, OSError, NotImplementedError, KeyError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"anomfast: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        term = isinstance(exc, _Terminated)
        print(f"anomfast: {'terminated' if term else 'interrupted'}", file=sys.stderr)
        return 143 if term else 130
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term[0] if old_term[0] is not None else signal.SIG_DFL)
        _remove_stages()  # a failed or interrupted run's staged outputs (a committed run has none)
        if not ok:
            _remove_created()
        _CREATED.clear()


if __name__ == "__main__":
    raise SystemExit(main())
