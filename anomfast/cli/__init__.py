"""The command-line application (`anomfast`, `python -m anomfast`), built on the library
(the modules directly in anomfast/), which never imports it (tests/test_structure.py):

    app       argument parsing and the commands (eval, fit, report, info): main()
    grid      grid files (TOML) and the per-image input files
    runner    the grid loop (prefetching reader, the library's accumulator, finalization)
    report    report.md, results.csv / .json, report.tex, histograms.npz
    plots     ROC / PR curves, score distributions, example maps (matplotlib)
    demo      the built-in demo data and its PNG reader / writer

Importing this package imports only the standard library: `anomfast --help` needs
neither torch nor matplotlib (each command imports what it uses).
"""
from .app import main

__all__ = ["main"]
