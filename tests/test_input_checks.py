"""Bad input gets a clear error naming what was wrong and what was expected (never a
bare error from deep inside, nor a silently wrong number); odd but valid input works."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import anomfast
from anomfast import LabelMap
from anomfast.cli import main
from anomfast.heat import HeatStats
from anomfast.sml import SMLStats


def inputs(seed=0, B=2, C=5, H=6, W=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    y = (torch.rand(B, H, W, generator=g) < 0.3).to(torch.uint8)
    y[0, 0, 0], y[0, 0, 1] = 0, 1
    return x, y


def heat_inputs(seed=0, B=2, C=3, D=4, H=8, W=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g)
    f = torch.randn(B, D, 4, 4, generator=g)
    sem = torch.randint(0, C, (B, H, W), generator=g)
    return x, f, sem


# 6 ------------------------------------------------------------------------------


def test_fit_sml_nonfinite_option_named_in_its_error_exists():
    x, _ = inputs()
    bad = x.clone()
    bad[0, :, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="nonfinite='ignore'"):
        anomfast.fit_sml(bad)
    skipped = anomfast.fit_sml(bad, nonfinite="ignore")
    y = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.uint8)
    y[0, 0, 0] = 255  # the same pixel left out as void
    want = anomfast.fit_sml(x, y)
    np.testing.assert_array_equal(skipped.count, want.count)
    np.testing.assert_allclose(skipped.sum, want.sum)
    with pytest.raises(ValueError, match="nonfinite must be"):
        anomfast.fit_sml(x, nonfinite="skip")


# 9 ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(anomaly_ids="13", void_ids="255"), TypeError, "anomaly_ids must be an int or a list of ints, got the string"),
    (dict(void_ids="255"), TypeError, "void_ids must be an int or a list of ints, got the string '255'"),
    (dict(anomaly_ids="rest"), TypeError, "'rest' applies to normal_ids only"),
    (dict(anomaly_ids=[1.7]), ValueError, "anomaly_ids must be whole numbers"),
    (dict(void_ids=[254.9]), ValueError, "void_ids must be whole numbers"),
    (dict(anomaly_ids=13.9), ValueError, "anomaly_ids must be whole numbers"),
    (dict(anomaly_ids=[True]), TypeError, "anomaly_ids must be integer label values"),
    (dict(normal_ids=["0"]), TypeError, "normal_ids must be integer label values"),
    (dict(anomaly_ids=object()), TypeError, "anomaly_ids must be an int or a list of ints, got object"),
])
def test_label_map_refuses_strings_and_non_integral_ids(kwargs, error, message):
    with pytest.raises(error, match=message):
        LabelMap(**kwargs)


def test_label_map_accepts_ints_numpy_tensors_and_whole_floats():
    lm = LabelMap(anomaly_ids=13.0, void_ids=np.array([255, 254]), normal_ids=torch.tensor([0, 1]))
    assert (lm.anomaly_ids, lm.void_ids, lm.normal_ids) == ((13,), (255, 254), (0, 1))
    assert LabelMap(anomaly_ids=np.int64(13), void_ids=[np.uint8(255)]).anomaly_ids == (13,)
    x, y = inputs()
    with pytest.raises(TypeError, match="anomaly_ids must be an int or a list of ints"):
        anomfast.evaluate(x, y, label_map={"anomaly_ids": "13"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['anomaly_id'\]"):
        anomfast.evaluate(x, y, label_map={"anomaly_id": [1]})


# 10 -----------------------------------------------------------------------------


def test_empty_batch_per_image_is_not_no_batches():
    x, y = inputs()
    with pytest.warns(RuntimeWarning, match="undefined"):
        r = anomfast.evaluate(x[:0], y[:0], per_image=True, methods=["energy"])
    assert np.isnan(r["energy"].auroc) and r.pixels["binned"] == 0
    with pytest.raises(ValueError, match="got no batches"):
        anomfast.evaluate([], [], per_image=True)


@pytest.mark.parametrize("logits, name", [(None, "NoneType"), (5, "int"), ("abc", "str")])
def test_logits_that_are_neither_tensor_nor_iterable(logits, name):
    _, y = inputs()
    with pytest.raises(TypeError, match=f"logits must be a tensor / array \\(B, C, H, W\\) or an iterable of "
                                        f"batches, got {name}"):
        anomfast.evaluate(logits, y)
    with pytest.raises(TypeError, match=f"got {name}"):
        anomfast.fit_sml(logits)


# 12 -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heat_stats():
    x, f, sem = heat_inputs()
    return anomfast.fit_heat(x, f, sem)


@pytest.mark.parametrize("mean, std, message", [
    (0.0, 1e50, "score_std must be > 0 with 1 / score_std finite and > 0 in float32"),
    (0.0, 1e-300, "score_std must be > 0 with 1 / score_std finite and > 0 in float32"),
    (1e300, 1.0, "score_mean must be finite in float32"),
    (float("nan"), 1.0, "score_mean must be finite in float32"),
])
def test_heat_standardization_checked_in_float32(heat_stats, mean, std, message):
    with pytest.raises(ValueError, match=message):
        heat_stats.with_standardization(mean, std)
    s = heat_stats
    with pytest.raises(ValueError, match=message):
        HeatStats(s.mean, s.cov, s.precision, s.count, score_mean=mean, score_std=std)


def test_heat_standardization_set_after_construction_is_checked_before_the_core(heat_stats):
    import copy
    x, f, _ = heat_inputs()
    y = torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.uint8)
    y[0, 0, :4] = 1
    st = copy.copy(heat_stats)
    st.score_std = 1e50  # 1 / std is 0 in float32: every score 0
    with pytest.raises(ValueError, match="score_std"):
        anomfast.evaluate(x, y, methods=["heat"], features=f, heat=st)


def test_heat_precision_checked(heat_stats):
    s = heat_stats
    nan = s.precision.copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="cov and precision must be finite"):
        HeatStats(s.mean, s.cov, nan, s.count)
    with pytest.raises(ValueError, match="precision is not positive definite"):
        HeatStats(s.mean, s.cov, -s.precision, s.count)
    skew = s.precision.copy()
    skew[0, 1] += 1.0
    with pytest.raises(ValueError, match="precision is not symmetric"):
        HeatStats(s.mean, s.cov, skew, s.count)
    huge = s.mean.copy()
    huge[0] = 1e300
    with pytest.raises(ValueError, match="overflow float32"):
        HeatStats(huge, s.cov, s.precision, s.count)


def _rewrite(path, out, drop_array=None, drop_key=None, meta=None):
    z = dict(np.load(path))
    m = json.loads(str(z.pop("meta")))
    z.pop(drop_array, None)
    m.pop(drop_key, None)
    with open(out, "wb") as fh:
        np.savez(fh, meta=np.array(json.dumps(m if meta is None else meta)), **z)
    return out


def test_stats_files_with_a_missing_entry(tmp_path, heat_stats):
    heat_stats.save(tmp_path / "heat.npz")
    SMLStats(np.array([2, 2]), np.array([1.0, 2.0]), np.array([1.0, 3.0])).save(tmp_path / "sml.npz")
    for cls, src, kw, entry in (
            (HeatStats, "heat.npz", dict(drop_key="temperature"), "'temperature'"),
            (HeatStats, "heat.npz", dict(drop_array="precision"), "'precision'"),
            (SMLStats, "sml.npz", dict(drop_array="sumsq"), "'sumsq'")):
        bad = _rewrite(tmp_path / src, tmp_path / "bad.npz", **kw)
        with pytest.raises(ValueError, match=f"bad.npz: .* file without the .*{entry}"):
            cls.load(bad)
    for cls, src in ((HeatStats, "heat.npz"), (SMLStats, "sml.npz")):
        bad = _rewrite(tmp_path / src, tmp_path / "list.npz", meta=[1, 2])
        with pytest.raises(ValueError, match="JSON object"):
            cls.load(bad)


# 13 -----------------------------------------------------------------------------


@pytest.mark.parametrize("method, param", [("energy", "temperature"), ("gen", "gen_gamma")])
@pytest.mark.parametrize("value", [1e-50, 1e50])
def test_method_parameters_checked_in_float32(method, param, value):
    x, y = inputs()
    with pytest.raises(ValueError, match=f"{param} must be a finite number > 0 in float32's range"):
        anomfast.evaluate(x, y, methods=[method], **{param: value})


def test_heat_temperature_checked_in_float32():
    x, f, sem = heat_inputs()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0 in float32's range"):
        anomfast.fit_heat(x, f, sem, temperature=1e-50, standardize=False)


# 14 -----------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_sparse_and_nested_tensors_refused():
    x, y = inputs()
    with pytest.raises(TypeError, match="logits must be a dense \\(strided\\) tensor, got a torch.sparse_coo"):
        anomfast.evaluate(x.to_sparse(), y)
    with pytest.raises(TypeError, match="labels must be a dense \\(strided\\) tensor"):
        anomfast.evaluate(x, y.to_sparse())
    for layout in (torch.strided, torch.jagged):
        nested = torch.nested.nested_tensor([x[0], x[1]], layout=layout)
        with pytest.raises(TypeError, match="logits must be a dense \\(strided\\) tensor, got a nested"):
            anomfast.evaluate(nested, y)
        with pytest.raises(TypeError, match="dense"):
            anomfast.score_maps(nested)
    with pytest.raises(TypeError, match="dense"):
        anomfast.Evaluator().update(x.to_sparse(), y)


@pytest.mark.parametrize("n, error", [(2 ** 40, ValueError), (-1, ValueError), (1.5, TypeError),
                                      (True, TypeError)])
def test_num_threads_checked(n, error):
    x, y = inputs()
    with pytest.raises(error, match="num_threads must be"):
        anomfast.evaluate(x, y, num_threads=n)
    with pytest.raises(error, match="num_threads must be"):
        anomfast.fit_sml(x, num_threads=n)


def test_ignore_index_none_means_no_void_id():
    x, y = inputs()
    r = anomfast.evaluate(x, y, ignore_index=None, methods=["energy"])
    assert r.pixels["void"] == 0 and r.pixels["binned"] == y.numel()
    y[0, 1, 1] = 255
    with pytest.raises(ValueError, match=r"not in the label map \(first: 255\)"):
        anomfast.evaluate(x, y, ignore_index=None)
    with pytest.raises(TypeError, match="ignore_index must be"):
        anomfast.evaluate(x, y, ignore_index="255")


def test_subsample_bool_refused():
    x, y = inputs()
    with pytest.raises(ValueError, match="subsample must be a positive number of pixels, got True"):
        anomfast.evaluate(x, y, subsample=True)


def test_numpy_negative_strides_and_big_endian_work():
    x, y = inputs()
    want = anomfast.evaluate(x, y, methods=["energy"], exact=True)["energy"]
    xa, ya = x.numpy(), y.numpy()
    flipped = anomfast.evaluate(xa[:, :, ::-1], ya[:, ::-1], methods=["energy"], exact=True)["energy"]
    swapped = anomfast.evaluate(xa.astype(">f4"), ya.astype(">i4"), methods=["energy"], exact=True)["energy"]
    assert flipped.auroc == want.auroc and swapped.auroc == want.auroc and swapped.ap == want.ap
    s, yv = xa[:, 0], ya.astype(np.int64)
    want = anomfast.evaluate_scores(s, yv)["custom"].auroc
    assert anomfast.evaluate_scores(s[:, ::-1], yv[:, ::-1].astype(">i8"))["custom"].auroc == want
    g = np.random.default_rng(0)
    f, sem = g.standard_normal((2, 4, 3, 3)), g.integers(0, 5, ya.shape)
    stats = anomfast.fit_heat(xa, f.astype(">f4")[:, ::-1], sem.astype(">i8"), standardize=False)
    assert stats.dim == 4


def test_sml_stats_refuse_fractional_counts_and_complex_sums():
    with pytest.raises(ValueError, match="count must be whole numbers"):
        SMLStats([2.5, 3], [1.0, 2.0], [3.0, 4.0])
    with pytest.raises(TypeError, match="sum must be real numbers"):
        SMLStats([2, 3], np.array([1.0 + 1j, 2.0]), [3.0, 4.0])
    with pytest.raises(TypeError, match="sumsq must be real numbers"):
        SMLStats([2, 3], [1.0, 2.0], np.array([3.0, 4.0 + 0j]))
    np.testing.assert_array_equal(SMLStats([2.0, 3.0], [1.0, 2.0], [3.0, 4.0]).count, [2, 3])


def _files(tmp_path, logits_dtype=np.float32, labels_dtype=np.uint8):
    rng = np.random.default_rng(0)
    for d in ("a", "labels"):
        (tmp_path / d).mkdir(exist_ok=True)
    for i in range(2):
        y = (rng.random((6, 7)) < 0.3).astype(np.uint8)
        y[0, 0], y[0, 1] = 0, 1
        np.save(tmp_path / "labels" / f"img{i}.npy", y.astype(labels_dtype if i else np.uint8))
        np.save(tmp_path / "a" / f"img{i}.npy", (rng.standard_normal((3, 6, 7)) * 3).astype(
            logits_dtype if i else np.float32))
    return ["eval", "--logits", str(tmp_path / "a"), "--labels", str(tmp_path / "labels"), "--quiet",
            "--no-plots", "--out", str(tmp_path / "o"), "--methods", "max_logit"]


@pytest.mark.parametrize("logits_dtype, labels_dtype, message", [
    (np.int32, np.uint8, "a/img1.npy: logits must be floating point"),
    (np.float32, np.float64, "labels/img1.npy: label map must hold integer label values"),
])
def test_cli_names_the_file_of_a_wrong_dtype(tmp_path, capsys, logits_dtype, labels_dtype, message):
    assert main(_files(tmp_path, logits_dtype, labels_dtype)) == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_cli_reads_big_endian_files(tmp_path):
    assert main(_files(tmp_path, ">f4", ">i4")) == 0
