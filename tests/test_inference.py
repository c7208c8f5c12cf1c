"""Tests for kaggle_utils.inference: window placement, blending, TTA, ensembles, OOM fallback, prefetching."""

from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from kaggle_utils.config import ConfigError, from_dict
from kaggle_utils.device import resolve_amp_dtype
from kaggle_utils.inference import (  # noqa: I001
    _normalize_by_weight_sum,
    InferenceConfig,
    TTATransform,
    VolumePrefetcher,
    gaussian_importance_map,
    pad_widths,
    plan_windows,
    run_with_oom_fallback,
    sliding_window_predict,
    tta_transforms,
    window_starts,
    window_weight_sum,
)


def pointwise_net(seed: int = 0) -> nn.Module:
    """1x1x1 convolutions only: output at a voxel depends on that voxel alone (and is flip/rot equivariant)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 4, 1), nn.Tanh(), nn.Conv3d(4, 1, 1))
    return net.eval()


def conv_net(seed: int = 0) -> nn.Module:
    """Fixed random 3x3x3 convolutions: windows see their neighbourhood, so placement matters."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv3d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv3d(3, 1, 3, padding=1))
    return net.eval()


def full_forward(net: nn.Module, vol: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(vol)[None, None])[0, 0].numpy()


@pytest.fixture(autouse=True)
def _one_thread():
    """Small convolutions run faster on one thread than on contended CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_volume(shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# placement and weights
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("placement", ["even", "monai"])
def test_window_starts_cover_every_voxel(placement):
    for size, roi, ov in itertools.product(range(32, 260, 13), (32, 64, 96, 128), (0.0, 0.25, 0.5, 0.75)):
        if roi > size:
            continue
        starts = window_starts(size, roi, ov, placement)
        cover = np.zeros(size, int)
        for s in starts:
            assert 0 <= s <= size - roi
            cover[s : s + roi] += 1
        assert cover.min() >= 1, (size, roi, ov, starts)
        assert starts == sorted(set(starts))


def test_window_starts_known_values():
    # MONAI: interval int(128 * 0.5) = 64, last window moved back to end at 320 - 128
    assert window_starts(320, 128, 0.5, "monai") == [0, 64, 128, 192]
    assert window_starts(100, 64, 0.5, "monai") == [0, 32, 36]
    assert window_starts(100, 64, 0.5, "even") == [0, 18, 36]  # step <= 32
    assert window_starts(96, 64, 0.5, "even") == [0, 32]
    assert window_starts(64, 64, 0.5, "even") == [0]
    assert window_starts(320, 128, 0.5, "even") == [0, 64, 128, 192]
    with pytest.raises(ValueError, match="overlap"):
        window_starts(100, 64, 1.0)
    with pytest.raises(ValueError, match="roi"):
        window_starts(50, 64, 0.5)
    with pytest.raises(ValueError, match="placement"):
        window_starts(100, 64, 0.5, "grid")


def test_pad_widths_and_plan():
    assert pad_widths((70, 100, 90), (64, 64, 64)) == [(0, 26), (0, 28), (0, 6)]
    assert pad_widths((20, 100, 64), (64, 64, 64)) == [(0, 44), (0, 28), (0, 0)]
    assert pad_widths((50, 100, 64), (64, 64, 64), placement="monai") == [(7, 7), (0, 0), (0, 0)]
    wins = plan_windows((96, 128, 64), (64, 64, 64), 0.5)
    assert len(wins) == 2 * 3 * 1
    assert wins[0] == (slice(0, 64),) * 3
    cover = np.zeros((96, 128, 64), int)
    for sl in wins:
        cover[sl] += 1
    assert cover.min() >= 1


def test_gaussian_map_matches_monai_and_weight_sum():
    monai_utils = pytest.importorskip("monai.data.utils")
    for roi in [(32, 32, 32), (32, 48, 64), (33, 35, 31)]:
        ref = monai_utils.compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)
        ours = gaussian_importance_map(roi)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-7)
        assert float(ours.min()) == pytest.approx(1e-3)
    shape = (96, 64, 80)
    starts = [window_starts(s, 32, 0.5) for s in shape]
    wmap = gaussian_importance_map((32, 32, 32))
    ref = torch.zeros(shape)
    for corner in itertools.product(*starts):
        ref[tuple(slice(c, c + 32) for c in corner)] += wmap
    torch.testing.assert_close(window_weight_sum(shape, starts, wmap), ref, rtol=1e-6, atol=1e-6)
    acc = torch.ones(shape)
    _normalize_by_weight_sum(acc, starts, wmap, chunk=7)  # chunks not aligned with windows
    torch.testing.assert_close(acc, 1 / ref, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# blending correctness
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("placement", ["even", "monai"])
def test_pointwise_net_equals_full_forward(blend, overlap, placement):
    net = pointwise_net()
    vol = rand_volume((70, 100, 90))
    ref = full_forward(net, vol)
    out = sliding_window_predict(
        net, vol, 64, overlap=overlap, batch_size=3, blend=blend, activation=None, device="cpu",
        placement=placement,
    )
    assert out.shape == vol.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    prob = sliding_window_predict(net, torch.from_numpy(vol), (64, 64, 64), overlap=overlap, blend=blend, device="cpu")
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-ref)), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "shape,roi,mode",
    [((64, 96, 80), 32, "gaussian"), ((64, 96, 80), 64, "gaussian"), ((64, 96, 80), 32, "constant"),
     ((50, 96, 70), 64, "gaussian")],
)
def test_conv_net_equals_monai(shape, roi, mode):
    monai_inferers = pytest.importorskip("monai.inferers")
    net = conv_net()
    vol = rand_volume(shape, seed=1)
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(
            torch.from_numpy(vol)[None, None], (roi,) * 3, 2, net, overlap=0.5, mode=mode
        )[0, 0].numpy()
    out = sliding_window_predict(
        net, vol, roi, overlap=0.5, batch_size=2, blend=mode, activation=None, device="cpu", placement="monai"
    )
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    # and the placement matters: a 3x3x3 net is not pointwise, so "even" differs from a full pass
    assert np.abs(out - full_forward(net, vol)).max() > 1e-4


def test_activation_none_vs_sigmoid():
    net = conv_net(3)
    vol = rand_volume((64, 80, 70), seed=2)
    raw = sliding_window_predict(net, vol, 32, activation=None, ensemble="logits", device="cpu")
    prob = sliding_window_predict(net, vol, 32, activation="sigmoid", ensemble="logits", device="cpu")
    np.testing.assert_allclose(prob, 1 / (1 + np.exp(-raw)), atol=1e-6, rtol=0)
    # averaging probabilities of overlapping windows is not the sigmoid of averaged logits
    prob_avg = sliding_window_predict(net, vol, 32, activation="sigmoid", ensemble="probs", device="cpu")
    assert np.abs(prob_avg - prob).max() > 1e-6
    assert 0.0 <= prob_avg.min() and prob_avg.max() <= 1.0


def test_ensemble_weighted_mean():
    a, b = pointwise_net(0), pointwise_net(1)
    vol = rand_volume((40, 70, 64), seed=3)
    la, lb = full_forward(a, vol), full_forward(b, vol)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    probs = sliding_window_predict([a, b], vol, 32, weights=[1, 3], ensemble="probs", device="cpu")
    np.testing.assert_allclose(probs, 0.25 * sig(la) + 0.75 * sig(lb), atol=1e-5, rtol=0)
    logits = sliding_window_predict([a, b], vol, 32, weights=[1, 3], ensemble="logits", device="cpu")
    np.testing.assert_allclose(logits, sig(0.25 * la + 0.75 * lb), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="weights"):
        sliding_window_predict([a, b], vol, 32, weights=[1], device="cpu")


# ----------------------------------------------------------------------------------------------
# TTA
# ----------------------------------------------------------------------------------------------


def test_tta_transforms_are_invertible_and_distinct():
    x = torch.randn(2, 1, 4, 5, 5)
    for preset, n in [("none", 1), ("flips", 8), ("rot90", 4), ("flips+rot90", 16)]:
        ts = tta_transforms(preset)
        assert len(ts) == n and ts[0] == TTATransform()
        outs = {tuple(t.apply(x).flatten().tolist()) for t in ts}
        assert len(outs) == n
        for t in ts:
            assert torch.equal(t.invert(t.apply(x)), x)
    with pytest.raises(ValueError, match="tta"):
        tta_transforms("mirror")
    with pytest.raises(ValueError, match="flip_axes"):
        TTATransform((3,))


def test_tta_of_equivariant_net_equals_no_tta():
    net = pointwise_net()
    vol = rand_volume((40, 32, 48), seed=4)
    plain = sliding_window_predict(net, vol, 32, device="cpu")
    tta = sliding_window_predict(net, vol, 32, tta="flips+rot90", device="cpu")
    np.testing.assert_allclose(tta, plain, atol=1e-5, rtol=0)


def test_tta_averages_undone_predictions():
    """A non-equivariant net on one window: TTA = mean over t of t^-1(net(t(x)))."""
    net = conv_net(5)
    vol = rand_volume((32, 32, 32), seed=5)
    out = sliding_window_predict(net, vol, 32, tta="flips", device="cpu", activation=None)
    x = torch.from_numpy(vol)[None, None]
    with torch.no_grad():
        ref = torch.stack([t.invert(net(t.apply(x))) for t in tta_transforms("flips")]).mean(0)[0, 0].numpy()
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.abs(out - full_forward(net, vol)).max() > 1e-4
    with pytest.raises(ValueError, match="square"):
        sliding_window_predict(net, vol, (32, 32, 64), tta="rot90", device="cpu")


# ----------------------------------------------------------------------------------------------
# OOM fallback
# ----------------------------------------------------------------------------------------------


class OOMOnLargeBatch(nn.Module):
    """Raises CUDA out-of-memory on batches larger than ``max_batch``."""

    def __init__(self, net: nn.Module, max_batch: int = 1):
        super().__init__()
        self.net, self.max_batch, self.batches = net, max_batch, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
        return self.net(x)


def test_oom_fallback_halves_batch():
    fake = OOMOnLargeBatch(pointwise_net(), max_batch=1)
    vol = rand_volume((64, 64, 64), seed=6)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = sliding_window_predict(fake, vol, 32, batch_size=4, device="cpu")
    assert fake.batches[0] == 4 and 2 in fake.batches and fake.batches[-1] == 1
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-full_forward(pointwise_net(), vol))), atol=1e-5)


def test_oom_policy_order_and_final_failure():
    calls = []

    def run(bs, dev):
        calls.append((bs, str(dev)))
        if bs > 1 or str(dev) != "cpu":
            raise torch.cuda.OutOfMemoryError("fake")
        return "ok"

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_with_oom_fallback(run, 4, "cuda:0") == "ok"
    assert calls == [(4, "cuda:0"), (2, "cuda:0"), (1, "cuda:0"), (1, "cpu")]
    assert len(caught) == 3 and "accumulation on cpu" in str(caught[-1].message)

    def always(bs, dev):
        raise torch.cuda.OutOfMemoryError("fake")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(torch.cuda.OutOfMemoryError):
            run_with_oom_fallback(always, 2, "cuda:0")

    def other_error(bs, dev):
        raise RuntimeError("not an OOM")

    with pytest.raises(RuntimeError, match="not an OOM"):
        run_with_oom_fallback(other_error, 2, "cuda:0")


# ----------------------------------------------------------------------------------------------
# misc: options, config, prefetcher
# ----------------------------------------------------------------------------------------------


def test_channels_last_and_bad_inputs():
    net = conv_net(7)
    vol = rand_volume((40, 40, 40), seed=7)
    a = sliding_window_predict(net, vol, 32, device="cpu")
    b = sliding_window_predict(net, vol, 32, device="cpu", channels_last=True)
    np.testing.assert_allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="volume"):
        sliding_window_predict(net, vol[0], 32, device="cpu")
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_predict(net, vol, 32, overlap=1.0, device="cpu")
    with pytest.raises(ValueError, match="output"):
        sliding_window_predict(nn.Conv3d(1, 2, 1), vol, 32, device="cpu")


def test_resolve_amp_dtype():
    assert resolve_amp_dtype("auto", "cpu") is None
    assert resolve_amp_dtype("auto", "cuda") is torch.float16
    assert resolve_amp_dtype(False, "cuda") is None
    with pytest.warns(DeprecationWarning, match="use 'fp16'"):  # old inference.amp spelling
        assert resolve_amp_dtype(True, "cpu") is torch.bfloat16
    assert resolve_amp_dtype("fp16", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="amp"):
        resolve_amp_dtype("int8", "cpu")


def test_inference_config_from_dict():
    cfg = from_dict(InferenceConfig, {"patch_size": [64, 96, 96], "tta": "flips", "amp": "bf16", "ensemble": "logits"})
    assert cfg.patch_size == (64, 96, 96) and cfg.amp == "bf16"
    kw = cfg.to_kwargs()
    net = pointwise_net()
    vol = rand_volume((30, 40, 40), seed=8)
    kw.update(patch_size=(32, 32, 32), amp=False)
    out = sliding_window_predict(net, vol, device="cpu", **kw)
    assert out.shape == vol.shape
    with pytest.raises(ConfigError, match="tta"):
        from_dict(InferenceConfig, {"tta": "mirror"})
    with pytest.raises(ConfigError, match="unknown"):
        from_dict(InferenceConfig, {"patch": 3})
    with pytest.raises(ConfigError, match="overlap"):
        from_dict(InferenceConfig, {"overlap": 1.5})


def test_prefetcher_order_overlap_and_errors():
    loading_second = threading.Event()

    def load(i):
        if i == 1:
            loading_second.set()
        if i == 3:
            raise OSError("broken file 3")
        return np.full((2, 2, 2), i, np.float32)

    seen = []
    with pytest.raises(OSError, match="broken file 3"):
        with VolumePrefetcher(load, range(5)) as pf:
            for vid, vol in pf:
                if vid == 0:
                    # the next volume is loaded while the consumer still works on this one
                    assert loading_second.wait(timeout=10)
                seen.append((vid, float(vol[0, 0, 0])))
    assert seen == [(0, 0.0), (1, 1.0), (2, 2.0)]
    with pytest.raises(ValueError, match="depth"):
        VolumePrefetcher(load, [0], depth=0)


def test_amp_bfloat16_on_cpu_close_to_float32():
    net = conv_net(9)
    vol = rand_volume((40, 40, 40), seed=9)
    full = sliding_window_predict(net, vol, 32, device="cpu", amp=False)
    half = sliding_window_predict(net, vol, 32, device="cpu", amp="fp16")  # bfloat16 autocast on CPU
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, full, atol=2e-2, rtol=0)


def test_prefetcher_early_break_stops_thread():
    loaded = []

    def load(i):
        loaded.append(i)
        return i

    pf = VolumePrefetcher(load, range(100), depth=2)
    with pf:
        for vid, _ in pf:
            if vid == 1:
                break
    pf._thread.join(timeout=5)
    assert not pf._thread.is_alive()
    assert len(loaded) <= 5  # 2 consumed + at most depth queued + 1 in flight


def test_window_settings_are_inference_configs_fields_listed_once():
    """sliding_window_predict takes the window settings as an InferenceConfig (or a patch size) plus any of
    its fields as keywords; they are checked by InferenceConfig alone."""
    from kaggle_utils.inference import TTATransform, window_settings

    cfg, tr = window_settings(64, overlap=0.25, tta="flips")
    assert (cfg.patch_size, cfg.overlap, cfg.tta, tr) == ((64, 64, 64), 0.25, "flips", None)
    base = InferenceConfig(patch_size=(32, 64, 64), batch_size=4)
    cfg, tr = window_settings(base, tta=[TTATransform((0,))])
    assert (cfg.patch_size, cfg.batch_size, cfg.tta, tr) == ((32, 64, 64), 4, "none", [TTATransform((0,))])
    assert base.tta == "none" and window_settings(base, tta=None) == (base, None)
    assert window_settings(None) == (InferenceConfig(), None)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['overlapp'\].*overlap, batch_size"):
        window_settings(64, overlapp=0.5)
    with pytest.raises(ValueError, match="inference.overlap"):
        window_settings(64, overlap=1.0)
    net, vol = pointwise_net(), rand_volume((30, 40, 40), seed=3)
    np.testing.assert_array_equal(sliding_window_predict(net, vol, InferenceConfig(patch_size=32, overlap=0.25), device="cpu"),
                                  sliding_window_predict(net, vol, 32, overlap=0.25, device="cpu"))
