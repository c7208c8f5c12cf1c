"""Tests for kaggle_utils.metrics.topo: official reference values, hand-built cases, closed forms,
and a literal (slow, textbook) implementation of the Betti-matching procedure on tiny volumes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from kaggle_utils.data import read_volume
from kaggle_utils.metrics import topo
from kaggle_utils.metrics.topo import (
    closed_form_counts,
    octant_slices,
    topo_counts,
    topo_counts_octant,
    topo_f1_from_counts,
    topo_score,
    topo_score_from_counts,
)

REF = Path(__file__).parent / "data" / "metric_reference"
OFFICIAL = json.loads((REF / "official.json").read_text())


def _load_case(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name.startswith("extra_"):
        gt, pred = read_volume(REF / f"{name}_gt.tif"), read_volume(REF / f"{name}_pred.tif")
    else:
        gt, pred = read_volume(REF / "gt.tif"), read_volume(REF / f"pred_{name}.tif")
    ignore = gt == 2
    return np.where(ignore, 0, pred) != 0, np.where(ignore, 0, gt) != 0


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_reference(name):
    pred, gt = _load_case(name)
    score, counts = topo_score(pred, gt)
    ref = {int(k): tuple(v) for k, v in OFFICIAL[name]["topo_counts_by_dim_m_p_g"].items()}
    assert counts == ref
    assert topo_counts(pred, gt, method="reference") == ref
    assert score == pytest.approx(OFFICIAL[name]["topo_score"], abs=1e-9)
    f1 = topo_f1_from_counts(counts)
    for k, val in OFFICIAL[name]["topoF1_by_dim"].items():
        assert (f1[int(k)] is None) == (val is None)
        if val is not None:
            assert f1[int(k)] == pytest.approx(val, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Octants and score arithmetic
# ---------------------------------------------------------------------------------------------


def test_octant_slices_rule():
    sl = octant_slices((5, 1, 4))
    assert len(sl) == 4
    assert sl[0] == (slice(0, 3), slice(0, 1), slice(0, 2))
    assert sl[-1] == (slice(3, 5), slice(0, 1), slice(2, 4))
    vol = np.zeros((7, 6, 5), int)
    for i, s in enumerate(octant_slices(vol.shape)):
        vol[s] += 1
    assert (vol == 1).all()
    with pytest.raises(ValueError):
        octant_slices((4, 4))


def test_score_from_counts():
    assert topo_score_from_counts({0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}) == 1.0
    counts = {0: (1, 2, 2), 1: (0, 3, 0), 2: (0, 0, 0)}
    f1 = topo_f1_from_counts(counts)
    assert f1 == {0: 0.5, 1: 0.5 / 3.5, 2: None}
    assert topo_score_from_counts(counts) == pytest.approx((0.34 * 0.5 + 0.33 * 0.5 / 3.5) / 0.67)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        topo_counts(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_nan_and_nonbinary_values():
    a = np.zeros((6, 6, 6), np.float32)
    a[0, 0, 0] = a[1, 1, 0] = 0.3  # two 6-disconnected voxels
    a[4, 4, 4] = np.nan  # background
    assert topo_counts(a, np.zeros_like(a))[0] == (0, 1, 0)
    b = (a != 0).astype(np.uint8) * 255
    b[4, 4, 4] = 0
    assert topo_counts(b, b)[0] == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Hand-built cases (one octant or whole volume)
# ---------------------------------------------------------------------------------------------

ZERO = {0: (0, 0, 0), 1: (0, 0, 0), 2: (0, 0, 0)}


def test_empty_single_full():
    z = np.zeros((6, 6, 6), bool)
    score, counts = topo_score(z, z)
    assert counts == ZERO and score == 1.0
    one = z.copy()
    one[1, 1, 1] = True
    assert topo_counts(one, one) == ZERO
    assert topo_counts(~z, ~z) == ZERO


def test_diagonal_voxels_are_two_components():
    a = np.zeros((4, 4, 4), bool)
    a[0, 0, 0] = a[1, 1, 0] = True
    assert topo_counts_octant(a, np.zeros_like(a)) == {0: (0, 1, 0), 1: (0, 0, 0), 2: (0, 0, 0)}


def test_hollow_cube_and_ring():
    box = np.zeros((7, 7, 7), bool)
    box[1:6, 1:6, 1:6] = True
    box[2:5, 2:5, 2:5] = False
    assert topo_counts_octant(box, box) == {0: (0, 0, 0), 1: (0, 0, 0), 2: (1, 1, 1)}
    ring = np.zeros((3, 7, 7), bool)
    ring[1, 1:6, 1:6] = True
    ring[1, 2:5, 2:5] = False
    assert topo_counts_octant(ring, ring) == {0: (0, 0, 0), 1: (1, 1, 1), 2: (0, 0, 0)}
    assert topo_counts_octant(ring, np.zeros_like(ring))[1] == (0, 1, 0)
    # whole volume: hollow cube inside octant 0 of a 16^3 volume
    vol = np.zeros((16, 16, 16), bool)
    vol[:7, :7, :7] = box
    assert topo_counts(vol, vol)[2] == (1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Literal implementation of the procedure (docs/metric.md, "How the counts are computed") for tiny volumes
# ---------------------------------------------------------------------------------------------


class _UF:
    """Union-find whose set root is the min (``keep_min``) or max node by (value, id)."""

    def __init__(self, values, keep_min):
        self.parent = list(range(len(values)))
        self.key = [(v, i) for i, v in enumerate(values)]
        self.keep_min = keep_min

    def find(self, i):
        while self.parent[i] != i:
            i = self.parent[i]
        return i

    def union(self, a, b):  # a, b roots
        keep = min(a, b, key=self.key.__getitem__) if self.keep_min else max(a, b, key=self.key.__getitem__)
        lose = b if keep == a else a
        self.parent[lose] = keep


def _complex(shape):
    X, Y, Z = shape
    vid = lambda x, y, z: (x * Y + y) * Z + z  # noqa: E731
    st = [(1, 0, 0), (0, 1, 0), (0, 0, 1)]
    span = {0: (1, 2), 1: (0, 2), 2: (0, 1)}
    edges, faces, cubes = {}, {}, {}
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                v = vid(x, y, z)
                for t in range(3):
                    e = (x + st[t][0], y + st[t][1], z + st[t][2])
                    if e[0] < X and e[1] < Y and e[2] < Z:
                        edges[3 * v + t] = (v, vid(*e))
                    a, b = span[t]
                    c = [x, y, z]
                    if c[a] + 1 < shape[a] and c[b] + 1 < shape[b]:
                        pa = tuple(c[i] + st[a][i] for i in range(3))
                        pb = tuple(c[i] + st[b][i] for i in range(3))
                        corners = [v, vid(*pa), vid(*pb), vid(*(c[i] + st[a][i] + st[b][i] for i in range(3)))]
                        bnd = [3 * v + a, 3 * v + b, 3 * vid(*pa) + b, 3 * vid(*pb) + a]
                        # dual neighbours along t (None = infinity)
                        lo = list(c)
                        lo[t] -= 1
                        n1 = tuple(lo) if lo[t] >= 0 else None
                        n2 = tuple(c) if c[t] < shape[t] - 1 else None
                        faces[3 * v + t] = (corners, bnd, n1, n2)
                if x < X - 1 and y < Y - 1 and z < Z - 1:
                    cubes[(x * (Y - 1) + y) * (Z - 1) + z] = [
                        vid(x + i, y + j, z + k) for i in (0, 1) for j in (0, 1) for k in (0, 1)
                    ]
    return edges, faces, cubes


def _literal_counts(fa, fg):
    shape = fa.shape
    X, Y, Z = shape
    vals = [(~fa).astype(int).ravel(), (~fg).astype(int).ravel()]
    vals.append(np.minimum(vals[0], vals[1]))
    edges, faces, cubes = _complex(shape)
    ev = [{e: max(V[a], V[b]) for e, (a, b) in edges.items()} for V in vals]
    fv = [{f: max(V[c] for c in d[0]) for f, d in faces.items()} for V in vals]
    out = {}
    # dimension 2
    if min(shape) > 1:
        nc = len(cubes)
        cube_ix = lambda c: None if c is None else (c[0] * (Y - 1) + c[1]) * (Z - 1) + c[2]  # noqa: E731
        cv = [[max(V[c] for c in cubes[i]) for i in range(nc)] + [np.inf] for V in vals]
        keys, npairs = [set(), set()], [0, 0]
        for k in (0, 1, 2):
            uf = _UF(cv[k], keep_min=False)
            ufc = _UF(cv[2], keep_min=False)
            m = 0
            for f in sorted(faces, key=lambda f: (fv[k][f], f), reverse=True):
                n1, n2 = (cube_ix(c) for c in faces[f][2:])
                n1 = nc if n1 is None else n1
                n2 = nc if n2 is None else n2
                a, b = uf.find(n1), uf.find(n2)
                if a == b:
                    continue
                yk = min(a, b, key=uf.key.__getitem__)
                ca, cb = ufc.find(n1), ufc.find(n2)
                yc = min(ca, cb, key=ufc.key.__getitem__)
                uf.union(a, b)
                ufc.union(ca, cb)
                if fv[k][f] != cv[k][yk]:
                    if k < 2:
                        keys[k].add(yc)
                        npairs[k] += 1
                    elif yk in keys[0] and yk in keys[1]:
                        m += 1
        out[2] = (m, npairs[0], npairs[1])
    else:
        out[2] = (0, 0, 0)

    # dimension 1: textbook reductions, no clearing
    def reduce(col_order, row_key):
        pivots, lows = {}, {}
        for f in col_order:
            col = {row_key(e) for e in faces[f][1]}
            while col:
                low = max(col)
                if low not in pivots:
                    pivots[low] = f
                    lows[f] = low[1]
                    break
                col ^= reduced[pivots[low]]
            reduced[f] = col
        return lows

    order = [sorted(faces, key=lambda f: (fv[k][f], f)) for k in range(3)]
    births, n1 = [], []
    for k in (0, 1):
        reduced = {}
        lows = reduce(order[k], lambda e: (ev[k][e], e))
        b = {e for f, e in lows.items() if ev[k][e] != fv[k][f]}
        births.append(b)
        n1.append(len(b))
    reduced = {}
    comp = {f: e for f, e in reduce(order[2], lambda e: (ev[2][e], e)).items() if ev[2][e] != fv[2][f]}
    im = []
    for k in (0, 1):
        reduced = {}
        im.append(reduce(order[2], lambda e: (ev[k][e], e)))
    m1 = sum(1 for f in comp if im[0].get(f) in births[0] and im[1].get(f) in births[1])
    out[1] = (m1, n1[0], n1[1])
    # dimension 0
    ekeys, n0 = [set(), set()], [0, 0]
    for k in (0, 1):
        uf = _UF(list(vals[k]), keep_min=True)
        for e in sorted(edges, key=lambda e: (ev[k][e], e)):
            a, b = uf.find(edges[e][0]), uf.find(edges[e][1])
            if a == b:
                continue
            y = max(a, b, key=uf.key.__getitem__)
            uf.union(a, b)
            if vals[k][y] != ev[k][e]:
                ekeys[k].add(y)
                n0[k] += 1
    ufs = [_UF(list(V), keep_min=True) for V in vals]
    m0 = 0
    for e in sorted(edges, key=lambda e: (ev[2][e], e)):
        roots = [(u.find(edges[e][0]), u.find(edges[e][1])) for u in ufs]
        if roots[2][0] == roots[2][1]:
            continue
        ys = [max(r, key=u.key.__getitem__) for r, u in zip(roots, ufs)]
        for r, u in zip(roots, ufs):
            u.union(*r)
        if vals[2][ys[2]] != ev[2][e] and ys[0] in ekeys[0] and ys[1] in ekeys[1]:
            m0 += 1
    out[0] = (m0, n0[0], n0[1])
    return out


def _random_pair(rng, shape):
    """Blobby pred (loops and cavities at high foreground share), GT = pred with a few flips or independent."""
    noise = ndimage.uniform_filter(rng.random(shape), 2) if rng.random() < 0.7 else rng.random(shape)
    a = noise < np.quantile(noise, rng.uniform(0.3, 0.85))
    if rng.random() < 0.75:
        g = a ^ (rng.random(shape) < rng.uniform(0.01, 0.1))
    else:
        g = rng.random(shape) < rng.uniform(0.2, 0.8)
    return a, g


@pytest.mark.parametrize("seed", range(32))
def test_matches_literal_procedure(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    low = 1 if seed % 8 == 0 else 4
    shape = tuple(int(s) for s in rng.integers(low, 9, size=3))
    a, g = _random_pair(rng, shape)
    expected = _literal_counts(a, g)
    if seed % 2:  # force the dim-2 clearing path for the foreground complexes
        monkeypatch.setattr(topo, "_CLEAR_MIN_CUBES", -1)
    assert topo_counts_octant(a, g, method="reference") == expected
    assert topo_counts_octant(a, g, method="fast") == expected


@pytest.mark.parametrize("seed", [0, 1, 3, 4, 6, 7, 8, 9, 11, 13])
@pytest.mark.parametrize("method", topo.METHODS)
def test_matches_literal_procedure_cavities(seed, method, monkeypatch):
    """Mostly-foreground volumes with background pockets: many dim-2 pairs and partial matches."""
    rng = np.random.default_rng(50 + seed)
    shape = tuple(int(s) for s in rng.integers(6, 9, size=3))
    a = rng.random(shape) > rng.uniform(0.02, 0.06)
    g = a ^ (rng.random(shape) < 0.03)
    expected = _literal_counts(a, g)
    assert expected[2][1] > 0 and expected[2][2] > 0
    if seed % 2:
        monkeypatch.setattr(topo, "_CLEAR_MIN_CUBES", 10**9)  # foreground reductions without clearing
    assert topo_counts_octant(a, g, method=method) == expected


def test_whole_volume_is_sum_of_literal_octants():
    rng = np.random.default_rng(99)
    a, g = _random_pair(rng, (9, 8, 7))
    expected = {k: [0, 0, 0] for k in range(3)}
    for sl in octant_slices(a.shape):
        res = _literal_counts(a[sl], g[sl])
        for k in range(3):
            expected[k] = [x + y for x, y in zip(expected[k], res[k])]
    assert topo_counts(a, g) == {k: tuple(v) for k, v in expected.items()}
    assert topo_counts(a, g, workers=1) == topo_counts(a, g, workers=2)


# ---------------------------------------------------------------------------------------------
# Closed forms vs the union-find / reduction machinery, and identity property
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_closed_forms_match_machinery(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (12, 11, 10)
    fg = ndimage.uniform_filter(rng.random(shape), 2) < rng.uniform(0.3, 0.7)
    n0, n1, n2 = closed_form_counts(fg)
    # p0 against scipy's 6-connected labelling
    n_lab = ndimage.label(fg)[1]
    assert n0 == max(n_lab - 1, 0)
    X, Y, Z = shape
    bg = (~fg).astype(np.uint8).ravel()
    cube = topo._cube_values(bg, X, Y, Z)
    keys = np.zeros(cube.shape[0], np.uint8)
    cleared = np.zeros(3 * fg.size, np.uint8)
    assert topo._dim2_pass(bg, cube, cube, X, Y, Z, topo.Dim2Mode.INPUT, keys, keys, keys, cleared) == n2
    for clear in (cleared, np.zeros_like(cleared)):
        cols = topo._k0_columns(bg, clear, X, Y, Z)
        lows = topo._reduce(cols, bg, X, Y, Z, cols.shape[0])
        assert topo._k0_births(bg, lows, X, Y, Z)[1] == n1
    cols = topo._column_order(bg, cleared, X, Y, Z)
    lows = topo._reduce(cols, bg, X, Y, Z, cols.shape[0])
    assert topo._births(cols, lows, bg, Y, Z, fg.size)[1] == n1


@pytest.mark.parametrize("seed", range(4))
def test_identity_matches_everything(seed):
    rng = np.random.default_rng(200 + seed)
    x = ndimage.uniform_filter(rng.random((20, 18, 16)), 2) < 0.45
    counts = topo_counts(x, x)
    for k, (m, p, g) in counts.items():
        assert m == p == g
    assert sum(p for _, p, _ in counts.values()) > 0


# ---------------------------------------------------------------------------------------------
# Fast paths against the full machinery
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_k0_clearing_equals_dual_union_find(seed):
    """cc3d-based clearing of the value-0 2-cells = what the full dual union-find clears there."""
    rng = np.random.default_rng(300 + seed)
    shape = tuple(int(s) for s in rng.integers(2, 14, size=3))
    fg, _ = _random_pair(rng, shape)
    if seed % 3 == 0:
        fg = ndimage.binary_dilation(fg, iterations=2) & (rng.random(shape) > 0.02)  # solid, pockets
    fg = np.ascontiguousarray(fg)
    X, Y, Z = shape
    bg = (~fg).astype(np.uint8).ravel()
    cube = topo._cube_values(bg, X, Y, Z)
    full = np.zeros(3 * fg.size, np.uint8)
    topo._dim2_pass(bg, cube, cube, X, Y, Z, topo.Dim2Mode.CLEAR, cube, cube, cube, full)
    fast = np.zeros_like(full)
    topo._k0_clearing(fg, fast)
    value0 = np.zeros_like(full, dtype=bool)
    value0[topo._k0_columns(bg, np.zeros_like(full), X, Y, Z)] = True
    assert fast.sum() > 0 or full[value0].sum() == 0
    np.testing.assert_array_equal(fast.astype(bool), full.astype(bool) & value0)



def _model_like_pair(size, seed):
    """Wavy 2-voxel sheets with label gaps (GT) and a model-like prediction of them: shifted one
    voxel in z, dilated where a smooth field is high, blobs near the sheets, torn discs."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    gt = np.zeros((size,) * 3, bool)
    n_sheets = max(2, size // 12)
    for i in range(n_sheets):
        amp, fy, fx, ph = rng.uniform(1, 3), rng.uniform(0.5, 2), rng.uniform(0.5, 2), rng.uniform(0, 6)
        surf = (i + 0.5) * size / n_sheets + amp * np.sin(2 * np.pi * fy * y / size + ph) * np.cos(
            2 * np.pi * fx * x / size)
        gt |= (z >= surf) & (z < surf + 2)
    pts = np.argwhere(gt)

    def disc_at(c, r, depth):
        d = ((y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r) & (np.abs(z - c[0]) <= depth)
        return d

    for _ in range(size // 5):  # label gaps: tunnels in the GT
        gt &= ~disc_at(pts[rng.integers(len(pts))], rng.uniform(1.5, 3), 3)
    pred = np.roll(gt, 1, axis=0)
    field = ndimage.gaussian_filter(rng.standard_normal(gt.shape), 4)
    pred |= ndimage.binary_dilation(pred) & (field > np.quantile(field, 0.67))
    for _ in range(size // 3):  # blobs near the sheets
        c = pts[rng.integers(len(pts))] + rng.integers(-3, 4, size=3)
        pred |= (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= rng.uniform(1.5, 4) ** 2
    for _ in range(size // 4):  # tears
        pred &= ~disc_at(pts[rng.integers(len(pts))], rng.uniform(1.5, 4), 2)
    return pred, gt


# counts of the reference implementation before the fast paths (heap reduction, full dual
# union-find clearing; commit 2f582f3), whole volumes with their 8 octants
_MODEL_LIKE_OLD = {
    (48, 0): {0: (8, 13, 8), 1: (5, 16, 6), 2: (0, 0, 0)},
    (48, 1): {0: (8, 12, 8), 1: (6, 11, 6), 2: (0, 0, 0)},
    (56, 2): {0: (8, 9, 8), 1: (7, 16, 7), 2: (0, 0, 0)},
    (64, 3): {0: (18, 22, 18), 1: (12, 21, 12), 2: (0, 0, 0)},
    (64, 4): {0: (21, 25, 24), 1: (4, 17, 6), 2: (0, 0, 0)},
}


@pytest.mark.parametrize("size, seed", sorted(_MODEL_LIKE_OLD))
@pytest.mark.parametrize("clear_min", [20000, -1])
def test_model_like_matches_old_path(size, seed, clear_min, monkeypatch):
    """Model-like predictions (partial dim-1 matches) give the old path's counts, with and without
    the cc3d clearing of the input complexes (reference path), and so does the fast path."""
    monkeypatch.setattr(topo, "_CLEAR_MIN_CUBES", clear_min)
    pred, gt = _model_like_pair(size, seed)
    assert topo_counts(pred, gt, method="reference") == _MODEL_LIKE_OLD[(size, seed)]
    if clear_min > 0:
        assert topo_counts(pred, gt, method="fast") == _MODEL_LIKE_OLD[(size, seed)]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("method", topo.METHODS)
def test_model_like_matches_literal_procedure(seed, method, monkeypatch):
    """Tiny model-like octants against the literal implementation (clearing forced every other seed)."""
    pred, gt = _model_like_pair(12, seed)
    if seed % 2:
        monkeypatch.setattr(topo, "_CLEAR_MIN_CUBES", -1)
    assert topo_counts_octant(pred, gt, method=method) == _literal_counts(pred, gt)


# ---------------------------------------------------------------------------------------------
# The fast m1 (rank tests, BETTI.md section 11) against the reference reductions
# ---------------------------------------------------------------------------------------------


def _plates(rng, shape):
    """1-3 plates (1-3 voxels thick, random normal axis) perforated by square holes: tunnels."""
    out = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        ax = int(rng.integers(3))
        lo = int(rng.integers(0, shape[ax]))
        idx = [slice(None)] * 3
        idx[ax] = slice(lo, lo + int(rng.integers(1, 4)))
        plate = np.zeros(shape, bool)
        plate[tuple(idx)] = True
        for _ in range(int(rng.integers(1, 6))):
            c = [int(rng.integers(0, n)) for n in shape]
            r = int(rng.integers(0, 3))
            hole = [slice(max(0, c[i] - r), c[i] + r + 1) for i in range(3)]
            hole[ax] = slice(None)
            plate[tuple(hole)] = False
        out |= plate
    return out


def _blobs(rng, shape):
    noise = ndimage.uniform_filter(rng.random(shape), int(rng.integers(1, 4)))
    return noise < np.quantile(noise, rng.uniform(0.2, 0.9))


def sweep_pair(seed: int, max_side: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """A random (pred, gt) pair of 6..max_side voxels per axis (odd sizes included): blobs, noise,
    perforated plates or foreground with pockets; the other mask = flips of it, a shift, plates, independent blobs; random
    octants of either emptied or filled."""
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in rng.integers(6, max_side + 1, size=3))
    kind = rng.integers(4)
    if kind == 0:
        a = _blobs(rng, shape)
    elif kind == 1:
        a = _plates(rng, shape)
    elif kind == 2:
        a = rng.random(shape) < rng.uniform(0.1, 0.9)
    else:  # mostly foreground with background pockets: cavities (dimension 2)
        a = ~(_blobs(rng, shape) & (rng.random(shape) < rng.uniform(0.05, 0.4)))
    u = rng.random()
    if u < 0.5:
        g = a ^ (rng.random(shape) < rng.uniform(0.005, 0.15))
    elif u < 0.65:
        g = np.roll(a, int(rng.integers(1, 3)), axis=int(rng.integers(3)))
    elif u < 0.85:
        g = _plates(rng, shape) | (rng.random(shape) < rng.uniform(0, 0.05))
    else:
        g = _blobs(rng, shape)
    if rng.random() < 0.5:
        a, g = g, a
    for vol in (a, g):  # empty / full octants
        for _ in range(int(rng.integers(0, 3))):
            vol[tuple(slice(0, n // 2) if rng.random() < 0.5 else slice(n // 2, n) for n in shape)] = rng.random() < 0.5
    return np.ascontiguousarray(a), np.ascontiguousarray(g)


# KU_TOPO_SWEEP=5000 runs the large sweep (BENCHMARKS.md); CI runs the first 300 seeds
_SWEEP = int(os.environ.get("KU_TOPO_SWEEP", "300"))


def test_fast_equals_reference_on_random_volumes():
    """All nine counts of the fast path equal the reference path's on random small volumes (whole
    volumes, so 8 octants each), and enough of them have m1 > 0 for the test to mean something."""
    bad, positive = [], 0
    for seed in range(_SWEEP):
        a, g = sweep_pair(seed)
        ref = topo_counts(a, g, workers=1, method="reference")
        if topo_counts(a, g, workers=1, method="fast") != ref:
            bad.append((seed, a.shape, ref))
        positive += ref[1][0] > 0
    assert bad == []
    assert positive > _SWEEP // 4


def test_fast_path_certificate_and_timings():
    """m1 = 0 without any reduction when one of b1(X), b1(Y), b1(U) is 0; timings name the parts."""
    ring = np.zeros((3, 7, 7), bool)
    ring[1, 1:6, 1:6] = True
    ring[1, 2:5, 2:5] = False
    parts: dict[str, float] = {}
    assert topo_counts_octant(ring, ring, timings=parts) == {0: (0, 0, 0), 1: (1, 1, 1), 2: (0, 0, 0)}
    assert set(parts) == {"closed forms", "dim 0", "dim 2", "dim 1"}
    plate = ring.copy()
    plate[1, 2:5, 2:5] = True  # b1 = 0: certificate
    assert topo_counts_octant(ring, plate)[1] == (0, 1, 0)
    with pytest.raises(ValueError, match="method"):
        topo_counts(ring, ring, method="official")


@pytest.mark.parametrize("seed", range(3))
def test_octant_cache_reuses_only_unchanged_octants_and_changes_nothing(seed):
    """Counts with the cache equal counts without it; a change inside one octant recomputes that octant only."""
    from kaggle_utils.metrics import score_volume
    from kaggle_utils.metrics.topo import OctantCache

    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.standard_normal((34, 30, 28)), 2) > 0.1
    pred = ndimage.binary_dilation(gt) & (rng.random(gt.shape) > 0.02)
    cache = OctantCache()
    assert topo_counts(pred, gt, cache=cache) == topo_counts(pred, gt)
    assert (cache.hits, cache.misses, len(cache.entries)) == (0, 8, 8)
    assert topo_counts(pred, gt, cache=cache) == topo_counts(pred, gt)
    assert (cache.hits, cache.misses) == (8, 8)
    changed = pred.copy()
    changed[2:6, 3:7, 20:24] = ~changed[2:6, 3:7, 20:24]  # z < 17, y < 15, x >= 14: one octant
    assert topo_counts(changed, gt, cache=cache) == topo_counts(changed, gt)
    assert (cache.hits, cache.misses) == (15, 9)
    # the key is the content of both masks: the same prediction against another GT is not a hit
    other_gt = gt.copy()
    other_gt[30:, 25:, 0:5] = True
    assert topo_counts(pred, other_gt, cache=cache) == topo_counts(pred, other_gt)
    assert cache.misses == 10
    label = gt.astype(np.uint8)
    label[:, :, :2] = 2
    plain, cached = score_volume(pred, label), score_volume(pred, label, topo_cache=cache)
    assert cached.topo_counts == plain.topo_counts and cached.score == plain.score


@pytest.mark.parametrize("seed", range(6))
def test_score_bound_is_an_upper_bound_with_exact_sd_voi_and_reuse_changes_nothing(seed):
    """score_bound >= score_volume on model-like pairs; SD/VOI identical; exact when the cache knows every octant."""
    from kaggle_utils.metrics import score_bound, score_volume
    from kaggle_utils.metrics.topo import OctantCache, topo_bound_octant

    rng = np.random.default_rng(seed)
    gt = ndimage.gaussian_filter(rng.standard_normal((36, 32, 30)), 2) > 0.2
    pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(0, 2))) ^ (rng.random(gt.shape) > 0.97)
    label = gt.astype(np.uint8)
    label[:3] = 2
    exact = score_volume(pred, label)
    b = score_bound(pred, label)
    assert b.upper >= exact.score - 1e-12 and b.topo_upper >= exact.topo_score - 1e-12
    assert (b.surface_dice, b.voi_score, b.voi_split, b.voi_merge) == (
        exact.surface_dice, exact.voi_score, exact.voi_split, exact.voi_merge)
    assert score_volume(pred, label, reuse=b) == exact
    p, g = pred & (label != 2), label == 1
    for sl in topo.octant_slices(p.shape):  # per octant: p, g and m0 exact, m1, m2 bounded
        got, ref = topo_bound_octant(p[sl], g[sl]), topo_counts_octant(p[sl], g[sl])
        assert got[0] == ref[0] and all(got[k][1:] == ref[k][1:] and got[k][0] >= ref[k][0] for k in (1, 2))
    cache = OctantCache()
    score_volume(pred, label, topo_cache=cache)
    full = score_bound(pred, label, topo_cache=cache)
    assert full.exact_octants == 8 and full.upper == exact.score
