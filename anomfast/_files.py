"""Statistics files (SML, HEAT): arrays plus a JSON metadata record with a format tag, in
one .npz, never unpickled."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def save_npz(path, meta: dict, **arrays) -> None:
    with open(Path(path), "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def savez_fast(path, **arrays) -> None:
    """np.savez_compressed's file (an .npz np.load reads) at zlib level 1: histograms of
    millions of bins compress about as well and 3-4x faster than at the default level 6."""
    import zipfile
    with zipfile.ZipFile(Path(path), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def load_npz(path, fmt: str, what: str) -> tuple:
    """({name: array}, metadata) of a file save_npz wrote with meta["format"] == fmt;
    what: how errors name the file's kind (e.g. "SML statistics")."""
    with np.load(Path(path), allow_pickle=False) as z:
        try:
            meta = json.loads(str(z["meta"]))
        except KeyError:
            raise ValueError(f"{path} is not an anomfast {what} file (no metadata)") from None
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: unknown {what} format {meta.get('format')!r}, expected {fmt}")
        return {k: z[k] for k in z.files if k != "meta"}, meta
