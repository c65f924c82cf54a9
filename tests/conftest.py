"""Shared fixtures: the devices x dtypes list, fresh seeded random logits, and real
digits logits (scikit-learn's bundled digits; a classifier trained on 0-4, so 5-9
are real anomalies)."""
from __future__ import annotations

import os
import zlib

import numpy as np
import pytest
import torch

import anomfast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and anomfast.build_info()["cuda"] else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LOGIT_METHODS = ["max_logit", "msp", "energy", "sml", "entropy", "gen"]


def pytest_report_header(config):
    seed = os.environ.get("ANOMFAST_TEST_SEED", "per-run")
    return [f"anomfast {anomfast.__version__}, devices {DEVICES}, random seed base: {seed}"]


_RUN_SEED = int(os.environ.get("ANOMFAST_TEST_SEED", np.random.SeedSequence().entropy % (2**31)))


@pytest.fixture
def rng(request):
    """A generator seeded per test from a per-run base (fresh inputs every run; the
    base is printed on failure and can be fixed with ANOMFAST_TEST_SEED)."""
    seed = (_RUN_SEED + zlib.crc32(request.node.nodeid.encode())) % (2**31)
    request.node.user_properties.append(("seed", seed))
    g = torch.Generator().manual_seed(seed)
    return g


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            rep.sections.append(("anomfast seed", f"test seed {seeds[0]} (run base ANOMFAST_TEST_SEED={_RUN_SEED})"))


def random_logits(g: torch.Generator, B, C, H, W, scale=4.0, dtype=torch.float32):
    """Segmentation-like logits: a confident class per pixel plus noise."""
    x = torch.randn(B, C, H, W, generator=g) * scale
    k = torch.randint(0, C, (B, 1, H, W), generator=g)
    boost = torch.rand(B, 1, H, W, generator=g) * 3 * scale
    x.scatter_add_(1, k, boost)
    return x.to(dtype)


def random_labels(g: torch.Generator, B, H, W, p_anomaly=0.05, p_void=0.1):
    u = torch.rand(B, H, W, generator=g)
    y = torch.zeros(B, H, W, dtype=torch.uint8)
    y[u < p_anomaly] = 1
    y[u > 1 - p_void] = 255
    return y


@pytest.fixture(scope="session")
def digits():
    """Real logits: (N, 5, 1, 1) from a softmax classifier trained on digits 0-4 of the
    training half; labels 1 for digits 5-9 (never seen), 0 for 0-4, on the test half."""
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.data, dtype=torch.float32) / 16.0
    t = torch.tensor(d.target)
    perm = torch.randperm(len(t), generator=torch.Generator().manual_seed(0))
    train, test = perm[: len(t) // 2], perm[len(t) // 2:]
    tr = train[t[train] < 5]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[tr]), t[tr])
        loss.backward()
        opt.step()
    with torch.no_grad():
        fit_logits = model(X[tr]).reshape(-1, 5, 1, 1).contiguous()
        logits = model(X[test]).reshape(-1, 5, 1, 1).contiguous()
        hidden = model[1](model[0](X[test]))
        fit_hidden = model[1](model[0](X[tr]))
    labels = (t[test] >= 5).to(torch.uint8).reshape(-1, 1, 1)
    return {"logits": logits, "labels": labels, "fit_logits": fit_logits, "features": hidden,
            "inputs": X[test],
            # for HEAT: hidden activations (N, 32) and class ids (N, 1, 1) of the fitting digits
            "fit_features": fit_hidden, "fit_labels": t[tr].reshape(-1, 1, 1)}
