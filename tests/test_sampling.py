"""Tests for kaggle_utils.sampling: patch sampling, caching, augmentation, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kaggle_utils.config import ConfigError, from_dict
from kaggle_utils.data import intensity_stats, load_index, normalize_intensity, write_volume
from kaggle_utils.augment import AugmentConfig, augment_batch
from kaggle_utils.sampling import (
    PatchDataset,
    SamplerConfig,
    VolumeCache,
    crop_patch,
    make_loader,
)

CODES = np.array([10, 60, 200], dtype=np.uint8)  # image intensity encoding label 0 / 1 / 2
NO_AUG = dict(p_flip=0.0, p_rot90=0.0, p_affine=0.0, p_intensity=0.0, p_gamma=0.0, p_noise=0.0, p_blur=0.0)


def _volume(shape, ignore_rows: int = 0, planes=(16, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Label: background, 2-voxel surface slabs at z in ``planes``, ignore for y < ignore_rows.
    Image: the label encoded as intensity (CODES) plus a gentle ramp so normalization matters."""
    label = np.zeros(shape, np.uint8)
    for z in planes:
        if z + 2 <= shape[0]:
            label[z:z + 2] = 1
    label[:, :ignore_rows] = 2
    return CODES[label], label


def _write_dataset(root, volumes: dict[str, tuple[str, np.ndarray, np.ndarray]]):
    (root / "train_images").mkdir(parents=True)
    (root / "train_labels").mkdir()
    rows = ["id,scroll_id"]
    for vid, (scroll, image, label) in volumes.items():
        write_volume(root / "train_images" / f"{vid}.tif", image)
        write_volume(root / "train_labels" / f"{vid}.tif", label)
        rows.append(f"{vid},{scroll}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    return load_index(root, "train")


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling_data")
    vols = {
        "a": ("s1", *_volume((64, 64, 64), ignore_rows=24)),
        "b": ("s1", *_volume((64, 64, 64), ignore_rows=24, planes=(8, 30, 50))),
        "c": ("s1", *_volume((64, 64, 64), ignore_rows=24, planes=(20,))),
        "d": ("s2", *_volume((64, 64, 64), ignore_rows=24, planes=(33,))),
    }
    return _write_dataset(root, vols)


def _cfg(**kw) -> SamplerConfig:
    base = dict(patch_size=(32, 32, 32), patches_per_epoch=64, max_ignore_share=1.0)
    base.update(kw)
    return SamplerConfig(**base)


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [(100, 0, 128), (128, 128, -8), 0, (32, 32)])
def test_bad_patch_size_raises_naming_it(bad):
    with pytest.raises(ValueError, match="patch_size"):
        SamplerConfig(patch_size=bad)


def test_patch_size_divisor_is_the_networks_not_the_samplers():
    """The sampler takes any edge; TrainConfig checks it against the network (8 for a 4-stage ResEnc)."""
    from kaggle_utils.config import ConfigError
    from kaggle_utils.train import TrainConfig

    assert SamplerConfig(patch_size=(24, 40, 48)).patch_size == (24, 40, 48)
    resenc = {"arch": "ResEncUNet", "n_stages": 4, "features_per_stage": [4, 8, 8, 8],
              "strides": [1, 2, 2, 2], "n_blocks_per_stage": [1, 1, 1, 1]}
    ok = from_dict(TrainConfig, {"model": resenc, "sampler": {"patch_size": [24, 40, 48]},
                                 "inference": {"patch_size": [48, 48, 48]}})
    assert ok.sampler.patch_size == (24, 40, 48)
    with pytest.raises(ConfigError, match="sampler.patch_size: every edge must be a positive multiple of 32"):
        from_dict(TrainConfig, {"sampler": {"patch_size": [24, 40, 48]}})  # the default smp-3d U-Net


def test_configs_build_from_dict_and_validate():
    cfg = from_dict(SamplerConfig, {"patch_size": [64, 128, 128], "surface_share": 0.3, "cache_dir": None})
    assert cfg.patch_size == (64, 128, 128) and cfg.surface_share == 0.3
    aug = from_dict(AugmentConfig, {"p_flip": 0.1, "scale_range": [0.9, 1.2]})
    assert aug.scale_range == (0.9, 1.2)
    with pytest.raises(ConfigError, match="patch_size"):
        from_dict(SamplerConfig, {"patch_size": [96, 0, 100]})
    with pytest.raises(ConfigError, match="p_flipp"):
        from_dict(AugmentConfig, {"p_flipp": 0.5})
    with pytest.raises(ValueError, match="normalization"):
        SamplerConfig(normalization="minmax")
    with pytest.raises(ValueError, match="p_noise"):
        AugmentConfig(p_noise=1.5)
    with pytest.raises(ValueError, match="gamma_range"):
        AugmentConfig(gamma_range=(1.5, 0.7))


def test_crop_patch_known_answer():
    vol = np.arange(4 * 5 * 6, dtype=np.int32).reshape(4, 5, 6)
    np.testing.assert_array_equal(crop_patch(vol, (1, 1, 1), (2, 2, 2)), vol[1:3, 1:3, 1:3])
    out = crop_patch(vol, (-1, 3, 4), (3, 3, 3), fill=-7)
    assert out.shape == (3, 3, 3)
    assert (out[0] == -7).all() and (out[:, 2] == -7).all() and (out[:, :, 2] == -7).all()
    np.testing.assert_array_equal(out[1:, :2, :2], vol[0:2, 3:5, 4:6])


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------


def test_item_shapes_dtypes_and_whole_volume_normalization(index):
    ds = PatchDataset(index, _cfg(normalization="zscore"), seed=3)
    image, label, meta = ds[5]
    assert image.shape == (1, 32, 32, 32) and image.dtype == torch.float32
    assert label.shape == (1, 32, 32, 32) and label.dtype == torch.uint8
    assert set(meta) == {"id", "scroll_id", "origin", "centred"}
    rec = index.by_id(meta["id"])
    assert meta["scroll_id"] == rec.scroll_id
    vol_img, vol_lbl = _volume((64, 64, 64), 24, {"a": (16, 40), "b": (8, 30, 50), "c": (20,), "d": (33,)}[rec.id])
    z, y, x = meta["origin"]
    # normalized with the WHOLE volume's statistics, as inference does
    expect = normalize_intensity(vol_img, intensity_stats(vol_img), "zscore")[z:z + 32, y:y + 32, x:x + 32]
    np.testing.assert_allclose(image[0].numpy(), expect, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(label[0].numpy(), vol_lbl[z:z + 32, y:y + 32, x:x + 32])


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_surface_centred_share_is_as_asked(index, share):
    n = 300
    ds = PatchDataset(index, _cfg(surface_share=share, patches_per_epoch=n, center_jitter=0.25), seed=1)
    centred = []
    for i in range(n):
        _, label, meta = ds[i]
        centred.append(meta["centred"])
        if meta["centred"]:  # the surface voxel lies within the jitter of the centre: inside the patch
            assert (label == 1).any()
    got = float(np.mean(centred))
    if share in (0.0, 1.0):
        assert got == share
    else:
        assert abs(got - share) < 0.1, got


def test_centred_patches_find_rare_surface(tmp_path):
    label = np.zeros((96, 96, 96), np.uint8)
    label[70:73, 10:13, 80:83] = 1  # one small blob: uniform patches rarely see it
    idx = _write_dataset(tmp_path / "d", {"v": ("s", CODES[label], label)})

    def hit_rate(share):
        ds = PatchDataset(idx, _cfg(surface_share=share, patches_per_epoch=100), seed=2)
        return np.mean([bool((ds[i][1] == 1).any()) for i in range(100)])

    assert hit_rate(1.0) == 1.0
    assert hit_rate(0.0) < 0.3


def test_ignore_rejection(index):
    def shares(max_ignore):
        cfg = _cfg(max_ignore_share=max_ignore, max_tries=40, surface_share=0.5, patches_per_epoch=150)
        ds = PatchDataset(index, cfg, seed=4)
        return np.array([float((ds[i][1] == 2).float().mean()) for i in range(150)])

    loose = shares(1.0)
    assert (loose > 0.2).mean() > 0.3  # the control: without rejection many patches are mostly ignore
    strict = shares(0.2)
    assert strict.max() <= 0.2


def test_ignore_rejection_gives_up_and_keeps_best(tmp_path):
    img, lbl = _volume((48, 48, 48), ignore_rows=40)  # every 32^3 patch is >= 75% ignore (y origin 16)
    idx = _write_dataset(tmp_path / "d", {"v": ("s", img, lbl)})

    def shares(tries):
        ds = PatchDataset(idx, _cfg(max_ignore_share=0.1, max_tries=tries, surface_share=0.0), seed=0)
        return np.array([float((ds[i][1] == 2).float().mean()) for i in range(10)])

    best = shares(40)  # always returns (bounded tries), with the least-ignore patch seen
    assert (best >= 0.75).all() and (best <= 0.875).all()
    assert shares(1).mean() > 0.85  # the control: a single draw is usually worse


def test_small_volume_is_padded_with_ignore_label(tmp_path):
    img, lbl = _volume((40, 40, 40), ignore_rows=0, planes=(10,))
    idx = _write_dataset(tmp_path / "d", {"small": ("s", img, lbl)})
    for share in (0.0, 1.0):
        ds = PatchDataset(idx, _cfg(patch_size=(64, 64, 64), surface_share=share, normalization="fixed"), seed=0)
        for i in range(6):
            image, label, meta = ds[i]
            origin = meta["origin"]
            assert all(-24 <= o <= 0 for o in origin)
            inside = np.zeros((64, 64, 64), bool)
            inside[-origin[0]:-origin[0] + 40, -origin[1]:-origin[1] + 40, -origin[2]:-origin[2] + 40] = True
            lab = label[0].numpy()
            assert (lab[~inside] == 2).all()
            np.testing.assert_array_equal(lab[inside].reshape(40, 40, 40), lbl)
            assert (image[0].numpy()[~inside] == 0.0).all()
            np.testing.assert_allclose(image[0].numpy()[inside].reshape(40, 40, 40),
                                       normalize_intensity(img, mode="fixed"))


def test_balance_scrolls(index):
    def share_s2(balance):
        ds = PatchDataset(index, _cfg(balance_scrolls=balance, patches_per_epoch=400), seed=0)
        return np.mean([ds._pick_record(np.random.default_rng(i)).scroll_id == "s2" for i in range(400)])

    assert abs(share_s2(False) - 0.25) < 0.07  # one of four volumes
    assert abs(share_s2(True) - 0.5) < 0.08  # one of two scrolls


# ----------------------------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------------------------


def _same_item(a, b) -> bool:
    return a[2] == b[2] and torch.equal(a[1], b[1]) and torch.allclose(a[0], b[0], atol=1e-5)


def test_same_seed_same_patches_epoch_changes_them(index):
    aug = AugmentConfig()
    d1 = PatchDataset(index, _cfg(surface_share=0.5), seed=7, augment=aug)
    d2 = PatchDataset(index, _cfg(surface_share=0.5), seed=7, augment=aug)
    d3 = PatchDataset(index, _cfg(surface_share=0.5), seed=8, augment=aug)
    for i in (0, 5, 9):
        assert _same_item(d1[i], d2[i])
    assert not all(_same_item(d1[i], d3[i]) for i in range(4))
    d2.set_epoch(1)
    assert not all(_same_item(d1[i], d2[i]) for i in range(4))
    assert _same_item(d1[(1, 3)], d2[3])


def test_same_patches_with_0_and_2_workers(index):
    aug = AugmentConfig(p_affine=0.5, p_noise=0.5, p_blur=0.5, p_gamma=0.5)

    def run(workers):
        ds = PatchDataset(index, _cfg(patches_per_epoch=12), seed=11, augment=aug)
        loader = make_loader(ds, batch_size=3, num_workers=workers)
        out = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)  # must reach persistent workers too
            out.extend(loader)
        return out

    a, b = run(0), run(2)
    assert len(a) == len(b) == 8
    for (ia, la, ma), (ib, lb, mb) in zip(a, b):
        assert ia.shape == (3, 1, 32, 32, 32) and la.dtype == torch.uint8
        assert ma["id"] == mb["id"] and torch.equal(ma["origin"], mb["origin"])
        assert torch.equal(ma["centred"], mb["centred"])
        assert torch.equal(la, lb)
        torch.testing.assert_close(ia, ib, atol=1e-5, rtol=1e-5)
    assert not torch.equal(a[0][0], a[4][0])  # epoch 1 differs from epoch 0


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------


def test_disk_cache_gives_same_patches_and_memmaps(index, tmp_path):
    cache_dir = tmp_path / "cache"
    mem = PatchDataset(index, _cfg(), seed=5)
    disk = PatchDataset(index, _cfg(cache_dir=str(cache_dir)), seed=5)
    for i in range(8):
        assert _same_item(mem[i], disk[i])
    assert sorted(p.name for p in cache_dir.glob("a.*")) == ["a.image.npy", "a.label.npy", "a.meta.npz"]
    fresh = VolumeCache(cache_dir=cache_dir)
    vol = fresh.get(index.by_id("a"))
    assert isinstance(vol.image, np.memmap) and isinstance(vol.label, np.memmap)
    assert vol.surface.shape[1] == 3 and (vol.label[tuple(vol.surface.T)] == 1).all()


def test_lru_cache_is_bounded_by_bytes(index):
    one = 2 * 64**3
    cache = VolumeCache(max_bytes=int(2.5 * one), surface_points=10)
    for rid in ("a", "b", "c"):
        cache.get(index.by_id(rid))
    assert len(cache) == 2 and cache.nbytes <= 2.5 * one and cache.misses == 3
    cache.get(index.by_id("c"))
    assert cache.hits == 1
    cache.get(index.by_id("a"))  # evicted earlier: read again
    assert cache.misses == 4


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def _blocky(shape=(32, 32, 32), block=8, seed=0, batch=2):
    """Labels made of constant blocks, image = label encoded as intensity (normalized 'fixed')."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 3, size=(batch, 1) + tuple(s // block for s in shape), dtype=np.uint8)
    label = coarse
    for ax in (2, 3, 4):
        label = np.repeat(label, block, axis=ax)
    image = normalize_intensity(CODES[label], mode="fixed")
    return torch.from_numpy(image), torch.from_numpy(label)


def _decode_agreement(image: torch.Tensor, label: torch.Tensor) -> tuple[float, float]:
    """Share of voxels whose intensity is exactly a code, and the share of those whose label agrees."""
    codes = torch.from_numpy(normalize_intensity(CODES, mode="fixed"))
    dist = (image[..., None] - codes).abs()
    nearest = dist.argmin(-1)
    exact = dist.min(-1).values < 1e-4
    agree = (nearest[exact] == label[exact].long()).float().mean()
    return float(exact.float().mean()), float(agree)


SPATIAL = {
    "flip": dict(p_flip=1.0),
    "rot90": dict(p_rot90=1.0),
    "affine": dict(p_affine=1.0, rotation_deg=20.0, scale_range=(0.8, 1.2)),
    "all_spatial": dict(p_flip=0.5, p_rot90=0.5, p_affine=1.0),
}
INTENSITY = {
    "intensity": dict(p_intensity=1.0),
    "gamma": dict(p_gamma=1.0),
    "noise": dict(p_noise=1.0, noise_std=(0.05, 0.1)),
    "blur": dict(p_blur=1.0),
}


def test_decode_agreement_detects_misalignment():  # the alignment check below has power
    image, label = _blocky()
    assert _decode_agreement(image, label) == (1.0, 1.0)
    _, agree = _decode_agreement(image, torch.roll(label, 1, dims=4))
    assert agree < 0.95


@pytest.mark.parametrize("shape", [(32, 32, 32), (32, 32, 64)])
@pytest.mark.parametrize("name", list(SPATIAL))
def test_spatial_augmentations_keep_labels_valid_and_aligned(name, shape):
    image, label = _blocky(shape, batch=3)
    before = (image.clone(), label.clone())
    cfg = AugmentConfig(**{**NO_AUG, **SPATIAL[name]})
    changed = False
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        out_i, out_l = augment_batch(image, label, cfg, gen)
        assert out_i.shape == image.shape and out_l.shape == label.shape
        assert out_i.dtype == torch.float32 and out_l.dtype == torch.uint8
        assert set(out_l.unique().tolist()) <= {0, 1, 2}
        exact, agree = _decode_agreement(out_i, out_l)
        assert exact > 0.4
        assert agree >= (1.0 if name in ("flip", "rot90") else 0.995), (name, agree)
        changed |= not torch.equal(out_l, label)
    assert changed
    assert torch.equal(image, before[0]) and torch.equal(label, before[1])  # inputs untouched


def test_affine_fills_outside_with_ignore_and_zero():
    image, label = _blocky(batch=1)
    label = torch.zeros_like(label)  # no 2 anywhere: every 2 afterwards comes from outside
    image = torch.full_like(image, 0.5)
    cfg = AugmentConfig(**{**NO_AUG, "p_affine": 1.0, "rotation_deg": 45.0, "scale_range": (0.6, 0.6)})
    out_i, out_l = augment_batch(image, label, cfg, torch.Generator().manual_seed(0))
    assert set(out_l.unique().tolist()) == {0, 2}
    corner = (0, 0, 0, 0, 0)
    assert out_l[corner] == 2 and out_i[corner] == 0.0  # zoomed out: corners come from outside
    centre = (0, 0, 16, 16, 16)
    assert out_l[centre] == 0 and abs(float(out_i[centre]) - 0.5) < 1e-6


@pytest.mark.parametrize("name", list(INTENSITY))
def test_intensity_augmentations_leave_labels_alone(name):
    image, label = _blocky(batch=2)
    cfg = AugmentConfig(**{**NO_AUG, **INTENSITY[name]})
    out_i, out_l = augment_batch(image, label, cfg, torch.Generator().manual_seed(1))
    assert torch.equal(out_l, label)
    assert out_i.shape == image.shape and torch.isfinite(out_i).all()
    assert not torch.allclose(out_i, image)
    assert not torch.allclose(out_i[0], out_i[1] - image[1] + image[0])  # per-sample parameters


def test_all_augmentations_together_batch_and_dataset(index):
    image, label = _blocky(batch=4)
    cfg = AugmentConfig(**{f.name: 1.0 for f in dataclasses.fields(AugmentConfig) if f.name.startswith("p_")})
    for seed in range(3):
        out_i, out_l = augment_batch(image, label, cfg, torch.Generator().manual_seed(seed))
        assert set(out_l.unique().tolist()) <= {0, 1, 2} and torch.isfinite(out_i).all()
    ds = PatchDataset(index, _cfg(), seed=0, augment=cfg)
    for i in range(4):
        _, lbl, _ = ds[i]
        assert set(lbl.unique().tolist()) <= {0, 1, 2}


def test_augment_batch_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B, 1, Z, Y, X"):
        augment_batch(torch.zeros(2, 32, 32, 32), torch.zeros(2, 32, 32, 32, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(ValueError, match="label shape"):
        augment_batch(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 16, dtype=torch.uint8), AugmentConfig())


# ----------------------------------------------------------------------------------------------
# Bad labels: the same one line with and without workers; the pre-check
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_label_index(tmp_path_factory):
    """Two volumes; the label of ``bad`` holds the value 255 (as a mask export would)."""
    root = tmp_path_factory.mktemp("bad_labels")
    image, label = _volume((64, 64, 64))
    bad = label.copy()
    bad[30, 30, 30] = 255
    return _write_dataset(root, {"good": ("s1", image, label), "bad": ("s1", image, bad)})


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_label_in_a_worker_is_the_same_one_line_error(bad_label_index, workers):
    from kaggle_utils.data import DataError

    ds = PatchDataset(bad_label_index, _cfg(patches_per_epoch=8), seed=0)
    loader = make_loader(ds, batch_size=2, num_workers=workers)
    with pytest.raises(DataError) as exc:
        list(loader)
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message, message
    assert message.startswith(str(bad_label_index.root / "train_labels" / "bad.tif")) and "[255]" in message
    if workers:  # the worker's traceback is not chained on either
        assert exc.value.__cause__ is None and exc.value.__suppress_context__


def test_worker_error_message_parses_torch_wrapping():
    from kaggle_utils.data import DataError
    from kaggle_utils.sampling import worker_error_message

    wrapped = DataError("Caught DataError in DataLoader worker process 1.\nOriginal Traceback (most recent call last):\n"
                        '  File "x.py", line 1, in f\n    raise DataError(m)\n'
                        "kaggle_utils.data.DataError: /d/train_labels/7.tif: label values must be in {0, 1, 2}\n")
    assert worker_error_message(wrapped) == "/d/train_labels/7.tif: label values must be in {0, 1, 2}"
    assert worker_error_message(DataError("/d/a.tif: plain message")) is None
    assert worker_error_message(ValueError("Caught ValueError in DataLoader worker process 0.")) is None


def test_check_labels_reads_each_label_and_reports_the_first_bad_one(bad_label_index, index, tmp_path):
    from kaggle_utils.data import DataError
    from kaggle_utils.sampling import check_labels

    assert check_labels(index, progress=False) == len(index) == 4
    assert check_labels(index, workers=3, progress=False) == 4
    for workers in (1, 2):
        with pytest.raises(DataError, match=r"bad\.tif: label values must be in \{0, 1, 2\}, found \[255\]"):
            check_labels(bad_label_index, workers=workers, progress=False)
    # a label of another shape than its image is found from the image's TIFF header
    image, label = _volume((32, 32, 32))
    other = _write_dataset(tmp_path / "shape", {"v": ("s1", image, label[:, :, :16].copy())})
    with pytest.raises(DataError, match=r"v\.tif: label shape \(32, 32, 16\) != image shape \(32, 32, 32\)"):
        check_labels(other, progress=False)
