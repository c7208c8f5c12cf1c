"""Tests for kaggle_utils.prepare: the round trip (arrays equal to the decoded TIFFs, the surface index the
sampler would draw), packed labels, an interrupted prepare (no half file, a rerun completes), a corrupt
source volume, a cache that does not match the data folder, the sampler's patches from a cache equal to
those from the TIFFs, and training end to end on a prepared cache without decoding a TIFF."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kaggle_utils.cli import main
from kaggle_utils.data import DataError, label_shares, load_index, read_label, read_volume, write_volume
from kaggle_utils.prepare import (
    Blosc2Volume,
    PackedLabel,
    find_prepared,
    PreparedCacheError,
    open_prepared,
    pack_labels,
    prepare,
    select_ids,
    unpack_labels,
)
from kaggle_utils.prepare import surface_subsample
from kaggle_utils.sampling import PatchDataset, SamplerConfig


@pytest.fixture
def data(tiny_train_data, tmp_path):
    """A writable copy of the shared tiny dataset (3 training volumes of 64^3)."""
    return Path(shutil.copytree(tiny_train_data, tmp_path / "data"))


def test_pack_unpack_round_trip_and_slices():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, size=(3, 4, 11), dtype=np.uint8)  # X not a multiple of 4
    packed = pack_labels(label)
    assert packed.shape == (3, 4, 3) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_labels(packed, 11), label)
    lab = PackedLabel(packed, label.shape)
    for x0 in range(12):
        for x1 in range(x0, 12):
            np.testing.assert_array_equal(lab[0:2, 1:4, x0:x1], label[0:2, 1:4, x0:x1])
    np.testing.assert_array_equal(np.asarray(lab), label)
    with pytest.raises(TypeError):
        lab[0]


def _needs_blosc2(*storage: str) -> None:
    if "blosc2" in storage:
        pytest.importorskip("blosc2")


@pytest.mark.parametrize("labels,images", [("npy", "npy"), ("packed", "npy"), ("blosc2", "blosc2")])
def test_round_trip_equals_the_decoded_tiffs(tiny_train_data, tmp_path, labels, images):
    _needs_blosc2(labels, images)
    out = tmp_path / "cache"
    report = prepare(tiny_train_data, out, labels=labels, images=images, surface_points=500, workers=2,
                     progress=False)
    index = load_index(tiny_train_data, "train")
    assert sorted(report.prepared) == sorted(index.ids) and report.n_volumes == 3
    manifest = json.loads((out / "manifest.json").read_text())
    vols = open_prepared(out, index.records, surface_points=500)
    for rec in index:
        image, label = read_volume(rec.image_path), read_label(rec.label_path)
        got = vols.get(rec)
        assert isinstance(got.image, np.memmap if images == "npy" else Blosc2Volume)
        np.testing.assert_array_equal(np.asarray(got.image), image)
        np.testing.assert_array_equal(got.image[3:40, 5:9, 60:64], image[3:40, 5:9, 60:64])
        np.testing.assert_array_equal(got.label[1:2, 0:64, 7:50], label[1:2, 0:64, 7:50])
        np.testing.assert_array_equal(np.asarray(got.label), label)
        np.testing.assert_array_equal(got.surface, surface_subsample(label, rec.id, 500))
        entry = manifest["volumes"][rec.id]
        assert entry["shape"] == list(image.shape) and entry["labels"] == labels and entry["images"] == images
        np.testing.assert_allclose(entry["label_shares"], label_shares(label), atol=1e-6)
        assert entry["n_surface"] == int((label == 1).sum())
    assert not list((out / "volumes").glob(".*"))  # no temp files left


def test_caches_split_over_parts_are_found_and_read_together(tiny_train_data, tmp_path):
    index = load_index(tiny_train_data, "train")
    for k in (1, 2):
        prepare(tiny_train_data, tmp_path / "input" / f"part{k}" / "cache", part=(k, 2), progress=False)
    (tmp_path / "input" / "other").mkdir()
    (tmp_path / "input" / "other" / "manifest.json").write_text('{"format": "something else"}')
    found = find_prepared(tmp_path / "input")
    assert found == [tmp_path / "input" / "part1" / "cache", tmp_path / "input" / "part2" / "cache"]
    vols = open_prepared(found, index.records)
    assert sorted(vols.entries) == sorted(index.ids)


def test_select_ids_by_ids_folds_and_parts(tiny_train_data):
    index = load_index(tiny_train_data, "train")
    ids = index.ids
    assert select_ids(index) == ids
    assert select_ids(index, ids=[ids[2], ids[0]]) == [ids[0], ids[2]]
    assert select_ids(index, part=(1, 2)) == ids[0::2] and select_ids(index, part=(2, 2)) == ids[1::2]
    in_folds = [select_ids(index, folds=[k], n_folds=3) for k in range(3)]
    assert sorted(sum(in_folds, [])) == sorted(ids) and all(len(f) == 1 for f in in_folds)
    with pytest.raises(DataError, match="nope"):
        select_ids(index, ids=["nope"])
    with pytest.raises(DataError, match="--folds"):
        select_ids(index, folds=[3], n_folds=3)


def test_interrupted_prepare_leaves_no_half_file_and_a_rerun_completes(tiny_train_data, tmp_path, monkeypatch):
    import kaggle_utils.prepare as prep

    out = tmp_path / "cache"
    real_save = np.save
    calls = {"n": 0}

    def crashing_save(fh, arr, *a, **k):  # the 4th array (2nd volume's image) dies half-way through the file
        calls["n"] += 1
        if calls["n"] == 4:
            fh.write(b"\x93NUMPY half a file")
            raise KeyboardInterrupt("killed mid-volume")
        return real_save(fh, arr, *a, **k)

    monkeypatch.setattr(prep.np, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        prepare(tiny_train_data, out, workers=1, progress=False)
    monkeypatch.setattr(prep.np, "save", real_save)
    files = sorted(p.name for p in (out / "volumes").iterdir())
    first, second = load_index(tiny_train_data, "train").ids[:2]
    assert {f"{first}.{k}" for k in ("image.npy", "label.npy", "surface.npy", "json")} <= set(files)
    assert not [f for f in files if f.startswith(f"{second}.") or f.startswith(".")]  # nothing half-written
    for entry in (out / "volumes").glob("*.json"):  # every finished volume is whole (the 3rd may have started)
        shape = tuple(json.loads(entry.read_text())["shape"])
        assert np.load(out / "volumes" / f"{entry.stem}.image.npy").shape == shape
    assert not (out / "manifest.json").exists()
    with pytest.raises(PreparedCacheError, match="prepare did not finish"):
        open_prepared(out)
    (out / "volumes" / f".{second}.image.npy.x1y2.tmp").write_bytes(b"left by a SIGKILL")
    report = prepare(tiny_train_data, out, workers=1, progress=False)
    assert first in report.skipped and second in report.prepared and report.n_volumes == 3
    assert not list((out / "volumes").glob(".*"))
    vols = open_prepared(out, load_index(tiny_train_data, "train").records)
    rec = load_index(tiny_train_data, "train").by_id(second)
    np.testing.assert_array_equal(vols.image(second), read_volume(rec.image_path))


def test_corrupt_source_volume_is_one_line_naming_the_file(data, tmp_path, capsys):
    index = load_index(data, "train")
    bad = index.records[1].image_path
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    with pytest.raises(DataError, match=str(bad)):
        prepare(data, tmp_path / "cache", workers=2, progress=False)
    assert main(["prepare", "--data-dir", str(data), "--out", str(tmp_path / "c2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(bad) in err[0]


def test_bad_label_values_are_refused(data, tmp_path):
    rec = load_index(data, "train").records[0]
    label = read_label(rec.label_path)
    label[0, 0, 0] = 7
    write_volume(rec.label_path, label, compression="zlib")
    with pytest.raises(DataError, match=r"label values must be in \{0, 1, 2\}, found \[7\]"):
        prepare(data, tmp_path / "cache", progress=False)


def test_a_cache_that_does_not_match_the_data_folder(data, tmp_path):
    out = tmp_path / "cache"
    index = load_index(data, "train")
    prepare(data, out, ids=index.ids[:2], progress=False)
    with pytest.raises(PreparedCacheError, match=r"1 of the run's 3 volume\(s\) are not prepared"):
        open_prepared(out, index.records)
    rec = index.records[0]
    label = read_label(rec.label_path)
    label[label == 1] = 0
    write_volume(rec.label_path, label)  # the data changed after the cache was made
    with pytest.raises(PreparedCacheError, match=f"{rec.id} was prepared from another {rec.label_path.name}"):
        open_prepared(out, index.records[:1])
    report = prepare(data, out, ids=index.ids[:2], progress=False)  # a rerun redoes the changed volume
    assert report.prepared == [rec.id]
    with pytest.raises(PreparedCacheError, match="labels 'npy'"):
        prepare(data, out, labels="packed", progress=False)
    with pytest.raises(PreparedCacheError, match="images 'npy'"):
        prepare(data, out, images="blosc2", progress=False)


def test_a_damaged_cache_file_is_one_line_naming_it(tiny_train_data, tmp_path):
    out = tmp_path / "cache"
    prepare(tiny_train_data, out, progress=False)
    rec = load_index(tiny_train_data, "train").records[0]
    image = out / "volumes" / f"{rec.id}.image.npy"
    image.write_bytes(image.read_bytes()[:1000])  # truncated after prepare (a disk problem, a bad copy)
    vols = open_prepared(out, [rec])
    with pytest.raises(PreparedCacheError, match=f"{image}: unreadable prepared array .* rerun prepare"):
        vols.get(rec)


def test_a_damaged_blosc2_file_is_one_line_naming_it(tiny_train_data, tmp_path):
    pytest.importorskip("blosc2")
    out = tmp_path / "cache"
    prepare(tiny_train_data, out, labels="blosc2", images="blosc2", progress=False)
    recs = load_index(tiny_train_data, "train").records
    label = out / "volumes" / f"{recs[0].id}.label.b2nd"
    label.write_bytes(label.read_bytes()[:200])  # truncated: cannot even be opened
    with pytest.raises(PreparedCacheError, match=f"{label}: unreadable blosc2 array .* rerun prepare"):
        open_prepared(out, [recs[0]]).get(recs[0])
    image = out / "volumes" / f"{recs[1].id}.image.b2nd"
    image.write_bytes(b"\0" * 5000)  # overwritten (a bad copy)
    with pytest.raises(PreparedCacheError, match=f"{image}: unreadable blosc2 array"):
        open_prepared(out, [recs[1]]).get(recs[1])
    image.unlink()
    with pytest.raises(PreparedCacheError, match=f"{image}: unreadable blosc2 array"):
        open_prepared(out, [recs[1]]).get(recs[1])


def test_blosc2_volumes_survive_pickling_and_reopen_in_each_process(tiny_train_data, tmp_path):
    import pickle

    pytest.importorskip("blosc2")
    out = tmp_path / "cache"
    prepare(tiny_train_data, out, labels="blosc2", progress=False)
    rec = load_index(tiny_train_data, "train").records[0]
    lab = open_prepared(out, [rec]).label(rec)
    want = read_label(rec.label_path)
    assert isinstance(lab, Blosc2Volume) and lab.shape == want.shape and lab.dtype == np.uint8
    copy = pickle.loads(pickle.dumps(lab))  # what a spawned DataLoader worker gets
    assert copy._nd is None
    np.testing.assert_array_equal(copy[0:40, 10:20, 30:64], want[0:40, 10:20, 30:64])
    lab._pid = -2  # as after a fork: the next read opens the file again in this process
    np.testing.assert_array_equal(np.asarray(lab), want)
    assert lab._pid > 0


def test_blosc2_storage_without_the_package_says_how_to_get_it(tiny_train_data, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "blosc2", None)  # import blosc2 -> ImportError
    with pytest.raises(PreparedCacheError, match="pip install blosc2"):
        prepare(tiny_train_data, tmp_path / "cache", labels="blosc2", progress=False)
    assert not (tmp_path / "cache" / "volumes").exists()  # refused before any decode


@pytest.mark.parametrize("labels,images", [("npy", "npy"), ("packed", "npy"), ("none", "npy"), ("blosc2", "blosc2")])
def test_sampler_draws_the_same_patches_from_the_cache_as_from_the_tiffs(tiny_train_data, tmp_path, labels, images):
    _needs_blosc2(labels, images)
    out = tmp_path / "cache"
    prepare(tiny_train_data, out, labels=labels, images=images, surface_points=300, progress=False)
    index = load_index(tiny_train_data, "train")
    kw = dict(patch_size=(32, 32, 48), patches_per_epoch=12, surface_share=0.6, surface_points=300)
    tiff = PatchDataset(index, SamplerConfig(**kw), seed=4)
    cached = PatchDataset(index, SamplerConfig(prepared=str(out), **kw), seed=4)
    assert type(cached.cache).__name__ == "PreparedVolumes"
    for i in range(len(tiff)):
        (a, la, ma), (b, lb, mb) = tiff[i], cached[i]
        assert ma == mb
        assert bool((a == b).all()) and bool((la == lb).all())
    assert tiff.cache.misses == 3


def test_train_on_a_prepared_cache_end_to_end_without_decoding(tiny_train_data, tmp_path, monkeypatch, capsys):
    import kaggle_utils.sampling as sampling
    import kaggle_utils.train as train_mod
    import kaggle_utils.train.validation as validation_mod
    from test_train import tiny_cfg

    out = tmp_path / "cache"
    prepare(tiny_train_data, out, labels="packed", progress=False)

    def no_decoding(path, *a, **k):
        raise AssertionError(f"decoded {path}")

    for mod in (sampling, validation_mod):
        monkeypatch.setattr(mod, "read_volume", no_decoding)
        monkeypatch.setattr(mod, "read_label", no_decoding)
    cfg = tiny_cfg(train={"epochs": 1}, sampler={"prepared": [str(out)]})
    result = train_mod.train(cfg, tiny_train_data, tmp_path / "run", fold=0, device="cpu", progress=False)
    assert result.stopped == "completed" and result.oof_dir is not None
    assert len(list(result.oof_dir.glob("*.json"))) == 1  # one held-out volume (any OOF format)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "prepared cache" in log and "decoded-volume cache: none" in log


def test_train_refuses_a_cache_missing_training_volumes(tiny_train_data, tmp_path, capsys):
    out = tmp_path / "cache"
    prepare(tiny_train_data, out, ids=load_index(tiny_train_data, "train").ids[:1], progress=False)
    cfg = tmp_path / "cfg.yaml"
    from test_train import TINY

    cfg.write_text(json.dumps(TINY))
    rc = main(["train", "--config", str(cfg), "--data-dir", str(tiny_train_data), "--out", str(tmp_path / "run"),
               "--prepared", str(out), "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "are not prepared" in err[-1]


def test_train_refuses_a_configuration_that_cannot_fit_before_training(tiny_train_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    from test_train import TINY

    cfg.write_text(json.dumps(TINY))
    rc = main(["train", "--config", str(cfg), "--data-dir", str(tiny_train_data), "--out", str(tmp_path / "run"),
               "--memory-gb", "0.01", "--device", "cpu", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: memory: ") and "--memory-gb" in err[-1]
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_two_gloo_ranks_train_on_a_prepared_cache(tiny_train_data, tmp_path, capsys):
    # the notebook's GPUS=2 path with --prepared: every rank reads the cache, rank 0's budget is everyone's
    import yaml
    from test_train import REPO, TINY

    from kaggle_utils.train import train_torchrun

    out = tmp_path / "cache"
    prepare(tiny_train_data, out, labels="packed", progress=False)
    data = json.loads(json.dumps(TINY))
    data["validation"]["write_oof"] = False
    data["train"]["num_workers"] = 1
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    results = train_torchrun(2, cfg_path, tiny_train_data, tmp_path / "runs", folds=[0], epochs=1, device="cpu",
                             prepared=[out], memory_gb=4,
                             env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    printed = capsys.readouterr().out
    assert f"--prepared {out}" in printed and "--memory-gb 4" in printed
    assert [(r.fold, r.epochs_completed, r.stopped) for r in results] == [(0, 1, "completed")]
    assert printed.count("decoded-volume cache: none (prepared cache") == 1  # rank 0 prints the plan once
    assert "for 2 rank(s) x 1 worker(s)" in printed and "budget (set to 4 GiB)" in printed


def test_blosc2_cache_benchmark_runs(tmp_path, capsys):
    # smoke test of benchmarks/blosc2_cache.py at a tiny size: every variant writes, reads back equal, prints a row
    pytest.importorskip("blosc2")
    import importlib.util

    from test_train import REPO

    spec = importlib.util.spec_from_file_location("blosc2_cache", REPO / "benchmarks" / "blosc2_cache.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--work", str(tmp_path), "--n-volumes", "1", "--size", "48", "--patch", "16",
                       "--patches", "3"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| image") or
            line.startswith("| label")]
    assert len(rows) == 2 * (1 + len(bench.GRID)) + 1  # npy + grid for both, packed for labels
