"""Built-in demo data: the Fishyscapes Static protocol in miniature, made from real data.

Scenes are composed from scikit-learn's bundled digits (1797 real 8x8 grayscale
images). Digits 0-4 are the in-distribution classes (semantic classes 1..5, class 0 is
the background); digits 5-9 are anomalies that no network ever sees in training. Each
scene is a 64x64 canvas with a textured, noisy background and several upscaled digits
pasted at random places; test scenes also get one or two anomaly digits. The digit
images are split once (seeded) into train / fit / test pools, so the test and fit
scenes only use digit images never used in training.

Small fully-convolutional networks (one row of the evaluation grid each) are trained
on in-distribution training scenes to predict the 6 classes per pixel. For the test
scenes and for a held-out set of in-distribution-only "fit" scenes (for SML
statistics) the demo stores each network's logits (C, H, W), a feature map (D, h, w)
for feature-space methods, the anomaly label maps (0 normal, 1 anomaly, 255 void on a
thin band around each anomaly object, the Fishyscapes Static convention), semantic
label maps (0..5, 255 on anomaly/void) and the input images, plus ``grid.toml``
describing the models x data grid, all like user data on disk::

    <cache>/grid.toml
    <cache>/DONE                                   json, written last
    <cache>/images/{name}.png                      uint8 grayscale scene
    <cache>/labels/{name}.png                      uint8 0 / 1 / 255
    <cache>/semantic/{name}.png                    uint8 0..5 / 255
    <cache>/models/{slug}/logits/{name}.npy        float16 (6, 64, 64)
    <cache>/models/{slug}/features/{name}.npy      float16 (32, 16, 16)
    <cache>/models/{slug}/fit/logits/{fit}.npy     float16 (6, 64, 64)
    <cache>/models/{slug}/fit/features/{fit}.npy   float16 (32, 16, 16)
    <cache>/models/{slug}/fit/semantic/{fit}.png   uint8 0..5

The build is deterministic for a given thread count (numpy PCG64 for the data,
``torch.manual_seed`` and deterministic algorithms for the training), runs on a
2-core CPU in about a minute, and goes into a temporary directory that is renamed into
place once complete, so a half-built cache is never reused. Temporary directories left
by a killed build (``.demo-v*.tmp-<pid>-*`` of a process that no longer runs) are
removed by the next build. ``DONE`` records every file's size and CRC-32; a reused
cache is verified against it and rebuilt when a file is damaged or missing. A build
replaces the whole cache folder, so it refuses (changing nothing) a file, or a non-empty
folder that is not a demo cache or holds files no build wrote.

This module imports only torch, numpy, the standard library and (inside functions)
scikit-learn; PNG files are written by a small zlib encoder (readable by pillow).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import struct
import time
import uuid
import zlib
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

DEMO_VERSION = 1

H = W = 64
NUM_CLASSES = 6                      # background + digits 0-4
FEATURE_DIM = 32
FEATURE_STRIDE = 4
CLASS_NAMES = ("background", "digit 0", "digit 1", "digit 2", "digit 3", "digit 4")
ID_DIGITS = (0, 1, 2, 3, 4)
ANOMALY_DIGITS = (5, 6, 7, 8, 9)
SEED = 20240611

DEFAULT_N_TEST = 128
DEFAULT_N_FIT = 64
DEFAULT_N_TRAIN = 2048               # training scenes (generated once, reused every epoch)
DEFAULT_TRAIN_STEPS = 600
QUICK = {"n_train": 256, "train_steps": 60}
BATCH = 8
LR = 5e-3

# (display name, slug, width, augmented)
MODELS = (
    ("SmallFCN Baseline", "smallfcn-baseline", 16, False),
    ("SmallFCN Augmented", "smallfcn-augmented", 16, True),
)

_INK = 0.35                          # a digit's mask: upscaled intensity (0..1) above this
_SIZE_RANGE = (16, 29)               # pasted digit size in pixels (8x8 upscaled 2x..3.5x)


# --------------------------------------------------------------------------- paths

def default_cache_dir() -> pathlib.Path:
    """$ANOMFAST_CACHE (or $XDG_CACHE_HOME/anomfast, or ~/.cache/anomfast) / demo-v{DEMO_VERSION}."""
    base = os.environ.get("ANOMFAST_CACHE")
    if base:
        root = pathlib.Path(base).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache") / "anomfast"
    return root / f"demo-v{DEMO_VERSION}"


# --------------------------------------------------------------------------- PNG i/o

def write_png(path, array: np.ndarray) -> None:
    """Write a 2-D uint8 array as an 8-bit grayscale PNG (deterministic bytes)."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    if a.ndim != 2:
        raise ValueError(f"write_png needs a 2-D array, got shape {a.shape}")
    h, w = a.shape
    raw = b"".join(b"\x00" + a[i].tobytes() for i in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def read_png(path) -> np.ndarray:
    """Read an 8-bit grayscale, non-interlaced PNG as written by :func:`write_png`."""
    data = pathlib.Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    pos, idat, w = 8, [], None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if tag == b"IHDR":
            w, h, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            if depth != 8 or color != 0 or interlace != 0:
                raise ValueError(f"{path}: read_png reads only 8-bit grayscale PNGs")
        elif tag == b"IDAT":
            idat.append(body)
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), dtype=np.uint8).reshape(h, w + 1)
    out = np.zeros((h, w), dtype=np.uint8)
    prev = np.zeros(w, dtype=np.int32)
    for i in range(h):
        ft, line = raw[i, 0], raw[i, 1:].astype(np.int32)
        if ft == 0:
            cur = line
        elif ft == 2:
            cur = (line + prev) & 255
        else:  # filters 1, 3, 4 need the left neighbour: decode sequentially
            cur = np.zeros(w, dtype=np.int32)
            for j in range(w):
                a = cur[j - 1] if j else 0
                b = prev[j]
                c = prev[j - 1] if j else 0
                if ft == 1:
                    p = a
                elif ft == 3:
                    p = (a + b) // 2
                else:
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                cur[j] = (line[j] + p) & 255
        out[i] = cur
        prev = cur
    return out


# --------------------------------------------------------------------------- scenes

def _resize_bilinear(img: np.ndarray, oh: int, ow: int) -> np.ndarray:
    """Bilinear resize (align_corners=False, edge-clamped), float32."""
    ih, iw = img.shape

    def axis(o, i):
        c = (np.arange(o, dtype=np.float64) + 0.5) * (i / o) - 0.5
        c = np.clip(c, 0.0, i - 1)
        c0 = np.floor(c).astype(np.int64)
        c1 = np.minimum(c0 + 1, i - 1)
        return c0, c1, (c - c0).astype(np.float32)

    y0, y1, wy = axis(oh, ih)
    x0, x1, wx = axis(ow, iw)
    img = img.astype(np.float32)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bot = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bot * wy[:, None]


def _dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        m = np.pad(out, 1)
        out = (m[1:-1, 1:-1] | m[:-2, 1:-1] | m[2:, 1:-1] | m[1:-1, :-2] | m[1:-1, 2:]
               | m[:-2, :-2] | m[:-2, 2:] | m[2:, :-2] | m[2:, 2:])
    return out


def _split_digits(seed: int = SEED) -> dict:
    """Digit images (0..1 floats) split into train / fit / test pools and the anomaly pool."""
    from sklearn.datasets import load_digits
    d = load_digits()
    images = (d.images.astype(np.float32) / 16.0)
    target = d.target.astype(np.int64)
    rng = np.random.Generator(np.random.PCG64(seed))
    pools = {"train": [], "fit": [], "test": [], "anomaly": []}
    for digit in range(10):
        idx = np.nonzero(target == digit)[0]
        idx = idx[rng.permutation(len(idx))]
        if digit in ANOMALY_DIGITS:
            pools["anomaly"].append(idx)
            continue
        n_tr, n_fit = int(round(0.6 * len(idx))), int(round(0.15 * len(idx)))
        pools["train"].append(idx[:n_tr])
        pools["fit"].append(idx[n_tr:n_tr + n_fit])
        pools["test"].append(idx[n_tr + n_fit:])
    out = {}
    for k, v in pools.items():
        idx = np.sort(np.concatenate(v))
        out[k] = (images[idx], target[idx], idx)
    return out


def _background(rng: np.random.Generator) -> np.ndarray:
    g = int(rng.integers(3, 8))
    coarse = rng.random((g, g)).astype(np.float32)
    tex = _resize_bilinear(coarse, H, W)
    lo = rng.uniform(0.0, 0.15)
    amp = rng.uniform(0.05, 0.3)
    bg = lo + amp * tex
    if rng.random() < 0.5:  # faint stripes
        yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
        ang, per = rng.uniform(0, np.pi), rng.uniform(6, 20)
        bg += rng.uniform(0.02, 0.08) * np.sin(2 * np.pi * (np.cos(ang) * xx + np.sin(ang) * yy) / per)
    return bg.astype(np.float32)


def _place(rng, size, boxes, tries=30):
    for _ in range(tries):
        y, x = int(rng.integers(0, H - size + 1)), int(rng.integers(0, W - size + 1))
        ok = True
        for (by, bx, bs) in boxes:  # boxes shrunk by 2 px must not intersect
            if y + 2 < by + bs - 2 and by + 2 < y + size - 2 and x + 2 < bx + bs - 2 and bx + 2 < x + size - 2:
                ok = False
                break
        if ok:
            boxes.append((y, x, size))
            return y, x
    return None


def _make_scene(rng: np.random.Generator, pool, anomaly_pool=None):
    """One scene: (image float32 [0,1], semantic uint8, anomaly label uint8 or None)."""
    images, target, _ = pool
    canvas = _background(rng)
    sem = np.zeros((H, W), dtype=np.uint8)
    anom = np.zeros((H, W), dtype=bool)
    boxes = []
    objects = []
    if anomaly_pool is not None:
        a_img, a_t, _ = anomaly_pool
        for _ in range(int(rng.integers(1, 3))):
            k = int(rng.integers(len(a_t)))
            objects.append((a_img[k], None))
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(len(target)))
        objects.append((images[k], int(target[k]) + 1))
    for img, cls in objects:
        size = int(rng.integers(*_SIZE_RANGE))
        at = _place(rng, size, boxes)
        if at is None:
            continue
        y, x = at
        alpha = np.clip(_resize_bilinear(img, size, size), 0.0, 1.0)
        ink = float(rng.uniform(0.65, 1.0))
        region = canvas[y:y + size, x:x + size]
        canvas[y:y + size, x:x + size] = region * (1 - alpha) + ink * alpha
        mask = alpha > _INK
        if cls is None:
            anom[y:y + size, x:x + size] |= mask
            sem[y:y + size, x:x + size][mask] = 0
        else:
            sem[y:y + size, x:x + size][mask] = cls
            anom[y:y + size, x:x + size] &= ~mask
    canvas = canvas + rng.normal(0.0, rng.uniform(0.01, 0.05), size=(H, W)).astype(np.float32)
    canvas = np.clip(canvas, 0.0, 1.0).astype(np.float32)
    if anomaly_pool is None:
        return canvas, sem, None
    label = np.zeros((H, W), dtype=np.uint8)
    label[anom] = 1
    label[_dilate(anom, 1) & ~anom] = 255      # 1-px void band around anomaly objects
    sem[label != 0] = 255
    return canvas, sem, label


def _make_scenes(seed_key, n, pool, anomaly_pool=None):
    rng = np.random.Generator(np.random.PCG64([SEED, *seed_key]))
    imgs = np.zeros((n, H, W), np.float32)
    sems = np.zeros((n, H, W), np.uint8)
    labels = np.zeros((n, H, W), np.uint8) if anomaly_pool is not None else None
    for i in range(n):
        im, se, la = _make_scene(rng, pool, anomaly_pool)
        imgs[i], sems[i] = im, se
        if labels is not None:
            labels[i] = la
    return imgs, sems, labels


# --------------------------------------------------------------------------- networks

def _conv(cin, cout, stride=1, dilation=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallFCN(nn.Module):
    """A small encoder-decoder FCN (about 60k parameters, cheap enough to train on 2 CPU threads).

    Stride-2 stem, a stride-4 dilated context block (receptive field > 64 px), a
    decoder at 1/2 resolution with a skip connection, logits bilinearly upsampled to
    the input size (as DeepLab-style Cityscapes models do). ``forward`` returns
    (logits (B, C, H, W), features (B, D, H/4, W/4)); the features are the context
    block's projection that feeds the decoder.
    """

    def __init__(self, width: int = 16, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_CLASSES):
        super().__init__()
        w = width
        self.stem = nn.Sequential(_conv(1, w, stride=2), _conv(w, 2 * w))                  # 1/2
        self.down = _conv(2 * w, 2 * w, stride=2)                                            # 1/4
        self.context = nn.Sequential(_conv(2 * w, 2 * w, dilation=2), _conv(2 * w, 2 * w, dilation=4),
                                     _conv(2 * w, 2 * w, dilation=8))
        self.project = nn.Sequential(nn.Conv2d(2 * w, feature_dim, 1, bias=False), nn.BatchNorm2d(feature_dim),
                                     nn.ReLU(inplace=True))
        self.decode = _conv(feature_dim + 2 * w, w)                                          # 1/2
        self.classifier = nn.Conv2d(w, num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        s = self.stem(x)
        f = self.project(self.context(self.down(s)))
        u = F.interpolate(f, size=s.shape[-2:], mode="bilinear", align_corners=False)
        u = self.decode(torch.cat([u, s], 1))
        logits = F.interpolate(self.classifier(u), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logits, f


def _augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator):
    """Photometric (contrast, brightness, gamma, noise) and scale jitter, seeded by rng."""
    b = x.shape[0]
    c = torch.from_numpy(rng.uniform(0.75, 1.25, (b, 1, 1, 1)).astype(np.float32))
    o = torch.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1)).astype(np.float32))
    g = torch.from_numpy(np.exp(rng.uniform(-0.25, 0.25, (b, 1, 1, 1))).astype(np.float32))
    s = torch.from_numpy(rng.uniform(0.0, 0.06, (b, 1, 1, 1)).astype(np.float32))
    n = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
    x = (x.clamp(0, 1) ** g - 0.5) * c + 0.5 + o + s * n
    if rng.random() < 0.5:  # scale jitter (one factor per batch)
        size = int(round(H * float(rng.uniform(0.85, 1.2))))
        if size != H:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
            if size > H:
                oy, ox = (int(v) for v in rng.integers(0, size - H + 1, 2))
                x, y = x[..., oy:oy + H, ox:ox + W], y[..., oy:oy + H, ox:ox + W]
            else:
                p = H - size
                py, px = (int(v) for v in rng.integers(0, p + 1, 2))
                pad = (px, p - px, py, p - py)
                x = F.pad(x, pad, mode="replicate")
                y = F.pad(y, pad, value=0)
    return x.contiguous(), y.contiguous()


def _train(model, imgs, sems, *, steps, seed, augment, report=None):
    """report(step, loss, seconds left): called about every 10% of the steps (the demo
    build's progress lines)."""
    rng = np.random.Generator(np.random.PCG64([SEED, seed, 7]))
    X = torch.from_numpy(imgs)[:, None]
    Y = torch.from_numpy(sems.astype(np.int64))
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps)))
    model.train()
    loss_v = float("nan")
    t0 = time.perf_counter()
    every = max(1, steps // 10)
    for i in range(steps):
        idx = torch.from_numpy(rng.integers(0, len(X), BATCH))
        x, y = X[idx], Y[idx]
        if augment:
            x, y = _augment(x, y, rng)
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if report is not None and (i + 1) % every == 0 and i + 1 < steps:
            dt = time.perf_counter() - t0
            report(i + 1, loss_v, dt * (steps - i - 1) / (i + 1))
    model.eval()
    return loss_v


@torch.no_grad()
def _infer(model, imgs, batch=64):
    logits, feats = [], []
    X = torch.from_numpy(imgs)[:, None]
    for i in range(0, len(X), batch):
        lo, fe = model(X[i:i + batch])
        logits.append(lo.to(torch.float16).numpy())
        feats.append(fe.to(torch.float16).numpy())
    return np.concatenate(logits), np.concatenate(feats)


def _miou(logits: np.ndarray, sem: np.ndarray):
    pred = logits.argmax(1).astype(np.int64)
    keep = sem != 255
    cm = np.bincount(sem[keep].astype(np.int64) * NUM_CLASSES + pred[keep],
                     minlength=NUM_CLASSES ** 2).reshape(NUM_CLASSES, NUM_CLASSES)
    from ..metrics import mean_iou  # the one mIoU definition (the CLI's report uses it too)
    return mean_iou(cm)


def _max_logit_auroc(logits: np.ndarray, labels: np.ndarray) -> Optional[float]:
    keep = labels != 255
    y = labels[keep]
    if y.min() == y.max():
        return None
    from sklearn.metrics import roc_auc_score
    score = -logits.astype(np.float32).max(1)
    return float(roc_auc_score(y, score[keep]))


# --------------------------------------------------------------------------- build / load

def _config(n_test, n_fit, n_train, train_steps) -> dict:
    return {"version": DEMO_VERSION, "seed": SEED, "n_test": int(n_test), "n_fit": int(n_fit),
            "n_train": int(n_train), "train_steps": int(train_steps), "height": H, "width": W,
            "models": [m[1] for m in MODELS]}


def _read_marker(path: pathlib.Path) -> Optional[dict]:
    """The DONE marker of a demo cache of any version, or None."""
    try:
        done = json.loads((path / "DONE").read_text())
    except (OSError, ValueError):
        return None
    return done if isinstance(done, dict) and "version" in done and "config" in done else None


def _read_done(path: pathlib.Path) -> Optional[dict]:
    done = _read_marker(path)
    return done if done is not None and done.get("version") == DEMO_VERSION else None


def _manifest(root: pathlib.Path) -> dict:
    """{relative path: [size, crc32]} of every file under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[p.relative_to(root).as_posix()] = [p.stat().st_size, zlib.crc32(p.read_bytes()) & 0xFFFFFFFF]
    return out


def damaged_file(root: pathlib.Path, done: dict) -> Optional[str]:
    """The first file of a finished cache that is missing or differs from DONE's record
    (size, then CRC-32), as 'path (why)'; None when all match (or DONE predates records)."""
    files = done.get("files")
    if not isinstance(files, dict):
        return None
    for rel, (size, crc) in files.items():
        p = root / rel
        try:
            got = p.stat().st_size
            if got != size:
                return f"{p} (size {got} bytes, expected {size})"
            if zlib.crc32(p.read_bytes()) & 0xFFFFFFFF != crc:
                return f"{p} (checksum differs)"
        except OSError:
            return f"{p} (missing or unreadable)"
    return None


def _default_config() -> dict:
    return _config(DEFAULT_N_TEST, DEFAULT_N_FIT, DEFAULT_N_TRAIN, DEFAULT_TRAIN_STEPS)


def demo_is_built(cache_dir=None) -> bool:
    """A complete, undamaged default demo is in cache_dir (default :func:`default_cache_dir`):
    build_demo() will reuse it without building (nor needing scikit-learn)."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    done = _read_done(root)
    return done is not None and done.get("config") == _default_config() and damaged_file(root, done) is None


# what a build writes (relative paths), for a DONE without a file record
_LAYOUT = re.compile(r"grid\.toml|(images|labels|semantic)/[^/]+\.png|models/[^/]+/(fit/)?(logits|features)/[^/]+\.npy"
                     r"|models/[^/]+/fit/semantic/[^/]+\.png")


def _raise(exc):
    raise exc


def check_replaceable(cache_dir=None) -> None:
    """Raises (changing nothing) unless building the demo into cache_dir (default
    :func:`default_cache_dir`) can only delete what an earlier build wrote: cache_dir must
    be absent, an empty folder, or a demo cache (its DONE marker) holding nothing but the
    files its DONE records (or, for a DONE without a record, files of the demo's layout).
    A build replaces the whole folder, so anything else in it would be lost."""
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not root.exists():
        return
    if not root.is_dir():
        raise NotADirectoryError(f"the demo cache {root} is a file, not a folder; give a new or empty folder "
                                 "(nothing was changed)")
    found = []  # every file, link or other non-folder under root (a linked folder is not entered)
    for d, dirs, files in os.walk(root, onerror=_raise):
        found += [os.path.join(d, n) for n in files + [n for n in dirs if os.path.islink(os.path.join(d, n))]]
    found = sorted(pathlib.Path(f).relative_to(root).as_posix() for f in found)
    if not found:
        return
    if "DONE" not in found:
        raise FileExistsError(f"the demo cache folder {root} is not empty and is not an anomfast demo cache (no DONE "
                              f"marker; it holds {found[0]}{', ...' if len(found) > 1 else ''}): the demo is built "
                              "only into a new or empty folder or over an earlier demo; nothing was changed")
    done = _read_marker(root)
    record = done.get("files") if done is not None else None
    for rel in found:
        if rel != "DONE" and not (rel in record if isinstance(record, dict) else _LAYOUT.fullmatch(rel)):
            raise FileExistsError(f"the demo cache {root} holds {rel}, which no demo build wrote: a rebuild replaces "
                                  "the whole folder, so move it out (or delete the folder) first; nothing was changed")


_STALE = re.compile(r"\.(?P<name>.+)\.(tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by someone else
        return True
    return True


def clean_stale(cache_dir: pathlib.Path) -> list:
    """Removes the temporary build / trash directories next to cache_dir that a killed
    build left behind (their process no longer runs). Returns the removed paths."""
    removed = []
    try:
        entries = list(cache_dir.parent.iterdir())
    except OSError:
        return removed
    for p in entries:
        m = _STALE.fullmatch(p.name)
        if m and m.group("name") == cache_dir.name and p.is_dir():
            pid = int(m.group("pid"))
            if pid != os.getpid() and not _pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _grid_toml(models) -> str:
    lines = ["# anomfast built-in demo: digits 0-4 in-distribution, 5-9 anomalies (scikit-learn digits)",
             f"# demo version {DEMO_VERSION}; input scenes in images/, classes: " + ", ".join(CLASS_NAMES),
             "", "[labels]", 'dir = "labels"', "anomaly_ids = [1]", "void_ids = [255]",
             'semantic_dir = "semantic"']
    for name, slug, _, _ in models:
        m = f"models/{slug}"
        lines += ["", "[[models]]", f'name = "{name}"', f'logits = "{m}/logits"', f'features = "{m}/features"',
                  f'fit_logits = "{m}/fit/logits"', f'fit_features = "{m}/fit/features"',
                  f'fit_semantic = "{m}/fit/semantic"']
    return "\n".join(lines) + "\n"


def build_demo(cache_dir=None, *, n_test: int = DEFAULT_N_TEST, n_fit: int = DEFAULT_N_FIT,
               num_threads: Optional[int] = None, progress: Optional[Callable[[str], None]] = None,
               force: bool = False, quick: bool = False, train_steps: Optional[int] = None,
               n_train: Optional[int] = None) -> pathlib.Path:
    """Build the demo under ``cache_dir`` (default :func:`default_cache_dir`) and return it.

    A complete cache (its ``DONE`` marker records the same version and settings) is
    reused unless ``force``. Otherwise cache_dir must be new, empty or an earlier demo
    cache with nothing else in it (:func:`check_replaceable`, checked before any work):
    the build replaces the whole folder. ``quick`` trains briefly on fewer scenes (for tests);
    ``train_steps`` / ``n_train`` override the training length and set size.
    ``num_threads`` sets torch's thread count for the build (default: unchanged);
    results are deterministic for a given thread count.
    """
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if n_train is None:
        n_train = QUICK["n_train"] if quick else DEFAULT_N_TRAIN
    if train_steps is None:
        train_steps = QUICK["train_steps"] if quick else DEFAULT_TRAIN_STEPS
    if n_test < 1 or n_fit < 1 or n_train < 1 or train_steps < 1:
        raise ValueError("n_test, n_fit, n_train and train_steps must be >= 1")
    config = _config(n_test, n_fit, n_train, train_steps)
    say = progress or (lambda s: None)

    for p in clean_stale(cache_dir):
        say(f"demo: removed {p}, left by a build that was killed")
    done = _read_done(cache_dir)
    damaged = None
    if not force and done is not None and done.get("config") == config:
        damaged = damaged_file(cache_dir, done)
        if damaged is None:
            return cache_dir
        say(f"demo: the cache is damaged: {damaged}; rebuilding it")
    check_replaceable(cache_dir)  # before any work: a user's folder is refused, untouched

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.parent / f".{cache_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if num_threads is not None:
            torch.set_num_threads(int(num_threads))
        torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
            try:
                stats = _build_into(tmp, config, say)
            except Exception as exc:
                if damaged is None:
                    raise
                raise OSError(f"the demo cache is damaged ({damaged}) and could not be rebuilt "
                              f"({type(exc).__name__}: {exc}); delete {cache_dir} and run again") from exc
        # install: move any stale/incomplete cache aside, then rename ours into place
        for _ in range(3):
            if cache_dir.exists():
                current = _read_done(cache_dir)
                if not force and current is not None and current.get("config") == config \
                        and damaged_file(cache_dir, current) is None:
                    shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build finished first
                    return cache_dir
                check_replaceable(cache_dir)  # again: it may have changed during the build
                trash = cache_dir.parent / f".{cache_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(cache_dir, trash)
                    shutil.rmtree(trash, ignore_errors=True)
                except OSError:
                    pass
            try:
                os.rename(tmp, cache_dir)
                break
            except OSError:
                continue
        else:
            raise OSError(f"could not install the demo into {cache_dir}")
        say(f"demo: ready in {cache_dir} ({stats['timings']['total_s']:.1f} s)")
        return cache_dir
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_into(root: pathlib.Path, config: dict, say) -> dict:
    t0 = time.perf_counter()
    timings = {}
    n_test, n_fit, n_train, steps = config["n_test"], config["n_fit"], config["n_train"], config["train_steps"]
    say(f"demo: composing scenes from scikit-learn digits ({n_train} train, {n_fit} fit, {n_test} test)")
    pools = _split_digits(SEED)
    tr_img, tr_sem, _ = _make_scenes((1,), n_train, pools["train"])
    fit_img, fit_sem, _ = _make_scenes((2,), n_fit, pools["fit"])
    te_img, te_sem, te_lab = _make_scenes((3,), n_test, pools["test"], pools["anomaly"])
    timings["scenes_s"] = round(time.perf_counter() - t0, 3)

    test_names = [f"scene_{i:04d}" for i in range(n_test)]
    fit_names = [f"fit_{i:04d}" for i in range(n_fit)]
    for sub in ("images", "labels", "semantic"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(test_names):
        write_png(root / "images" / f"{name}.png", np.round(te_img[i] * 255).astype(np.uint8))
        write_png(root / "labels" / f"{name}.png", te_lab[i])
        write_png(root / "semantic" / f"{name}.png", te_sem[i])

    models_info = []
    for mi, (name, slug, width, augment) in enumerate(MODELS):
        t1 = time.perf_counter()
        say(f"demo: training {name} ({steps} steps, {torch.get_num_threads()} threads)")
        torch.manual_seed(SEED + 1000 * mi)
        model = SmallFCN(width=width)
        def report(step, loss_v, left, name=name):
            say(f"demo: training {name}: step {step}/{steps}, loss {loss_v:.3f}, "
                f"ETA {int(left) // 60:d}:{int(left) % 60:02d}")
        loss = _train(model, tr_img, tr_sem, steps=steps, seed=mi, augment=augment, report=report)
        t_train = time.perf_counter() - t1
        logits, feats = _infer(model, te_img)
        fit_logits, fit_feats = _infer(model, fit_img)
        miou, ious = _miou(logits, te_sem)
        auroc = _max_logit_auroc(logits, te_lab)
        mdir = root / "models" / slug
        for sub in ("logits", "features", "fit/logits", "fit/features", "fit/semantic"):
            (mdir / sub).mkdir(parents=True, exist_ok=True)
        for i, n in enumerate(test_names):
            np.save(mdir / "logits" / f"{n}.npy", logits[i])
            np.save(mdir / "features" / f"{n}.npy", feats[i])
        for i, n in enumerate(fit_names):
            np.save(mdir / "fit" / "logits" / f"{n}.npy", fit_logits[i])
            np.save(mdir / "fit" / "features" / f"{n}.npy", fit_feats[i])
            write_png(mdir / "fit" / "semantic" / f"{n}.png", fit_sem[i])
        dt = time.perf_counter() - t1
        timings[f"{slug}_s"] = round(dt, 3)
        models_info.append({"name": name, "slug": slug, "width": width, "augmented": augment,
                            "train_s": round(t_train, 3), "final_loss": round(loss, 5),
                            "miou": round(miou, 5), "iou": [None if v is None else round(v, 5) for v in ious],
                            "max_logit_auroc": None if auroc is None else round(auroc, 5)})
        say(f"demo: {name}: mIoU {100 * miou:.1f}%, max-logit AUROC "
            f"{'n/a' if auroc is None else f'{100 * auroc:.1f}%'} ({dt:.1f} s)")

    (root / "grid.toml").write_text(_grid_toml(MODELS))
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    done = {"version": DEMO_VERSION, "config": config, "num_classes": NUM_CLASSES, "class_names": list(CLASS_NAMES),
            "image_size": [H, W], "feature_shape": [FEATURE_DIM, H // FEATURE_STRIDE, W // FEATURE_STRIDE],
            "features": "context-block projection feeding the decoder, 1/4 resolution, float16",
            "logits_dtype": "float16",
            "n_test": n_test, "n_fit": n_fit, "test_names": test_names, "fit_names": fit_names,
            "anomaly_pixels": int((te_lab == 1).sum()), "normal_pixels": int((te_lab == 0).sum()),
            "void_pixels": int((te_lab == 255).sum()), "bytes": size, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timings": timings, "models": models_info, "files": _manifest(root)}
    tmp_done = root / "DONE.tmp"
    tmp_done.write_text(json.dumps(done, indent=1))
    os.replace(tmp_done, root / "DONE")
    return done


def load_demo(cache_dir=None, *, build: bool = False, **build_kwargs) -> dict:
    """Light index of a built demo (paths and metadata only; no arrays are read).

    Raises FileNotFoundError if the demo is not built (complete) under ``cache_dir``,
    unless ``build`` is true, in which case :func:`build_demo` builds it first.
    """
    root = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if build:
        root = build_demo(root, **build_kwargs)
    done = _read_done(root)
    if done is None:
        raise FileNotFoundError(f"no complete anomfast demo (version {DEMO_VERSION}) in {root}; "
                                "build it with anomfast.cli.demo.build_demo()")
    damaged = damaged_file(root, done)
    if damaged is not None:
        raise OSError(f"the anomfast demo in {root} is damaged: {damaged}; rebuild it with "
                      f"anomfast.cli.demo.build_demo() or delete {root}")
    models = []
    for m in done["models"]:
        base = root / "models" / m["slug"]
        models.append({"name": m["name"], "slug": m["slug"], "logits": base / "logits",
                       "features": base / "features", "fit_logits": base / "fit" / "logits",
                       "fit_features": base / "fit" / "features", "fit_semantic": base / "fit" / "semantic",
                       "miou": m["miou"], "max_logit_auroc": m.get("max_logit_auroc")})
    return {"root": root, "grid": root / "grid.toml", "version": done["version"],
            "images": root / "images", "labels": root / "labels", "semantic": root / "semantic",
            "label_map": {"anomaly_ids": [1], "void_ids": [255], "normal_ids": [0]},
            "num_classes": done["num_classes"], "class_names": done["class_names"],
            "names": list(done["test_names"]), "fit_names": list(done["fit_names"]),
            "models": models, "done": done}
