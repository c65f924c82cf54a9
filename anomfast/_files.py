"""Statistics files (SML, HEAT): arrays plus a JSON metadata record with a format tag, in
one .npz, never unpickled."""
from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np


def save_npz(path, meta: dict, **arrays) -> None:
    with open(Path(path), "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), **arrays)


def savez_fast(path, **arrays) -> None:
    """np.savez_compressed's file (an .npz np.load reads) at zlib level 1: histograms of
    millions of bins compress about as well and 3-4x faster than at the default level 6."""
    with zipfile.ZipFile(Path(path), "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name, a in arrays.items():
            with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(a), allow_pickle=False)


def open_npz(path, what: str):
    """np.load of an .npz, never unpickling; a file that is no .npz archive gets an error
    naming what was expected (numpy's own speaks of pickled data for a text file)."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except (ValueError, EOFError, zipfile.BadZipFile):
        raise ValueError(f"{p} is not a valid .npz file (expected an anomfast {what} file)") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{p} holds a single .npy array, not an .npz archive (expected an anomfast {what} file)")
    return z


def read_array(z, name: str, path, what: str) -> np.ndarray:
    """z[name] of an opened .npz, or an error naming the damaged member."""
    try:
        return z[name]
    except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:  # ValueError: an object array, a bad header
        raise ValueError(f"{path}: the array {name!r} of this anomfast {what} file cannot be read (truncated or "
                         f"damaged?): {exc}") from None


def read_meta(z, path, what: str) -> dict:
    """The JSON metadata record of an opened .npz (open_npz), as a dict."""
    if "meta" not in z.files:
        raise ValueError(f"{path} is not an anomfast {what} file (no metadata)")
    try:
        meta = json.loads(str(read_array(z, "meta", path, what)))
    except json.JSONDecodeError:
        raise ValueError(f"{path}: the metadata of an anomfast {what} file must be a JSON object; this one is "
                         "not JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: the metadata of an anomfast {what} file must be a JSON object, got "
                         f"{type(meta).__name__}")
    return meta


def load_npz(path, fmt: str, what: str) -> tuple:
    """({name: array}, metadata) of a file save_npz wrote with meta["format"] == fmt;
    what: how errors name the file's kind (e.g. "SML statistics")."""
    with open_npz(path, what) as z:
        meta = read_meta(z, path, what)
        if meta.get("format") != fmt:
            raise ValueError(f"{path}: unknown {what} format {meta.get('format')!r}, expected {fmt}")
        return {k: read_array(z, k, path, what) for k in z.files if k != "meta"}, meta
