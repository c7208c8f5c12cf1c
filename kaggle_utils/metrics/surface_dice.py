"""Surface Dice at tolerance τ, exactly as DeepMind's ``surface_distance`` defines it.

The surface of a binary mask is described by *surfels*: every corner point of the voxel grid whose
2×2×2 neighbourhood of voxels is neither all background nor all foreground. Each surfel carries
the area of the marching-cubes surface patch inside its 2×2×2 cell (looked up from its 8-bit
neighbour code). Surface Dice is the share of surfel area, over both masks, that lies within
distance ``tau`` of the other mask's surfels::

    SD = (area_gt[d_gt→pred <= tau] + area_pred[d_pred→gt <= tau]) / (area_gt + area_pred)

Facts reproduced from ``surface_distance`` (Apache-2.0, https://github.com/deepmind/surface-distance):

- neighbour code of grid corner ``i``: voxel ``i - 1 + (a, b, c)`` for ``a, b, c ∈ {0, 1}`` sets
  bit ``7 - (4a + 2b + c)`` (so the voxel at ``i - 1`` is worth 128, the voxel at ``i`` is worth 1);
  the masks are first cropped to the bounding box of their union and zero padded by one voxel;
- per-code areas come from marching cubes on the 2×2×2 cell at level 0.5; we regenerate that
  table with scikit-image's Lorensen marching cubes (cells with more than four foreground voxels
  are triangulated on their complement), which reproduces the package's table for all 256
  codes and any spacing;
- distances are Euclidean distance transforms (with ``sampling=spacing``) of the complement of
  the other mask's surfel set, compared with ``<= tau``; we only need that comparison, so we
  dilate the surfel set by the ball of radius ``tau`` instead (same decision, much faster).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["surface_dice", "surfel_area_table", "neighbour_codes", "PreparedSurface", "prepare_surface"]


def _spacing3(spacing: float | Sequence[float]) -> tuple[float, float, float]:
    if np.isscalar(spacing):
        v = float(spacing)  # type: ignore[arg-type]
        return (v, v, v)
    s = tuple(float(v) for v in spacing)  # type: ignore[union-attr]
    if len(s) != 3 or min(s) <= 0:
        raise ValueError(f"spacing must be 3 positive numbers (z, y, x), got {spacing!r}")
    return s  # type: ignore[return-value]


@functools.lru_cache(maxsize=16)
def surfel_area_table(spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Surface area of the marching-cubes patch for every 2×2×2 neighbour code.

    Args:
        spacing: voxel size along (z, y, x).

    Returns:
        ``float64 (256,)`` read-only array; entries 0 and 255 are 0.
    """
    from skimage.measure import marching_cubes

    sp = np.asarray(spacing, dtype=np.float64)
    table = np.zeros(256, dtype=np.float64)
    for code in range(1, 255):
        cell = ((code >> (7 - np.arange(8))) & 1).reshape(2, 2, 2).astype(np.float64)
        if bin(code).count("1") > 4:  # the table triangulates the complement for such cells
            cell = 1.0 - cell
        verts, faces, _, _ = marching_cubes(cell, 0.5, method="lorensen")
        tri = verts.astype(np.float64)[faces] * sp
        cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        table[code] = 0.5 * np.linalg.norm(cross, axis=1).sum()
    table.setflags(write=False)
    return table


def neighbour_codes(mask: np.ndarray) -> np.ndarray:
    """8-bit neighbour code of every corner point of the voxel grid.

    Args:
        mask: ``bool (Z, Y, X)``.

    Returns:
        ``uint8 (Z+1, Y+1, X+1)``: entry ``i`` encodes voxels ``i-1 .. i`` along each axis
        (voxels outside the array count as background); the voxel at offset ``(a, b, c)`` from
        ``i - 1`` sets bit ``7 - (4a + 2b + c)``.
    """
    mask = np.asarray(mask)
    padded = np.pad(mask.view(np.uint8) if mask.dtype == bool else (mask != 0).view(np.uint8), 1)
    # built one axis at a time: 2 bits along x, 4 along y, 8 along z (offset 0 = the higher bit)
    cx = (padded[:, :, :-1] << 1) | padded[:, :, 1:]
    cy = (cx[:, :-1] << 2) | cx[:, 1:]
    return (cy[:-1] << 4) | cy[1:]


def _union_bbox(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    union = a | b
    out = []
    for axis in range(union.ndim):
        proj = union.any(axis=tuple(i for i in range(union.ndim) if i != axis))
        idx = np.flatnonzero(proj)
        if idx.size == 0:
            return None
        out.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)


def _ball_rows(tau: float, spacing: tuple[float, float, float]) -> list[tuple[int, int, int]]:
    """Grid offsets within distance ``tau`` as rows ``(dz, dy, rx)``: ``|dx| <= rx`` are inside.

    Distances are computed as the reference's distance transform does, in float64:
    ``sqrt((dz*sz)**2 + (dy*sy)**2 + (dx*sx)**2) <= tau``.
    """
    sz, sy, sx = spacing
    rz, ry = int(np.floor(tau / sz)), int(np.floor(tau / sy))
    rows = []
    for dz in range(-rz, rz + 1):
        for dy in range(-ry, ry + 1):
            if np.sqrt((dz * sz) ** 2 + (dy * sy) ** 2) > tau:
                continue
            rx = 0
            while np.sqrt((dz * sz) ** 2 + (dy * sy) ** 2 + ((rx + 1) * sx) ** 2) <= tau:
                rx += 1
            rows.append((dz, dy, rx))
    return rows


def _within_tolerance(borders: np.ndarray, tau: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """``bool`` map of grid points whose distance to the nearest ``borders`` point is ``<= tau``.

    Equal to ``distance_transform_edt(~borders, sampling=spacing) <= tau`` (what the reference
    computes) but done as a dilation of ``borders`` by the ball of radius ``tau``: dilate along x
    once per row half-width, then OR each (dz, dy) row of the ball in. For tau = 2 on a unit grid
    that is 13 rows and about 20 boolean passes, far cheaper than a full distance transform.
    Very large balls fall back to :func:`scipy.ndimage.distance_transform_edt`.
    """
    rows = _ball_rows(float(tau), spacing)
    if len(rows) > 400:
        from scipy.ndimage import distance_transform_edt

        return distance_transform_edt(~borders, sampling=spacing) <= tau
    along_x = [borders]
    for k in range(1, max(r for _, _, r in rows) + 1):
        cur = along_x[-1].copy()
        cur[..., k:] |= borders[..., :-k]
        cur[..., :-k] |= borders[..., k:]
        along_x.append(cur)
    out = np.zeros_like(borders)
    nz, ny = borders.shape[:2]
    for dz, dy, rx in rows:
        if abs(dz) >= nz or abs(dy) >= ny:
            continue
        out[max(dz, 0):nz + min(dz, 0), max(dy, 0):ny + min(dy, 0)] |= \
            along_x[rx][max(-dz, 0):nz - max(dz, 0), max(-dy, 0):ny - max(dy, 0)]
    return out


@dataclass(frozen=True)
class PreparedSurface:
    """One mask's side of :func:`surface_dice`, on the uncropped corner grid ``(Z+1, Y+1, X+1)``.

    Cropping to the union's bounding box (what :func:`surface_dice` does) changes none of these
    values: outside the box every neighbour code is 0, and the border points keep their relative
    (C) order, so the area arrays and their sums are identical. A ground truth prepared once
    therefore serves every prediction scored against it.

    Attributes:
        border: ``bool`` grid points whose code is neither 0 nor 255 (surfels).
        area: ``float64 (n_border,)`` their surfel areas, in C order.
        near: ``bool`` grid points within ``tau`` of a border point.
        tau, spacing: what ``near`` was computed for.
    """

    border: np.ndarray
    area: np.ndarray
    near: np.ndarray
    tau: float
    spacing: tuple[float, float, float]


def prepare_surface(mask: np.ndarray, tau: float = 2.0,
                    spacing: float | Sequence[float] = (1.0, 1.0, 1.0)) -> PreparedSurface:
    """:class:`PreparedSurface` of ``mask`` (``(Z, Y, X)``, non-zero is foreground)."""
    sp = _spacing3(spacing)
    codes = neighbour_codes(np.asarray(mask) != 0)
    border = (codes != 0) & (codes != 255)
    area = surfel_area_table(sp)[codes[border]]
    return PreparedSurface(border, area, _within_tolerance(border, float(tau), sp), float(tau), sp)


def _surface_dice_prepared(pred: np.ndarray, gt: PreparedSurface) -> float:
    """:func:`surface_dice` with the ground truth's side prepared (same value, bit for bit)."""
    has_pred, has_gt = bool(pred.any()), gt.area.size > 0
    if not has_pred and not has_gt:
        return 1.0
    if has_pred != has_gt:
        return 0.0
    side = prepare_surface(pred, gt.tau, gt.spacing)
    gt_close = side.near[gt.border]
    pred_close = gt.near[side.border]
    total = gt.area.sum() + side.area.sum()
    return float((gt.area[gt_close].sum() + side.area[pred_close].sum()) / total)


def surface_dice(
    pred: np.ndarray,
    gt: np.ndarray,
    tau: float = 2.0,
    spacing: float | Sequence[float] = (1.0, 1.0, 1.0),
    gt_prepared: PreparedSurface | None = None,
) -> float:
    """Surface Dice at tolerance ``tau`` between two binary volumes.

    Args:
        pred: ``bool``/integer ``(Z, Y, X)`` prediction; non-zero is foreground.
        gt: ground truth, same shape; non-zero is foreground (apply the ignore mask before).
        tau: tolerance in units of ``spacing``.
        spacing: voxel size along (z, y, x).
        gt_prepared: :func:`prepare_surface` of this ``gt`` with the same ``tau`` and ``spacing``
            (the caller guarantees it): its side is not computed again.

    Returns:
        Surface Dice in ``[0, 1]``; 1.0 if both masks are empty, 0.0 if exactly one is.
    """
    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"surface_dice needs two 3D volumes of one shape, got pred {pred.shape} and gt {gt.shape}")
    sp = _spacing3(spacing)
    if gt_prepared is not None:
        if gt_prepared.near.shape != tuple(n + 1 for n in gt.shape) or (gt_prepared.tau, gt_prepared.spacing) != (
                float(tau), sp):
            raise ValueError("surface_dice: gt_prepared was made for another shape, tau or spacing")
        return _surface_dice_prepared(pred, gt_prepared)
    box = _union_bbox(pred, gt)
    if box is None:
        return 1.0
    pred, gt = pred[box], gt[box]
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if has_pred != has_gt:
        return 0.0

    table = surfel_area_table(sp)
    code_gt, code_pred = neighbour_codes(gt), neighbour_codes(pred)
    border_gt = (code_gt != 0) & (code_gt != 255)
    border_pred = (code_pred != 0) & (code_pred != 255)
    area_gt = table[code_gt[border_gt]]
    area_pred = table[code_pred[border_pred]]
    gt_close = _within_tolerance(border_pred, tau, sp)[border_gt]
    pred_close = _within_tolerance(border_gt, tau, sp)[border_pred]
    total = area_gt.sum() + area_pred.sum()
    return float((area_gt[gt_close].sum() + area_pred[pred_close].sum()) / total)
