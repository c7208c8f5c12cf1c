"""TopoScore: exact Betti-matching counts of the official Vesuvius scorer, for binary volumes.

The official scorer inverts both masks (foreground -> 0, background -> 1), cuts the volume into a
2x2x2 grid of octants and, per octant, computes the induced matching of persistence barcodes
(Stucki et al., ICML 2023) of the V-construction cubical complex of prediction, ground truth and
their comparison image ``min(pred, gt)``. Per homology dimension k it reports m_k (matched pairs),
p_k (prediction pairs) and g_k (ground-truth pairs); TopoScore is a weighted mean of per-dimension F1.

This module reproduces those counts exactly for binary input (same complex, filtration order
"value, then cell id", union-find passes and column reductions as Betti-Matching-3D), but faster:

* p_k and g_k come from closed forms: p0 = #6-connected foreground components - 1,
  p2 = #26-connected background components not touching the octant border (cavities),
  p1 = beta0 + beta2 - chi of the foreground cubical complex.
* A dimension's matching is computed only when prediction, ground truth and comparison image all
  have pairs in it (otherwise m_k = 0).
* m0: one union-find pass (value-1 comparison edges in id order; a union of two sets that both hold
  prediction and GT foreground is a match). m2: dual union-find over cubes per image, with the
  comparison values mirrored to key the input pairs.
* m1: left-to-right Z/2 reductions of the 2-cell/edge boundary matrix with the dual union-find's
  clearing and the emergent-pair shortcut (reduced columns cached as sorted key arrays and added
  by a sorted merge). The input births are found on the foreground complex alone (positive edges
  not killed by a foreground 2-cell), whose clearing comes from a cc3d labelling of the background
  (:func:`_k0_clearing`); the comparison reduction stops once all its pairs are found, and the two
  image reductions (comparison columns, rows ordered by the input image) stop at the last pair column.

Cell conventions (array axes 0, 1, 2 of one octant, shape (X, Y, Z) in the text below):
vertex ``v = (x*Y + y)*Z + z``; edge ``e = 3*v + t`` (from v along axis t); 2-cell ``f = 3*v + t``
with normal axis t (spanning the two other axes, corner v); cube id ``(x*(Y-1)+y)*(Z-1)+z``.
Every filtration order is "value ascending, then id ascending".
"""
from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Iterable, Sequence

import cc3d
import numpy as np
from numba import njit

__all__ = [
    "OctantCache",
    "octant_slices",
    "topo_counts",
    "topo_counts_bound",
    "topo_counts_octant",
    "topo_bound_octant",
    "topo_f1_from_counts",
    "topo_score_from_counts",
    "topo_score",
    "closed_form_counts",
    "gt_closed_forms",
    "METHODS",
]

Counts = dict[int, tuple[int, int, int]]
DEFAULT_WEIGHTS = (0.34, 0.33, 0.33)
# "fast": m1 by rank tests (BETTI.md section 11); "reference": the official code's five reductions
METHODS = ("fast", "reference")
# foreground complexes with more solid cubes than this get dim-2 clearing before their reduction
_CLEAR_MIN_CUBES = 20000


# ----------------------------------------------------------------------------------------------
# Octants
# ----------------------------------------------------------------------------------------------


def _axis_cuts(n: int, parts: int = 2) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``min(parts, n)`` chunks; the first ``n % parts`` chunks get one more."""
    parts = min(parts, n)
    if parts <= 0:
        return []
    base, extra = divmod(n, parts)
    cuts, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        cuts.append((start, stop))
        start = stop
    return cuts


def octant_slices(shape: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """Slices of the official scorer's 2x2x2 octant grid, z-major order.

    Args:
        shape: volume shape ``(Z, Y, X)``.

    Returns:
        Up to 8 ``(slice_z, slice_y, slice_x)``; an axis of length 1 is not split, for odd
        lengths the first half gets the extra voxel.
    """
    if len(shape) != 3:
        raise ValueError(f"octant_slices: expected a 3D shape, got {tuple(shape)}")
    cz, cy, cx = (_axis_cuts(int(n)) for n in shape)
    return [
        (slice(*z), slice(*y), slice(*x))
        for z in cz
        for y in cy
        for x in cx
    ]


# ----------------------------------------------------------------------------------------------
# Closed forms (p_k, g_k)
# ----------------------------------------------------------------------------------------------


def _n_components6(fg: np.ndarray) -> int:
    if not fg.any():
        return 0
    return int(cc3d.connected_components(fg, connectivity=6, return_N=True)[1])


def _cavities(fg: np.ndarray) -> tuple[int, np.ndarray | None]:
    """Number of 26-connected background components that do not touch the border (cavities) and
    their voxels (``bool``, same shape as ``fg``; None when there are none)."""
    bg = ~fg
    if not bg.any() or min(bg.shape) < 3:
        return 0, None
    labels, n = cc3d.connected_components(bg, connectivity=26, return_N=True)
    if n == 0:
        return 0, None
    border = np.concatenate(
        [
            labels[0].ravel(), labels[-1].ravel(),
            labels[:, 0].ravel(), labels[:, -1].ravel(),
            labels[:, :, 0].ravel(), labels[:, :, -1].ravel(),
        ]
    )
    touching = np.unique(border)
    n_cav = int(n - np.count_nonzero(touching))
    if n_cav == 0:
        return 0, None
    inside = np.ones(n + 1, dtype=bool)
    inside[touching] = False
    inside[0] = False
    return n_cav, inside[labels]


def _euler(fg: np.ndarray) -> tuple[int, int, int]:
    """Euler characteristic of the foreground cubical complex (V-construction), its cube count and
    its number of edges minus vertices."""
    v = int(np.count_nonzero(fg))
    e_fg = [fg[1:] & fg[:-1], fg[:, 1:] & fg[:, :-1], fg[:, :, 1:] & fg[:, :, :-1]]
    e = sum(int(np.count_nonzero(x)) for x in e_fg)
    sq01 = e_fg[0][:, 1:] & e_fg[0][:, :-1]
    f = (
        int(np.count_nonzero(sq01))  # axes 0,1
        + int(np.count_nonzero(e_fg[0][:, :, 1:] & e_fg[0][:, :, :-1]))  # axes 0,2
        + int(np.count_nonzero(e_fg[1][:, :, 1:] & e_fg[1][:, :, :-1]))  # axes 1,2
    )
    c = int(np.count_nonzero(sq01[:, :, 1:] & sq01[:, :, :-1]))
    return v - e + f - c, c, e - v


def closed_form_counts(fg: np.ndarray) -> tuple[int, int, int]:
    """Number of finite persistence pairs per dimension of one binary octant.

    Args:
        fg: ``bool (X, Y, Z)`` foreground of one octant.

    Returns:
        ``(n0, n1, n2)``: 6-connected components minus one, beta1, cavities.
    """
    return _closed_form(np.ascontiguousarray(fg, dtype=bool))[:3]


def _closed_form(fg: np.ndarray) -> tuple:
    """``(n0, n1, n2, number of foreground cubes, dim Z1, cavity voxels)`` of a contiguous bool
    octant; ``dim Z1`` is the dimension of the foreground's 1-cycle space, #edges - #vertices +
    beta0; the cavity voxels as :func:`_cavities` (None without cavities)."""
    b0 = _n_components6(fg)
    if b0 == 0:
        return 0, 0, 0, 0, 0, None
    b2, cavity = _cavities(fg)
    chi, cubes, e_minus_v = _euler(fg)
    return b0 - 1, b0 + b2 - chi, b2, cubes, e_minus_v + b0, cavity


# ----------------------------------------------------------------------------------------------
# Shared kernel helpers: modes, growth, union-find, cell geometry
# ----------------------------------------------------------------------------------------------


class Dim2Mode(IntEnum):
    """What one dual union-find pass (:func:`_dim2_pass`) computes besides the clearing."""

    INPUT = 0  # input image: key the comparison-younger cube of every pair; return the pair count
    COMPARE = 1  # comparison image: return the pairs whose younger cube is keyed in both inputs
    CLEAR = 2  # clearing only (mark the 2-cells that cause a union); return 0


@njit(cache=True, nogil=True, inline="always")
def _ensure(arr, need):
    """``arr`` if it holds ``need`` items, else a copy grown to ``max(2 * len, need)`` (same dtype)."""
    if need <= arr.shape[0]:
        return arr
    out = np.empty(max(2 * arr.shape[0], need), dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


@njit(cache=True, nogil=True)
def _uf_find(parent, i):
    """Root of ``i`` in the forest ``parent`` (int32 (N,)), with path halving."""
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


@njit(cache=True, nogil=True)
def _union_size(parent, size, a, b):
    """Link two distinct roots, the smaller set under the larger (ties: ``b`` under ``a``); new root."""
    if size[a] < size[b]:
        a, b = b, a
    parent[b] = a
    size[a] += size[b]
    return a


@njit(cache=True, nogil=True)
def _union_rank(parent, rank, a, b):
    """Link two distinct roots by rank (ties: ``b`` under ``a``); returns the new root."""
    if rank[a] < rank[b]:
        parent[a] = b
        return b
    parent[b] = a
    if rank[a] == rank[b]:
        rank[a] += 1
    return a


@njit(cache=True, nogil=True, inline="always")
def _coords(v, Y, Z):
    """``(x, y, z)`` of vertex ``v = (x*Y + y)*Z + z``."""
    return v // (Y * Z), (v // Z) % Y, v % Z


@njit(cache=True, nogil=True, inline="always")
def _axis_stride(t, Y, Z):
    """Vertex stride along array axis ``t``."""
    if t == 0:
        return Y * Z
    if t == 1:
        return Z
    return 1


@njit(cache=True, nogil=True, inline="always")
def _edge_exists(x, y, z, t, X, Y, Z):
    """Whether edge ``(x, y, z, t)`` (from the vertex along axis t) ends inside the grid."""
    if t == 0:
        return x + 1 < X
    if t == 1:
        return y + 1 < Y
    return z + 1 < Z


@njit(cache=True, nogil=True, inline="always")
def _face_axes(t, Y, Z):
    """``(a, b, sa, sb)``: the axes a < b spanned by a 2-cell of normal axis t, their strides (sa > sb)."""
    if t == 0:
        return 1, 2, Z, 1
    if t == 1:
        return 0, 2, Y * Z, 1
    return 0, 1, Y * Z, Z


@njit(cache=True, nogil=True, inline="always")
def _face_exists(x, y, z, t, X, Y, Z):
    """Whether 2-cell ``(x, y, z, t)`` has all four corners inside the ``(X, Y, Z)`` grid."""
    if t == 0:
        return y + 1 < Y and z + 1 < Z
    if t == 1:
        return x + 1 < X and z + 1 < Z
    return x + 1 < X and y + 1 < Y


@njit(cache=True, nogil=True, inline="always")
def _face_value(bg, f, Y, Z):
    """Value of 2-cell ``f = 3*v + t`` in a binary (inverted) image: the max of its 4 corners."""
    v = f // 3
    _, _, sa, sb = _face_axes(f % 3, Y, Z)
    return bg[v] | bg[v + sa] | bg[v + sb] | bg[v + sa + sb]


@njit(cache=True, nogil=True, inline="always")
def _edge_value(bg, e, Y, Z):
    """Value of edge ``e = 3*w + axis`` in a binary (inverted) image: the max of its 2 ends."""
    w = e // 3
    return bg[w] | bg[w + _axis_stride(e % 3, Y, Z)]


@njit(cache=True, nogil=True, inline="always")
def _face_boundary(f, bg, Y, Z):
    """The 4 boundary edges of 2-cell ``f`` in ascending id and their values in ``bg``.

    Returns ``(e0, e1, e2, e3, w0, w1, w2, w3)``: ``e0 = v->v+sa``, ``e1 = v->v+sb``,
    ``e2 = v+sb->v+sa+sb``, ``e3 = v+sa->v+sa+sb`` (ids ascend since sa > sb).
    """
    v = f // 3
    a, b, sa, sb = _face_axes(f % 3, Y, Z)
    va = v + sa
    vb = v + sb
    vab = va + sb
    return (3 * v + a, 3 * v + b, 3 * vb + a, 3 * va + b,
            bg[v] | bg[va], bg[v] | bg[vb], bg[vb] | bg[vab], bg[va] | bg[vab])


@njit(cache=True, nogil=True, inline="always")
def _dual_pair(x, y, z, t, X, Y, Z, nc):
    """The two cubes on either side of 2-cell ``(x, y, z, t)`` along its normal (``nc`` = infinity)."""
    c = (x * (Y - 1) + y) * (Z - 1) + z
    if t == 0:
        return (c - (Y - 1) * (Z - 1) if x >= 1 else nc), (c if x < X - 1 else nc)
    if t == 1:
        return (c - (Z - 1) if y >= 1 else nc), (c if y < Y - 1 else nc)
    return (c - 1 if z >= 1 else nc), (c if z < Z - 1 else nc)


@njit(cache=True, nogil=True, inline="always")
def _face_dual(x, y, z, t, X, Y, Z, c, nc):
    """Everything the dual sweep needs of 2-cell ``(x, y, z, t)`` in one branch on t: whether it
    exists, its corner strides ``sa, sb`` and its two dual cubes (``c`` = cube id at (x, y, z)).
    Same as :func:`_face_exists`, :func:`_face_axes` and :func:`_dual_pair` together."""
    if t == 0:
        return (y + 1 < Y and z + 1 < Z), Z, 1, (c - (Y - 1) * (Z - 1) if x >= 1 else nc), (
            c if x < X - 1 else nc)
    if t == 1:
        return (x + 1 < X and z + 1 < Z), Y * Z, 1, (c - (Z - 1) if y >= 1 else nc), (
            c if y < Y - 1 else nc)
    return (x + 1 < X and y + 1 < Y), Y * Z, Z, (c - 1 if z >= 1 else nc), (c if z < Z - 1 else nc)


@njit(cache=True, nogil=True)
def _dual_neighbours(f, X, Y, Z, nc):
    """The two cubes on either side of 2-cell id ``f`` along its normal axis (``nc`` = infinity)."""
    x, y, z = _coords(f // 3, Y, Z)
    return _dual_pair(x, y, z, f % 3, X, Y, Z, nc)


# ----------------------------------------------------------------------------------------------
# Dimension 0: matches by union-find over vertices
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _dim0_matches(flags, X, Y, Z):
    """m0 for one octant.

    ``flags`` uint8 (N,) per vertex: bit0 = pred foreground, bit1 = GT foreground. Value-0 comparison
    edges (both ends in pred|GT foreground) are merged first; then value-1 edges in ascending id;
    a union of two sets that both contain pred and GT foreground is a match.
    """
    n = X * Y * Z
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    fl = flags.copy()
    m = 0
    for phase in range(2):
        for v in range(n):
            if phase == 0 and flags[v] == 0:
                continue
            x, y, z = _coords(v, Y, Z)
            for t in range(3):
                if not _edge_exists(x, y, z, t, X, Y, Z):
                    continue
                w = v + _axis_stride(t, Y, Z)
                value0 = flags[v] != 0 and flags[w] != 0
                if value0 != (phase == 0):
                    continue
                a = _uf_find(parent, v)
                b = _uf_find(parent, w)
                if a == b:
                    continue
                if phase == 1 and fl[a] == 3 and fl[b] == 3:
                    m += 1
                r = _union_size(parent, size, a, b)
                fl[r] |= fl[a + b - r]
    return m


@njit(cache=True, nogil=True)
def _dim0_matches_fast(flags, X, Y, Z):
    """:func:`_dim0_matches` with the vertex coordinates from nested loops instead of divisions and
    the value-0 edges (phase 0) done in the same sweep order; same count."""
    n = X * Y * Z
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    fl = flags.copy()
    strides = (Y * Z, Z, 1)
    m = 0
    for phase in range(2):
        v = 0
        for x in range(X):
            for y in range(Y):
                for z in range(Z):
                    fv = flags[v] != 0
                    if phase == 1 or fv:
                        for t in range(3):
                            if (t == 0 and x + 1 >= X) or (t == 1 and y + 1 >= Y) or (t == 2 and z + 1 >= Z):
                                continue
                            w = v + strides[t]
                            if (fv and flags[w] != 0) != (phase == 0):
                                continue
                            a = _uf_find(parent, v)
                            b = _uf_find(parent, w)
                            if a == b:
                                continue
                            if phase == 1 and fl[a] == 3 and fl[b] == 3:
                                m += 1
                            r = _union_size(parent, size, a, b)
                            fl[r] |= fl[a + b - r]
                    v += 1
    return m


# ----------------------------------------------------------------------------------------------
# Dimension 2: dual union-find over cubes (+ infinity node), 2-cells in reverse filtration order
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _cube_values(bg, X, Y, Z):
    """uint8 value per cube (1 if any corner is background) plus a trailing 2 for the infinity node."""
    nc = (X - 1) * (Y - 1) * (Z - 1)
    out = np.empty(nc + 1, dtype=np.uint8)
    i = 0
    for x in range(X - 1):
        for y in range(Y - 1):
            for z in range(Z - 1):
                v = (x * Y + y) * Z + z
                val = 0
                for dx in range(2):
                    for dy in range(2):
                        for dz in range(2):
                            if bg[v + dx * Y * Z + dy * Z + dz]:
                                val = 1
                out[i] = val
                i += 1
    out[nc] = 2
    return out


@njit(cache=True, nogil=True)
def _dim2_value1_sweep(bg, X, Y, Z, cleared):
    """Unions of the value-1 2-cells in descending id over the cubes + infinity (``nc``).

    The value-1 2-cells come last in the filtration, so in reverse order they are met first.
    Every 2-cell that causes a union is marked in ``cleared``. Returns the union-find
    ``(parent int32, rank uint8)`` (allocated here, so that the compiler knows they alias nothing)
    and the value-0 2-cell ids in descending order.
    """
    nc = (X - 1) * (Y - 1) * (Z - 1)
    parent = np.arange(nc + 1, dtype=np.int32)
    rank = np.zeros(nc + 1, dtype=np.uint8)
    zeros = np.empty(1024, dtype=np.int64)
    nz = 0
    for x in range(X - 1, -1, -1):
        for y in range(Y - 1, -1, -1):
            for z in range(Z - 1, -1, -1):
                v = (x * Y + y) * Z + z
                c = (x * (Y - 1) + y) * (Z - 1) + z
                for t in range(2, -1, -1):
                    ok, sa, sb, c1, c2 = _face_dual(x, y, z, t, X, Y, Z, c, nc)
                    if not ok:
                        continue
                    if bg[v] | bg[v + sa] | bg[v + sb] | bg[v + sa + sb]:
                        a = _uf_find(parent, c1)
                        b = _uf_find(parent, c2)
                        if a != b:
                            cleared[3 * v + t] = 1
                            _union_rank(parent, rank, a, b)
                    else:
                        zeros = _ensure(zeros, nz + 1)
                        zeros[nz] = 3 * v + t
                        nz += 1
    return parent, rank, zeros[:nz]


@njit(cache=True, nogil=True)
def _dim2_pass(bg, cube_k, cube_c, X, Y, Z, mode, key_a, key_g, key_out, cleared):
    """Dual union-find of one image over cubes + infinity, 2-cells in reverse filtration order.

    ``mode`` (a :class:`Dim2Mode`): INPUT (bg, cube_k from that image, cube_c from the comparison
    image) marks ``key_out[y_C] = 1`` for every pair and returns the number of pairs; COMPARE
    (comparison image, cube_k == cube_c) returns the number of comparison pairs whose younger
    cube is keyed in both ``key_a`` and ``key_g``; CLEAR only clears (returns 0).
    Every 2-cell that causes a union is marked in ``cleared`` (uint8 over face ids).
    The set maxima (value, id) under both images are only needed at value-0 2-cells (no pair can
    arise at a value-1 2-cell), so they are folded into the roots after the value-1 sweep.
    """
    nc = (X - 1) * (Y - 1) * (Z - 1)
    parent, rank, zeros = _dim2_value1_sweep(bg, X, Y, Z, cleared)
    M = np.int64(nc + 1)
    maxk = np.empty(nc + 1 if mode != Dim2Mode.CLEAR else 0, dtype=np.int64)
    maxc = np.empty_like(maxk)
    if mode != Dim2Mode.CLEAR:
        for c in range(nc + 1):
            maxk[c] = cube_k[c] * M + c
            maxc[c] = cube_c[c] * M + c
        for c in range(nc + 1):
            r = _uf_find(parent, c)
            if r != c:
                maxk[r] = max(maxk[r], maxk[c])
                maxc[r] = max(maxc[r], maxc[c])
    count = 0
    for i in range(zeros.shape[0]):
        f = zeros[i]
        c1, c2 = _dual_neighbours(f, X, Y, Z, nc)
        a = _uf_find(parent, c1)
        b = _uf_find(parent, c2)
        if a == b:
            continue
        cleared[f] = 1
        r = _union_rank(parent, rank, a, b)
        if mode == Dim2Mode.CLEAR:
            continue
        yk = min(maxk[a], maxk[b])
        yc = min(maxc[a], maxc[b])
        maxk[r] = max(maxk[a], maxk[b])
        maxc[r] = max(maxc[a], maxc[b])
        if yk // M != 0:  # both sets reach a value-1 cube (or infinity): a finite pair
            ycube = yc % M
            if mode == Dim2Mode.INPUT:
                key_out[ycube] = 1
                count += 1
            elif key_a[ycube] and key_g[ycube]:
                count += 1
    return count


def _k0_clearing(fg: np.ndarray, cleared: np.ndarray) -> None:
    """Mark in ``cleared`` the value-0 2-cells that the dual union-find (:func:`_dim2_pass`) clears.

    Only the value-0 2-cells are columns of an input image's reduction, and which of them cause a
    union depends only on the partition of the cubes after the value-1 sweep: every cube around a
    background vertex is joined through the value-1 2-cells around it, so the sets are the
    26-connected background components (those touching the border joined with the outside node),
    plus one singleton per solid cube. That partition comes from ``cc3d`` here, and only the
    value-0 2-cells go through the union-find (:func:`_k0_clear_faces`).

    Args:
        fg: ``bool (X, Y, Z)`` contiguous foreground of one image.
        cleared: ``uint8 (3 * X * Y * Z,)`` per 2-cell id, updated in place.
    """
    labels, n = cc3d.connected_components(~fg, connectivity=26, return_N=True)
    outside = np.zeros(n + 1, dtype=np.uint8)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        outside[face.ravel()] = 1
    X, Y, Z = fg.shape
    bg = (~fg).astype(np.uint8).ravel()
    _k0_clear_faces(bg, labels.ravel().astype(np.int64, copy=False), outside, n, X, Y, Z, cleared)


@njit(cache=True, nogil=True)
def _k0_clear_faces(bg, labels, outside, n_labels, X, Y, Z, cleared):
    """Dual union-find over the value-0 2-cells (descending id) on the partition of
    :func:`_k0_clearing`: nodes are the cubes (solid ones used), the outside node ``nc`` and
    ``nc + 1 + L`` for background component ``L``; a 2-cell joining two sets is marked cleared."""
    nc = (X - 1) * (Y - 1) * (Z - 1)
    parent = np.arange(nc + 2 + n_labels, dtype=np.int32)
    rank = np.zeros(nc + 2 + n_labels, dtype=np.uint8)
    YZ = Y * Z
    for v in range(X * Y * Z - 1, -1, -1):
        if bg[v]:
            continue
        x, y, z = _coords(v, Y, Z)
        for t in range(2, -1, -1):
            if not _face_exists(x, y, z, t, X, Y, Z):
                continue
            f = 3 * v + t
            if _face_value(bg, f, Y, Z):
                continue
            c1, c2 = _dual_pair(x, y, z, t, X, Y, Z, nc)
            st = _axis_stride(t, Y, Z)
            a = _uf_find(parent, _cube_node(bg, labels, outside, c1, v - st, nc, YZ, Z))
            b = _uf_find(parent, _cube_node(bg, labels, outside, c2, v, nc, YZ, Z))
            if a != b:
                cleared[f] = 1
                _union_rank(parent, rank, a, b)


@njit(cache=True, nogil=True, inline="always")
def _cube_node(bg, labels, outside, c, u, nc, YZ, Z):
    """Union-find node of cube ``c`` (lowest corner vertex ``u``; ``c == nc``: the outside)."""
    if c == nc:
        return nc
    for dx in range(2):
        for dy in range(2):
            for dz in range(2):
                w = u + dx * YZ + dy * Z + dz
                if bg[w]:
                    lab = labels[w]
                    return nc if outside[lab] else nc + 1 + lab
    return c


# ----------------------------------------------------------------------------------------------
# Dimension 2 without cube values (fast path): the partition after the value-1 sweep from cc3d
# (input images) or from the sweep itself (comparison image), set maxima from the voxels
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _input_keys(bg, bg_c, labels, outside, n_labels, X, Y, Z):
    """Dimension-2 keys of one input image: uint8 over cubes + infinity, 1 at the comparison-younger
    cube of every pair (what ``_dim2_pass`` in INPUT mode writes to ``key_out``), and the pair count.

    The sets after the value-1 sweep are the 26-connected background components (those touching the
    border joined with the outside), one singleton per solid cube (:func:`_k0_clearing`). A set's
    maximum (value, id) under the image is (1, largest cube id around one of its background voxels),
    under the comparison image (1, the same over its comparison-background voxels) if it has any,
    else (0, largest cube id around its voxels): the cubes with a background corner v are the cubes
    around v, the largest of them the one at v's coordinates clipped to the cube grid. Only the value-0 2-cells then go through
    the union-find, in descending id.
    """
    nc = (X - 1) * (Y - 1) * (Z - 1)
    M = np.int64(nc + 1)
    nodes = nc + 2 + n_labels
    maxk = np.arange(nodes, dtype=np.int64)  # solid cubes: (0, own id); component nodes set below
    maxk[nc] = 2 * M + nc
    maxk[nc + 1:] = -1
    maxc = maxk.copy()
    v = 0
    for x in range(X):
        for y in range(Y):
            cxy = (min(x, X - 2) * (Y - 1) + min(y, Y - 2)) * (Z - 1)
            for z in range(Z):  # v = (x*Y + y)*Z + z; its top cube is cxy + min(z, Z - 2)
                if bg[v] and not outside[labels[v]]:
                    node = nc + 1 + labels[v]
                    c = cxy + min(z, Z - 2)
                    maxk[node] = max(maxk[node], M + c)
                    maxc[node] = max(maxc[node], M + c if bg_c[v] else c)
                v += 1
    key = np.zeros(nc + 1, dtype=np.uint8)
    parent = np.arange(nodes, dtype=np.int32)
    rank = np.zeros(nodes, dtype=np.uint8)
    YZ = Y * Z
    count = 0
    for v in range(X * Y * Z - 1, -1, -1):
        if bg[v]:
            continue
        x, y, z = _coords(v, Y, Z)
        for t in range(2, -1, -1):
            if not _face_exists(x, y, z, t, X, Y, Z) or _face_value(bg, 3 * v + t, Y, Z):
                continue
            c1, c2 = _dual_pair(x, y, z, t, X, Y, Z, nc)
            a = _uf_find(parent, _cube_node(bg, labels, outside, c1, v - _axis_stride(t, Y, Z), nc, YZ, Z))
            b = _uf_find(parent, _cube_node(bg, labels, outside, c2, v, nc, YZ, Z))
            if a == b:
                continue
            yk = min(maxk[a], maxk[b])
            yc = min(maxc[a], maxc[b])
            r = _union_rank(parent, rank, a, b)
            maxk[r] = max(maxk[a], maxk[b])
            maxc[r] = max(maxc[a], maxc[b])
            if yk >= M:  # both sets reach a value-1 cube (or infinity): a finite pair
                key[yc % M] = 1
                count += 1
    return key, count


def _input_dim2_keys(fk: np.ndarray, bg: np.ndarray, bg_c: np.ndarray) -> np.ndarray:
    """:func:`_input_keys` of one input octant (``fk`` bool (X, Y, Z) foreground, ``bg``/``bg_c``
    its and the comparison image's inverted uint8 raveled masks)."""
    labels, n = cc3d.connected_components(~fk, connectivity=26, return_N=True)
    outside = np.zeros(n + 1, dtype=np.uint8)
    for face in (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        outside[face.ravel()] = 1
    X, Y, Z = fk.shape
    return _input_keys(bg, bg_c, labels.ravel().astype(np.int64, copy=False), outside, n, X, Y, Z)[0]


@njit(cache=True, nogil=True)
def _compare_pass(bg_c, X, Y, Z, key_a, key_g, count_pairs, cleared):
    """Dual union-find of the comparison image: marks every union-causing 2-cell in ``cleared`` and,
    with ``count_pairs``, returns m2 (pairs whose younger cube is keyed in ``key_a`` and ``key_g``).

    Same as ``_dim2_pass`` in COMPARE (or CLEAR) mode, but the set maxima after the value-1 sweep
    come from the background voxels (as in :func:`_input_keys`) instead of a pass over all cubes' values.
    """
    nc = (X - 1) * (Y - 1) * (Z - 1)
    parent, rank, zeros = _dim2_value1_sweep(bg_c, X, Y, Z, cleared)
    M = np.int64(nc + 1)
    maxc = np.arange(nc + 1 if count_pairs else 0, dtype=np.int64)
    if count_pairs:
        v = 0
        for x in range(X):
            for y in range(Y):
                cxy = (min(x, X - 2) * (Y - 1) + min(y, Y - 2)) * (Z - 1)
                for z in range(Z):  # v = (x*Y + y)*Z + z, top cube cxy + min(z, Z - 2)
                    if bg_c[v]:
                        c = cxy + min(z, Z - 2)
                        r = _uf_find(parent, c)
                        maxc[r] = max(maxc[r], M + c)
                    v += 1
        r = _uf_find(parent, nc)
        maxc[r] = 2 * M + nc
    count = 0
    for i in range(zeros.shape[0]):
        f = zeros[i]
        c1, c2 = _dual_neighbours(f, X, Y, Z, nc)
        a = _uf_find(parent, c1)
        b = _uf_find(parent, c2)
        if a == b:
            continue
        cleared[f] = 1
        r = _union_rank(parent, rank, a, b)
        if not count_pairs:
            continue
        y = min(maxc[a], maxc[b])
        maxc[r] = max(maxc[a], maxc[b])
        if y >= M and key_a[y % M] and key_g[y % M]:
            count += 1
    return count


# ----------------------------------------------------------------------------------------------
# Dimension 1, input images: the foreground complex
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _k0_columns(bg, cleared, X, Y, Z):
    """Value-0 face ids (all 4 corners foreground) not cleared, ascending id."""
    n = X * Y * Z
    out = np.empty(1024, dtype=np.int64)
    k = 0
    for v in range(n):
        if bg[v]:
            continue
        x, y, z = _coords(v, Y, Z)
        for t in range(3):
            if not _face_exists(x, y, z, t, X, Y, Z):
                continue
            f = 3 * v + t
            if cleared[f] or _face_value(bg, f, Y, Z):
                continue
            out = _ensure(out, k + 1)
            out[k] = f
            k += 1
    return out[:k].copy()


@njit(cache=True, nogil=True)
def _k0_births(bg, k0_lows, X, Y, Z):
    """Birth edges of the (value 0, value 1) pairs of one input image.

    They are the value-0 edges that are positive (do not merge two components when the value-0
    edges are added in ascending id) and are not the low of a value-0 column. Returns uint8 over
    edge ids and their number.
    """
    n = X * Y * Z
    is_low = np.zeros(3 * n, dtype=np.uint8)
    for i in range(k0_lows.shape[0]):
        if k0_lows[i] >= 0:
            is_low[k0_lows[i]] = 1
    out = np.zeros(3 * n, dtype=np.uint8)
    parent = np.arange(n, dtype=np.int32)
    size = np.ones(n, dtype=np.int32)
    cnt = 0
    for v in range(n):
        if bg[v]:
            continue
        x, y, z = _coords(v, Y, Z)
        for t in range(3):
            if not _edge_exists(x, y, z, t, X, Y, Z):
                continue
            w = v + _axis_stride(t, Y, Z)
            if bg[w]:
                continue
            a = _uf_find(parent, v)
            b = _uf_find(parent, w)
            if a != b:
                _union_size(parent, size, a, b)
            elif not is_low[3 * v + t]:
                out[3 * v + t] = 1
                cnt += 1
    return out, cnt


# ----------------------------------------------------------------------------------------------
# Dimension 1: column reductions of the 2-cell/edge boundary matrix
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _column_order(bg, cleared, X, Y, Z):
    """Face ids not cleared, in filtration order: value-0 faces ascending id, then value-1 faces."""
    n = X * Y * Z
    cnt = 0
    vals = np.full(3 * n, -1, dtype=np.int8)
    for v in range(n):
        x, y, z = _coords(v, Y, Z)
        for t in range(3):
            if not _face_exists(x, y, z, t, X, Y, Z):
                continue
            f = 3 * v + t
            if cleared[f]:
                continue
            vals[f] = _face_value(bg, f, Y, Z)
            cnt += 1
    out = np.empty(cnt, dtype=np.int64)
    i = 0
    for pv in range(2):
        for f in range(3 * n):
            if vals[f] == pv:
                out[i] = f
                i += 1
    return out


@njit(cache=True, nogil=True)
def _boundary_keys(f, bg, Y, Z, E, buf):
    """Row keys (value*E + edge id) of the 4 edges of face f, sorted descending into buf[0:4]."""
    e0, e1, e2, e3, w0, w1, w2, w3 = _face_boundary(f, bg, Y, Z)
    buf[0] = w0 * E + e0
    buf[1] = w1 * E + e1
    buf[2] = w2 * E + e2
    buf[3] = w3 * E + e3
    # insertion sort, descending
    for i in range(1, 4):
        k = buf[i]
        j = i - 1
        while j >= 0 and buf[j] < k:
            buf[j + 1] = buf[j]
            j -= 1
        buf[j + 1] = k


@njit(cache=True, nogil=True, inline="always")
def _max_edge(f, bg, Y, Z):
    """Edge id of the largest row (value, id) in the boundary of face f, and its value.

    Same edges as :func:`_face_boundary`, tested from the largest id down with an early exit
    (this runs once per column of every reduction).
    """
    v = f // 3
    a, b, sa, sb = _face_axes(f % 3, Y, Z)
    va = v + sa
    vb = v + sb
    vab = va + sb
    if bg[va] | bg[vab]:
        return 3 * va + b, 1
    if bg[vb] | bg[vab]:
        return 3 * vb + a, 1
    if bg[v] | bg[vb]:
        return 3 * v + b, 1
    if bg[v] | bg[va]:
        return 3 * v + a, 1
    return 3 * va + b, 0


@njit(cache=True, nogil=True, inline="always")
def _symdiff_desc(a, na, b, ob, nb, out):
    """Z/2 sum of two descending key lists ``a[:na]`` and ``b[ob:ob+nb]`` into ``out`` (descending,
    shared keys cancelled; capacity ``na + nb`` ensured by the caller); returns its length."""
    i = 0
    j = 0
    k = 0
    while i < na and j < nb:
        x = a[i]
        y = b[ob + j]
        if x > y:
            out[k] = x
            i += 1
            k += 1
        elif y > x:
            out[k] = y
            j += 1
            k += 1
        else:
            i += 1
            j += 1
    while i < na:
        out[k] = a[i]
        i += 1
        k += 1
    while j < nb:
        out[k] = b[ob + j]
        j += 1
        k += 1
    return k


@njit(cache=True, nogil=True)
def _reduce_column(i, e, cols, bg, Y, Z, E, owner, slot, start, length, pool, work, spare, other):
    """Reduce column ``i`` whose maximum edge ``e`` is owned by an earlier column.

    The working column is a descending key list; each step adds (sorted merge, Z/2) the cached
    reduced column of the owner of its pivot, or its raw boundary for an emergent owner, until
    the pivot is free or the column is zero. Returns ``(number of keys, work)``: the reduced
    column is ``work[:n]`` (pivot ``work[0]``); the two buffers may have been grown or swapped.
    """
    _boundary_keys(cols[i], bg, Y, Z, E, work)
    wl = 4
    while True:
        j = owner[e]
        if slot[j] < 0:
            _boundary_keys(cols[j], bg, Y, Z, E, other)
            src, off, ol = other, 0, 4
        else:
            src, off, ol = pool, start[slot[j]], length[slot[j]]
        spare = _ensure(spare, wl + ol)
        wl = _symdiff_desc(work, wl, src, off, ol, spare)
        work, spare = spare, work
        if wl == 0:
            return wl, work, spare
        e = work[0] - E if work[0] >= E else work[0]
        if owner[e] < 0:
            return wl, work, spare


@njit(cache=True, nogil=True)
def _reduce(cols, bg, X, Y, Z, stop, target=-1, stats=None):
    """Left-to-right Z/2 reduction; returns the low edge id of every column (-1: reduced to zero).

    cols: face ids in column order; rows ordered by (value in ``bg`` image, edge id). Only the first
    ``stop`` columns are reduced (later lows are -1). With ``target >= 0`` the reduction also stops
    once ``target`` columns of value 1 have reduced to a value-0 low (all finite pairs found).
    A column whose own maximum edge is free takes it at once ("emergent pair"); the others are
    reduced as sorted key lists (:func:`_reduce_column`), adding the cached reduced columns of
    earlier non-emergent columns (or the raw boundary of emergent ones, which equals their reduced
    column). ``stats`` (int64 (4,), optional) receives the number of columns
    reduced, of non-emergent ones, the cache size (keys) and the longest reduced column.
    """
    E = np.int64(3 * X * Y * Z)
    ncols = cols.shape[0]
    lows = np.full(ncols, -1, dtype=np.int32)
    owner = np.full(E, -1, dtype=np.int32)
    # reduced columns of the non-emergent columns: column i's (descending keys, cancelled pairs
    # dropped) is pool[start[slot[i]] : start[slot[i]] + length[slot[i]]]; slot[i] = -1: emergent
    slot = np.full(ncols, -1, dtype=np.int32)
    start = np.empty(256, dtype=np.int64)
    length = np.empty(256, dtype=np.int32)
    n_slots = 0
    pool = np.empty(1024, dtype=np.int64)
    pool_len = 0
    work = np.empty(1024, dtype=np.int64)
    spare = np.empty(1024, dtype=np.int64)
    other = np.empty(4, dtype=np.int64)
    found = 0
    for i in range(min(stop, ncols)):
        e, _ = _max_edge(cols[i], bg, Y, Z)
        if owner[e] < 0:  # emergent pair: the column's own maximum is still free
            owner[e] = i
            lows[i] = e
            continue
        wl, work, spare = _reduce_column(i, e, cols, bg, Y, Z, E, owner, slot, start, length, pool,
                                         work, spare, other)
        if stats is not None:
            stats[0] = i + 1
            stats[1] += 1
            stats[2] = pool_len
            stats[3] = max(stats[3], wl)
        if wl == 0:
            continue
        pivot = work[0]
        e = pivot - E if pivot >= E else pivot
        owner[e] = i
        lows[i] = e
        if target >= 0 and pivot < E:  # value-0 low; emergent columns never get one
            if _face_value(bg, cols[i], Y, Z):
                found += 1
                if found == target:
                    return lows
        pool = _ensure(pool, pool_len + wl)
        pool[pool_len:pool_len + wl] = work[:wl]
        start = _ensure(start, n_slots + 1)
        length = _ensure(length, n_slots + 1)
        slot[i] = n_slots
        start[n_slots] = pool_len
        length[n_slots] = wl
        n_slots += 1
        pool_len += wl
    return lows


@njit(cache=True, nogil=True)
def _dim1_match(cols_c, lows_c, lows_ia, lows_ig, bg_c, birth_a, birth_g, Y, Z, n):
    """Count comparison pairs (value-0 edge, value-1 face) whose image lows are both input births.

    With ``lows_ig`` of length 0, counts the pairs whose first image low alone is a birth of
    ``birth_a`` and returns one past the column index of the last such pair instead.
    """
    m = 0
    last = 0
    for i in range(cols_c.shape[0]):
        e = lows_c[i]
        if e < 0:
            continue
        if _face_value(bg_c, cols_c[i], Y, Z) == _edge_value(bg_c, e, Y, Z):
            continue
        ba = lows_ia[i]
        if ba < 0 or not birth_a[ba]:
            continue
        if lows_ig.shape[0] == 0:
            last = i + 1
            continue
        bgl = lows_ig[i]
        if bgl >= 0 and birth_g[bgl]:
            m += 1
    return last if lows_ig.shape[0] == 0 else m


@njit(cache=True, nogil=True)
def _births(cols, lows, bg, Y, Z, n):
    """Finite (value 0, value 1) pairs of a reduction: uint8 over edge ids marking their births,
    their number, and one past the column index of the last one."""
    out = np.zeros(3 * n, dtype=np.uint8)
    cnt = 0
    last = 0
    for i in range(cols.shape[0]):
        e = lows[i]
        if e < 0:
            continue
        if _face_value(bg, cols[i], Y, Z) != _edge_value(bg, e, Y, Z):
            out[e] = 1
            cnt += 1
            last = i + 1
    return out, cnt, last


# ----------------------------------------------------------------------------------------------
# Dimension 1 by rank tests (BETTI.md section 11): m1 without the input, comparison and full
# image reductions
# ----------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True, inline="always")
def _rows_outside(f, bg, Y, Z, buf):
    """Boundary edges of 2-cell ``f`` that are not foreground edges of ``bg`` (value 1 there),
    written to ``buf`` in descending id; returns how many (0 to 4)."""
    e0, e1, e2, e3, w0, w1, w2, w3 = _face_boundary(f, bg, Y, Z)
    n = 0
    if w3:
        buf[n] = e3
        n += 1
    if w2:
        buf[n] = e2
        n += 1
    if w1:
        buf[n] = e1
        n += 1
    if w0:
        buf[n] = e0
        n += 1
    return n


@njit(cache=True, nogil=True)
def _reduce_column_outside(i, e, cols, bg, Y, Z, owner, slot, start, length, pool, work, spare, other):
    """:func:`_reduce_column` for the boundary matrix with the foreground edge rows of ``bg``
    deleted (rows are edge ids): ``(number of entries left, work, spare)``, pivot ``work[0]``."""
    wl = _rows_outside(cols[i], bg, Y, Z, work)
    while True:
        j = owner[e]
        if slot[j] < 0:
            ol = _rows_outside(cols[j], bg, Y, Z, other)
            src, off = other, 0
        else:
            src, off, ol = pool, start[slot[j]], length[slot[j]]
        spare = _ensure(spare, wl + ol)
        wl = _symdiff_desc(work, wl, src, off, ol, spare)
        work, spare = spare, work
        if wl == 0:
            return wl, work, spare
        e = work[0]
        if owner[e] < 0:
            return wl, work, spare


@njit(cache=True, nogil=True)
def _dependent_outside(cols, bg, bg_c, X, Y, Z, stop, n_dep):
    """Which comparison columns are dependent on the earlier ones once the foreground edges of one
    input image are deleted from the rows, i.e. ``boundary(d) in W<d + C1(foreground)``.

    Args:
        cols: int64 (n,) comparison 2-cells not cleared by dimension 2, comparison order (value 0
            then value 1 in ``bg_c``, ascending id within each): their boundaries are independent.
        bg, bg_c: uint8 (X*Y*Z,) inverted input image and comparison image.
        stop: only the first ``stop`` columns are looked at.
        n_dep: how many of all ``cols`` are dependent, the 1-cycle rank of the input's foreground
            complex (BETTI.md section 11); the scan ends once that many were found.

    Returns:
        ``(dep, last)``: uint8 (n,), 1 at the dependent columns of comparison value 1, and one past
        the index of the last of them (0: none).
    """
    ncols = cols.shape[0]
    dep = np.zeros(ncols, dtype=np.uint8)
    owner = np.full(3 * X * Y * Z, -1, dtype=np.int32)
    slot = np.full(ncols, -1, dtype=np.int32)
    start = np.empty(256, dtype=np.int64)
    length = np.empty(256, dtype=np.int32)
    pool = np.empty(1024, dtype=np.int64)
    work = np.empty(1024, dtype=np.int64)
    spare = np.empty(1024, dtype=np.int64)
    other = np.empty(4, dtype=np.int64)
    n_slots = pool_len = found = last = 0
    for i in range(min(stop, ncols)):
        if found == n_dep:
            break
        e, val = _max_edge(cols[i], bg, Y, Z)
        if val == 0:  # a foreground square of the input: zero once its rows are deleted
            found += 1
            continue
        if owner[e] < 0:  # its largest remaining row is free: independent, the column stays raw
            owner[e] = i
            continue
        wl, work, spare = _reduce_column_outside(i, e, cols, bg, Y, Z, owner, slot, start, length, pool,
                                                 work, spare, other)
        if wl == 0:
            found += 1
            if _face_value(bg_c, cols[i], Y, Z):
                dep[i] = 1
                last = i + 1
            continue
        owner[work[0]] = i
        pool = _ensure(pool, pool_len + wl)
        pool[pool_len:pool_len + wl] = work[:wl]
        start = _ensure(start, n_slots + 1)
        length = _ensure(length, n_slots + 1)
        slot[i] = n_slots
        start[n_slots] = pool_len
        length[n_slots] = wl
        n_slots += 1
        pool_len += wl
    return dep, last


@njit(cache=True, nogil=True)
def _columns_by_value(bg, cleared, X, Y, Z):
    """:func:`_column_order` as int32, in one pass without divisions: the value-0 2-cells not
    cleared (ascending id), then the value-1 ones (ascending id)."""
    zeros = np.empty(1024, dtype=np.int32)
    ones = np.empty(3 * X * Y * Z, dtype=np.int32)
    n0 = n1 = 0
    v = 0
    for x in range(X):
        for y in range(Y):
            for z in range(Z):
                for t in range(3):
                    f = 3 * v + t
                    if cleared[f] or not _face_exists(x, y, z, t, X, Y, Z):
                        continue
                    if _face_value(bg, f, Y, Z):
                        ones[n1] = f
                        n1 += 1
                    else:
                        zeros = _ensure(zeros, n0 + 1)
                        zeros[n0] = f
                        n0 += 1
                v += 1
    out = np.empty(n0 + n1, dtype=np.int32)
    out[:n0] = zeros[:n0]
    out[n0:] = ones[:n1]
    return out


def _dim1_rank(bg_a, bg_g, bg_c, cleared_c, X, Y, Z, z1_a, z1_g) -> int:
    """m1 of one octant by the rank characterization of BETTI.md section 11.

    A comparison 2-cell d of value 1 is a match iff it is not cleared by dimension 2 (so its
    boundary is independent of the earlier ones) and its boundary is dependent on the earlier
    boundaries plus the prediction's foreground edges, and also plus the GT's. ``z1_a``, ``z1_g``:
    1-cycle ranks of the two foreground complexes (:func:`_closed_form`), which bound each scan.
    """
    cols = _columns_by_value(bg_c, cleared_c, X, Y, Z)
    dep_a, last = _dependent_outside(cols, bg_a, bg_c, X, Y, Z, cols.shape[0], z1_a)
    if last == 0:
        return 0
    dep_g, _ = _dependent_outside(cols, bg_g, bg_c, X, Y, Z, last, z1_g)
    return int(np.count_nonzero(dep_a[:last] & dep_g[:last]))


# ----------------------------------------------------------------------------------------------
# One octant
# ----------------------------------------------------------------------------------------------


class _Clock:
    """Adds the CPU seconds of the calling thread between marks to named totals (no-op without a dict)."""

    def __init__(self, out: dict[str, float] | None) -> None:
        self.out = out
        self.t = time.thread_time() if out is not None else 0.0

    def mark(self, name: str) -> None:
        """Charge the time since the last mark to ``name``."""
        if self.out is None:
            return
        now = time.thread_time()
        self.out[name] = self.out.get(name, 0.0) + now - self.t
        self.t = now


def _octant_base(pred: np.ndarray, gt: np.ndarray, clock: _Clock | None = None, gt_form: tuple | None = None,
                 method: str = "fast") -> tuple:
    """What both the exact counts and their bound start from: the contiguous ``bool`` masks of
    prediction, GT and comparison image (``pred | gt``), their closed forms and m_0.
    ``gt_form``: the GT's :func:`_closed_form`, when known (:func:`gt_closed_forms`); ``method``
    picks the m_0 kernel (:func:`_dim0_matches_fast` or the reference :func:`_dim0_matches`).

    Returns:
        ``(fa, fg, fc, pa, pg, pc, m0)``; ``p*`` as :func:`_closed_form`.
    """
    clock = clock or _Clock(None)
    fa = np.ascontiguousarray(pred, dtype=bool)
    fg_ = np.ascontiguousarray(gt, dtype=bool)
    fc = fa | fg_
    pg = _closed_form(fg_) if gt_form is None else gt_form
    pa, pc = _closed_form(fa), _closed_form(fc)
    clock.mark("closed forms")
    m0 = 0
    if pa[0] > 0 and pg[0] > 0 and pc[0] > 0:  # dimension 0: one union-find pass
        X, Y, Z = fa.shape
        flags = (fa.astype(np.uint8) | (fg_.astype(np.uint8) << 1)).ravel()
        m0 = int((_dim0_matches if method == "reference" else _dim0_matches_fast)(flags, X, Y, Z))
    clock.mark("dim 0")
    return fa, fg_, fc, pa, pg, pc, m0


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"topo_counts: unknown method {method!r}, expected one of {METHODS}")


def topo_counts_octant(pred: np.ndarray, gt: np.ndarray, method: str = "fast",
                       timings: dict[str, float] | None = None, gt_form: tuple | None = None) -> Counts:
    """Betti-matching counts of one octant (no further splitting).

    Args:
        pred, gt: ``bool (X, Y, Z)`` foreground masks of the same shape.
        method: ``"fast"`` (m_1 by the rank tests of :func:`_dim1_rank`) or ``"reference"``
            (m_1 by the five reductions of the official code, :func:`_dim1_counts`); same counts.
        timings: if given, CPU seconds of this thread are added to its keys ``"closed forms"``,
            ``"dim 0"``, ``"dim 2"`` (dual union-find passes and clearings) and ``"dim 1"``.
        gt_form: the GT's closed forms (:func:`gt_closed_forms`), computed here when None.

    Returns:
        ``{k: (m_k, p_k, g_k)}`` for k = 0, 1, 2.
    """
    _check_method(method)
    clock = _Clock(timings)
    fa, fg_, fc, pa, pg, pc, m0 = _octant_base(pred, gt, clock, gt_form, method)
    X, Y, Z = fa.shape
    m1 = m2 = 0
    need2 = pa[2] > 0 and pg[2] > 0 and pc[2] > 0
    if need2 and method == "fast":  # a match needs a voxel background in both inside cavities of both
        need2 = bool(np.any(pa[5] & pg[5] & ~fc))
    need1 = pa[1] > 0 and pg[1] > 0 and pc[1] > 0  # m1 <= min(b1(X), b1(Y), b1(U)) (BETTI.md 11)
    if need1 or need2:
        n = X * Y * Z
        bg_a = (~fa).astype(np.uint8).ravel()
        bg_g = (~fg_).astype(np.uint8).ravel()
        bg_c = (~fc).astype(np.uint8).ravel()
        cleared = {k: np.zeros(3 * n, dtype=np.uint8) for k in ("agc" if method == "reference" else "c")}
        if min(X, Y, Z) > 1 and method == "reference":
            m2 = _dim2_all(fa, fg_, bg_a, bg_g, bg_c, pa, pg, cleared, need2, True)
        elif min(X, Y, Z) > 1:
            key_a = _input_dim2_keys(fa, bg_a, bg_c) if need2 else np.zeros(0, np.uint8)
            key_g = _input_dim2_keys(fg_, bg_g, bg_c) if need2 else key_a
            m2 = int(_compare_pass(bg_c, X, Y, Z, key_a, key_g, need2, cleared["c"]))
        clock.mark("dim 2")
        if need1 and method == "reference":
            m1 = _dim1_counts(bg_a, bg_g, bg_c, cleared, X, Y, Z, pc[1])
        elif need1:
            m1 = _dim1_rank(bg_a, bg_g, bg_c, cleared["c"], X, Y, Z, pa[4], pg[4])
        clock.mark("dim 1")
    return {0: (m0, pa[0], pg[0]), 1: (m1, pa[1], pg[1]), 2: (m2, pa[2], pg[2])}


def _dim2_all(fa, fg_, bg_a, bg_g, bg_c, pa, pg, cleared, need2: bool, clear_inputs: bool) -> int:
    """Dual union-find passes of one octant (all axes > 1) as the reference path runs them: m2 (0
    unless ``need2``) and the clearings in ``cleared`` (``"c"`` always; ``"a"``/``"g"`` for the input
    reductions when ``clear_inputs``, or as a by-product of the input passes when ``need2``)."""
    X, Y, Z = fa.shape
    nc1 = (X - 1) * (Y - 1) * (Z - 1) + 1
    cube_c = _cube_values(bg_c, X, Y, Z) if need2 else np.zeros(1, np.uint8)
    key_a = np.zeros(nc1, dtype=np.uint8)
    key_g = np.zeros(nc1, dtype=np.uint8)
    for bg, fk, key, keys, solid in ((bg_a, fa, "a", key_a, pa[3]), (bg_g, fg_, "g", key_g, pg[3])):
        # input images: the dual union-find is needed for the dim-2 keys; otherwise only
        # its clearing of the foreground-complex columns, worth it with many solid cubes
        if need2:
            cube_k = _cube_values(bg, X, Y, Z)
            _dim2_pass(bg, cube_k, cube_c, X, Y, Z, Dim2Mode.INPUT, key_a, key_g, keys, cleared[key])
            del cube_k
        elif clear_inputs and solid > _CLEAR_MIN_CUBES:
            _k0_clearing(fk, cleared[key])
    mode = Dim2Mode.COMPARE if need2 else Dim2Mode.CLEAR
    return int(_dim2_pass(bg_c, cube_c, cube_c, X, Y, Z, mode, key_a, key_g, key_g, cleared["c"]))


def topo_bound_octant(pred: np.ndarray, gt: np.ndarray) -> Counts:
    """Counts of one octant with m_1 and m_2 replaced by upper bounds, without their reductions.

    p_k and g_k are exact (closed forms) and so is m_0 (one union-find pass). A matched pair is a
    prediction pair, a GT pair and a comparison-image pair at once, so m_k <= min(p_k, g_k, c_k),
    with c_k the comparison image's pair count (closed form of ``pred | gt``). TopoScore only grows
    with m_k, so :func:`topo_score_from_counts` of these counts bounds the exact TopoScore from above.
    Costs the closed forms and the dimension-0 pass: a whole ``score_bound`` of a real 320^3 pair
    took 2.0-3.6 CPU s against 13 s for ``score_volume`` (one measurement, BENCHMARKS.md).

    Returns:
        ``{k: (m_k or its upper bound, p_k, g_k)}`` for k = 0, 1, 2.
    """
    _, _, _, pa, pg, pc, m0 = _octant_base(pred, gt)
    return {0: (m0, pa[0], pg[0]), 1: (min(pa[1], pg[1], pc[1]), pa[1], pg[1]),
            2: (min(pa[2], pg[2], pc[2]), pa[2], pg[2])}


def _dim1_counts(bg_a, bg_g, bg_c, cleared, X, Y, Z, n_pairs_c) -> int:
    """m1 of one octant; ``n_pairs_c`` = beta1 of the comparison foreground (closed form)."""
    n = X * Y * Z
    cols_c = _column_order(bg_c, cleared["c"], X, Y, Z)
    lows_c = _reduce(cols_c, bg_c, X, Y, Z, cols_c.shape[0], n_pairs_c)
    _, n_comp, stop = _births(cols_c, lows_c, bg_c, Y, Z, n)
    if n_comp == 0:
        return 0
    births = []
    for bg, key in ((bg_a, "a"), (bg_g, "g")):
        cols = _k0_columns(bg, cleared[key], X, Y, Z)
        lows = _reduce(cols, bg, X, Y, Z, cols.shape[0])
        births.append(_k0_births(bg, lows, X, Y, Z)[0])
        del cols, lows
    # image reductions only up to the last comparison-pair column, the GT's only up to the last
    # one whose prediction image low is a prediction birth (no later pair can match)
    im_a = _reduce(cols_c, bg_a, X, Y, Z, stop)
    stop = _dim1_match(cols_c, lows_c, im_a, im_a[:0], bg_c, births[0], births[0], Y, Z, n)
    if stop == 0:
        return 0
    im_g = _reduce(cols_c, bg_g, X, Y, Z, stop)
    return int(_dim1_match(cols_c, lows_c, im_a, im_g, bg_c, births[0], births[1], Y, Z, n))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 3 or gt.ndim != 3:
        raise ValueError(f"topo_counts: expected 3D (Z, Y, X) arrays, got {pred.shape} and {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"topo_counts: shape mismatch, pred {pred.shape} vs gt {gt.shape}")

    def binary(x: np.ndarray) -> np.ndarray:
        if x.dtype == bool:
            return x
        fg = x != 0
        if np.issubdtype(x.dtype, np.floating):
            fg &= ~np.isnan(x)  # NaN counts as background, as in the official wrapper
        return fg

    return binary(pred), binary(gt)


@dataclass
class OctantCache:
    """Memo of per-octant counts, keyed by the content of both octants (exact, not by position).

    The counts of an octant depend on nothing but its prediction and ground-truth masks, so a
    candidate that changes a mask only in some octants (a dust or cavity size that matters in one
    corner of the volume) needs only those octants' Betti matching. The key is a 128-bit BLAKE2b
    digest of both packed masks and their shape; one entry is a few dozen bytes, so the cache of a
    whole tuning run stays small. ``hits`` / ``misses`` count octant lookups.
    """

    entries: dict[bytes, Counts] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    @staticmethod
    def key(pred: np.ndarray, gt: np.ndarray) -> bytes:
        """Digest of a ``bool (Z, Y, X)`` octant pair (views are fine: they are packed first)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(np.asarray(pred.shape, dtype=np.int64).tobytes())
        h.update(np.packbits(pred).tobytes())
        h.update(np.packbits(gt).tobytes())
        return h.digest()


def gt_closed_forms(gt: np.ndarray) -> list[tuple]:
    """Closed forms (:func:`_closed_form`) of the ground truth's octants, in :func:`octant_slices`
    order: what :func:`topo_counts` needs of the GT alone, to compute once per volume.

    Args:
        gt: binary ``(Z, Y, X)`` ground truth, as :func:`topo_counts` takes it.
    """
    fg = _check_pair(gt, gt)[1]
    return [_closed_form(np.ascontiguousarray(fg[sl])) for sl in octant_slices(fg.shape)]


def topo_counts(pred: np.ndarray, gt: np.ndarray, workers: int = 2, cache: OctantCache | None = None,
                method: str = "fast", timings: dict[str, float] | None = None,
                gt_forms: Sequence[tuple] | None = None) -> Counts:
    """Official Betti-matching counts summed over the 2x2x2 octants.

    Args:
        pred, gt: binary ``bool`` or ``uint8 {0,1}`` arrays ``(Z, Y, X)`` of the same shape
            (ignore label already removed by the caller; any nonzero, non-NaN value is foreground).
        workers: threads over octants (the numba kernels release the GIL).
        cache: reuse the counts of octants seen before (:class:`OctantCache`); only the others
            are computed. The result is the same with or without it.
        method: ``"fast"`` or ``"reference"`` (:func:`topo_counts_octant`); same counts.
        timings: if given, CPU seconds per part summed over the octants (keys as
            :func:`topo_counts_octant`).
        gt_forms: :func:`gt_closed_forms` of this ``gt`` (the caller guarantees it), so that the
            GT's closed forms are not computed again.

    Returns:
        ``{k: (m_k, p_k, g_k)}`` for k = 0, 1, 2 (ints).
    """
    _check_method(method)
    fp, fg = _check_pair(pred, gt)
    slices = octant_slices(fp.shape)
    if gt_forms is not None and len(gt_forms) != len(slices):
        raise ValueError(f"topo_counts: gt_forms has {len(gt_forms)} octants, the volume {len(slices)}")
    keys = [OctantCache.key(fp[sl], fg[sl]) for sl in slices] if cache is not None else [None] * len(slices)
    known = {i: cache.entries[k] for i, k in enumerate(keys) if cache is not None and k in cache.entries}
    todo = [i for i in range(len(slices)) if i not in known]

    parts: list[dict[str, float]] = [{} for _ in slices]

    def one(i):
        return topo_counts_octant(fp[slices[i]], fg[slices[i]], method, parts[i] if timings is not None else None,
                                  None if gt_forms is None else gt_forms[i])

    if workers > 1 and len(todo) > 1:
        # most foreground first: the costlier octants start first, so the threads finish together
        # (an octant's cost grows with its foreground)
        order = sorted(todo, key=lambda i: -(np.count_nonzero(fp[slices[i]]) + np.count_nonzero(fg[slices[i]])))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            computed = dict(zip(order, pool.map(one, order)))
    else:
        computed = {i: one(i) for i in todo}
    if timings is not None:
        for part in parts:
            for name, sec in part.items():
                timings[name] = timings.get(name, 0.0) + sec
    if cache is not None:
        cache.hits += len(known)
        cache.misses += len(todo)
        for i, res in computed.items():
            cache.entries[keys[i]] = {k: tuple(int(x) for x in res[k]) for k in range(3)}
    return _sum_counts(known[i] if i in known else computed[i] for i in range(len(slices)))


def topo_counts_bound(pred: np.ndarray, gt: np.ndarray, cache: OctantCache | None = None) -> tuple[Counts, int]:
    """Counts summed over the octants, exact where ``cache`` knows the octant and bounded elsewhere
    (:func:`topo_bound_octant`): an upper bound of TopoScore that skips the expensive reductions.

    Returns:
        ``(counts, n_exact)``: ``{k: (m_k upper bound, p_k, g_k)}`` and how many of the octants
        were exact (cache hits; the cache's ``hits`` counter is not changed).
    """
    fp, fg = _check_pair(pred, gt)
    slices = octant_slices(fp.shape)
    known = [cache.entries.get(OctantCache.key(fp[sl], fg[sl])) if cache is not None else None for sl in slices]
    counts = _sum_counts(res if res is not None else topo_bound_octant(fp[sl], fg[sl]) for res, sl in zip(known, slices))
    return counts, sum(res is not None for res in known)


def _sum_counts(results: Iterable[Counts]) -> Counts:
    """Per-octant ``{k: (m, p, g)}`` summed over the octants, as ints."""
    total = {k: [0, 0, 0] for k in range(3)}
    for res in results:
        for k in range(3):
            for i in range(3):
                total[k][i] += int(res[k][i])
    return {k: tuple(v) for k, v in total.items()}


def topo_f1_from_counts(counts: Counts) -> dict[int, float | None]:
    """Per-dimension F1: g>0 -> 2m/(p+g); g=0<p -> 0.5/(p+0.5); p+g=0 -> None (inactive)."""
    out: dict[int, float | None] = {}
    for k in sorted(counts):
        m, p, g = counts[k]
        if g > 0:
            out[k] = 2.0 * m / (p + g)
        elif p > 0:
            out[k] = 0.5 / (p + 0.5)
        else:
            out[k] = None
    return out


def topo_score_from_counts(counts: Counts, weights: Sequence[float] = DEFAULT_WEIGHTS) -> float:
    """Weighted mean of the active per-dimension F1 (weights renormalized); 1.0 if none is active."""
    f1 = topo_f1_from_counts(counts)
    num = den = 0.0
    for k, val in f1.items():
        if val is None:
            continue
        num += weights[k] * val
        den += weights[k]
    return 1.0 if den == 0 else num / den


def topo_score(pred: np.ndarray, gt: np.ndarray) -> tuple[float, Counts]:
    """TopoScore and the counts it came from. Inputs as :func:`topo_counts`."""
    counts = topo_counts(pred, gt)
    return topo_score_from_counts(counts), counts
