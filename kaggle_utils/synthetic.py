"""A synthetic stand-in for the competition data: wound papyrus sheets in CT-like volumes.

Each volume holds several concentric-ish, undulating sheets around a random scroll axis (a
wound scroll seen through a small crop), about 2 voxels thick, some pairs nearly touching or
touching, some with holes. Intensities mimic CT and are hard on purpose: the bright papyrus body
is wider than the labelled surface (and a little off it), the bodies of close sheets merge, density
varies along and between sheets, unlabelled bright debris (clumps, blobs, loose fibres, fibres
bridging sheets) fills the gaps, and noise, blur, drift and ring artefacts are strong, so a global
intensity threshold scores below 0.5 (``benchmarks/synthetic_baselines.py``). The look
(brightness, contrast, noise, spacing, axis tilt ...) differs per ``scroll_id`` (:class:`ScrollStyle`).

Labels follow the competition: ``0`` background, ``1`` surface (the sheet voxels), ``2`` unlabeled
(large smooth blobs/slabs plus a 3-voxel border on every face), with the real voxel shares
(surface 4-9 %, ignore 50-70 %, background 25-39 %).

All smooth random fields are drawn on a coarse grid and upsampled with separable Gaussian
interpolation matrices (three matrix products), so a 128^3 volume takes well under a second.
"""

from __future__ import annotations

import csv
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from scipy import ndimage, special

from .data import IGNORE_LABEL, atomic_path, load_index, read_label, read_volume, write_volume

__all__ = [
    "SCROLL_IDS",
    "BORDER",
    "MAX_SIZE",
    "ScrollStyle",
    "scroll_style",
    "smooth_field",
    "make_volume",
    "volume_shapes",
    "generate_dataset",
    "save_preview",
]

#: Scroll ids of the real training set, largest first; more scrolls get made-up 5-digit ids.
SCROLL_IDS = ("34117", "35360", "26010", "26002", "44430", "53997")
#: Width in voxels of the label-2 border on every face (as in the competition labels).
BORDER = 3
#: Largest ``size`` :func:`generate_dataset` accepts (its float32 intermediates need several GiB beyond this).
MAX_SIZE = 512


@dataclass(frozen=True)
class ScrollStyle:
    """How the volumes of one scroll look. All intensities are in uint8 grey levels.

    Attributes:
        base: grey level of air between the sheets.
        contrast: extra brightness at a sheet's centre.
        noise_sigma: std of the additive voxel noise (before blur).
        blur_sigma: Gaussian blur of the final image, voxels.
        texture: relative strength of the fibre texture on the sheets (0 = flat sheets).
        drift: amplitude of the slow intensity drift across the volume.
        spacing: ``(lo, hi)`` range of the distance between neighbouring sheet centres, voxels.
        close_prob: probability that a sheet lies 2-3.4 voxels from the previous one (touching).
        axis_tilt: maximum tilt of the scroll axis away from z, degrees.
        axis_azimuth: preferred direction of that tilt in the y-x plane, degrees.
        undulation: amplitude of the sheets' common low-frequency waviness, voxels.
        sheet_jitter: amplitude of each sheet's own waviness (makes gaps vary), voxels.
        hole_fraction: mean share of a sheet's area missing (holes and tears).
        half_thickness: half the labelled sheet thickness, voxels (1.0 -> ~2 voxels thick).
        fibre_cells: coarse-grid cell sizes ``(z, y, x)`` of the texture (anisotropic fibres).
        body_sigma: Gaussian width (sigma, voxels) of a sheet's bright papyrus body across the
            sheet; wider than the labelled ~2 voxels (FWHM ``2.355 * body_sigma``), and the bodies
            of neighbouring sheets add up where they nearly touch (partial volume).
        body_offset: amplitude (voxels) of the smooth shift between a sheet's bright body and its
            labelled surface (annotations do not sit exactly on the intensity ridge).
        density_var: relative amplitude of the smooth brightness variation along each sheet.
        debris: unlabelled bright debris objects (blobs, short fibre bundles, fibres stuck to or
            bridging sheets) per 64^3 voxels; they stay label 0 (or 2 inside ignore regions).
        grain: std of the voxel noise added after the blur, grey levels (what the eye sees).
        rings: amplitude of ring artefacts (arcs around a scanner axis parallel to z), grey levels.
    """

    base: float = 60.0
    contrast: float = 100.0
    noise_sigma: float = 8.0
    blur_sigma: float = 0.8
    texture: float = 0.25
    drift: float = 12.0
    spacing: tuple[float, float] = (8.0, 13.0)
    close_prob: float = 0.2
    axis_tilt: float = 20.0
    axis_azimuth: float = 0.0
    undulation: float = 3.0
    sheet_jitter: float = 1.2
    hole_fraction: float = 0.08
    half_thickness: float = 1.0
    fibre_cells: tuple[float, float, float] = (6.0, 2.0, 2.0)
    body_sigma: float = 2.0
    body_offset: float = 0.8
    density_var: float = 0.2
    debris: float = 12.0
    grain: float = 10.0
    rings: float = 8.0


def _stable_int(text: str) -> int:
    return zlib.crc32(str(text).encode("utf-8"))


def scroll_style(scroll_id: str | int, seed: int = 0) -> ScrollStyle:
    """The :class:`ScrollStyle` of ``scroll_id``; the same ``(scroll_id, seed)`` gives the same style."""
    rng = np.random.default_rng([_stable_int(str(scroll_id)), int(seed) & 0xFFFFFFFF, 7])
    lo = float(rng.uniform(9.0, 11.5))
    fibre = [float(rng.uniform(4.0, 8.0)), float(rng.uniform(1.5, 2.5)), float(rng.uniform(1.5, 2.5))]
    rng.shuffle(fibre)
    base = float(rng.uniform(40.0, 90.0))
    contrast = float(rng.uniform(60.0, 120.0))
    return ScrollStyle(
        base=base,
        contrast=contrast,
        noise_sigma=float(rng.uniform(5.0, 14.0)),
        blur_sigma=float(rng.uniform(0.5, 1.1)),
        texture=float(rng.uniform(0.1, 0.35)),
        drift=float(contrast * rng.uniform(0.2, 0.45)),
        spacing=(lo, lo + float(rng.uniform(3.0, 6.0))),
        close_prob=float(rng.uniform(0.08, 0.25)),
        axis_tilt=float(rng.uniform(5.0, 35.0)),
        axis_azimuth=float(rng.uniform(0.0, 360.0)),
        undulation=float(rng.uniform(2.0, 6.0)),
        sheet_jitter=float(rng.uniform(0.6, 1.6)),
        hole_fraction=float(rng.uniform(0.03, 0.1)),
        half_thickness=float(rng.uniform(0.95, 1.1)),
        fibre_cells=(fibre[0], fibre[1], fibre[2]),
        **_hard_style(rng, contrast),
    )


def _hard_style(rng: np.random.Generator, contrast: float) -> dict[str, float]:
    """The style fields that make the image hard for intensity-only rules (drawn after the
    original ones so those keep their values for a given scroll)."""
    return dict(
        body_sigma=float(rng.uniform(2.2, 3.0)),
        body_offset=float(rng.uniform(0.5, 1.2)),
        density_var=float(rng.uniform(0.15, 0.35)),
        debris=float(rng.uniform(30.0, 55.0)),
        grain=float(contrast * rng.uniform(0.1, 0.27)),
        rings=float(rng.uniform(6.0, 18.0)),
    )


# ----------------------------------------------------------------------------------------------
# Smooth random fields
# ----------------------------------------------------------------------------------------------


def _interp_matrix(n_out: int, cell: float) -> np.ndarray:
    """``float32 (n_out, n_coarse)`` Gaussian interpolation weights from a coarse grid of spacing
    ``cell``; rows have unit L2 norm, so i.i.d. unit-normal coarse values give unit variance."""
    cell = max(float(cell), 1.0)
    n_coarse = int(math.ceil(n_out / cell)) + 3
    nodes = (np.arange(n_coarse) - 1.5) * cell + (n_out - (n_coarse - 3) * cell) / 2.0
    pos = np.arange(n_out, dtype=np.float64)[:, None]
    w = np.exp(-0.5 * ((pos - nodes[None, :]) / (0.8 * cell)) ** 2)
    w /= np.sqrt((w**2).sum(axis=1, keepdims=True))
    return w.astype(np.float32)


def smooth_field(
    shape: Sequence[int], cell: float | Sequence[float], rng: np.random.Generator
) -> np.ndarray:
    """A smooth Gaussian random field with zero mean and unit variance at every voxel.

    Args:
        shape: ``(Z, Y, X)``.
        cell: correlation length in voxels (one number, or one per axis for anisotropic fields).
        rng: the random generator to draw the coarse values from.

    Returns:
        ``float32 (Z, Y, X)``.
    """
    cells = [float(cell)] * 3 if np.isscalar(cell) else [float(c) for c in cell]  # type: ignore[arg-type]
    wz, wy, wx = (_interp_matrix(n, c) for n, c in zip(shape, cells))
    (cz, cy, cx), (nz, ny, nx) = (wz.shape[1], wy.shape[1], wx.shape[1]), shape
    coarse = rng.standard_normal((cz, cy, cx), dtype=np.float32)
    # three plain 2D matrix products (BLAS); only the last one is full size
    t = (wz @ coarse.reshape(cz, cy * cx)).reshape(nz, cy, cx)
    t = (wy @ t.transpose(1, 0, 2).reshape(cy, nz * cx)).reshape(ny, nz, cx)
    t = np.ascontiguousarray(t.transpose(1, 0, 2)).reshape(nz * ny, cx)
    return (t @ wx.T).reshape(nz, ny, nx)


# ----------------------------------------------------------------------------------------------
# One volume
# ----------------------------------------------------------------------------------------------


def _axis_frame(style: ScrollStyle, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (z, y, x order) spanning the plane perpendicular to the scroll axis."""
    tilt = math.radians(rng.uniform(0.0, style.axis_tilt))
    azim = math.radians(style.axis_azimuth + rng.normal(0.0, 30.0))
    axis = np.array([math.cos(tilt), math.sin(tilt) * math.sin(azim), math.sin(tilt) * math.cos(azim)])
    helper = np.array([0.0, 0.0, 1.0]) if abs(axis[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    return e1, e2


def _plane_coord(shape: Sequence[int], e: np.ndarray, offset: float) -> np.ndarray:
    """``float32 (Z, Y, X)`` coordinate ``(p - centre) . e - offset``."""
    z, y, x = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0 for n in shape)
    return (
        (np.float32(e[0]) * z)[:, None, None]
        + (np.float32(e[1]) * y)[None, :, None]
        + (np.float32(e[2]) * x - np.float32(offset))[None, None, :]
    )


def _sheet_radii(
    r_lo: float, r_hi: float, style: ScrollStyle, rng: np.random.Generator, spacing_scale: float = 1.0
) -> np.ndarray:
    """Sorted sheet radii covering ``[r_lo, r_hi]``; gaps from ``style.spacing`` (times
    ``spacing_scale``) or, with probability ``style.close_prob``, 2-3.4 voxels (nearly touching /
    touching sheets)."""
    scale = rng.uniform(0.9, 1.1) * spacing_scale
    lo, hi = style.spacing[0] * scale, style.spacing[1] * scale
    radii = [r_lo - rng.uniform(0.0, hi)]
    while radii[-1] < r_hi + hi:
        close = rng.random() < style.close_prob
        radii.append(radii[-1] + (rng.uniform(2.0, 3.4) if close else rng.uniform(lo, hi)))
    radii_arr = np.asarray(radii)
    return radii_arr[radii_arr > 4.0]  # no sheets at the very core


#: Target label shares: surface, background, ignore (inside the real data's ranges).
_SURFACE_RANGE = (0.048, 0.082)
_BACKGROUND_RANGE = (0.275, 0.375)
_IGNORE_RANGE = (0.54, 0.67)
#: Share of sheet voxels in a volume's interior that the label shares above can absorb.
_SHEET_SHARE = (0.11, 0.22)


def _ignore_share(sheet_share: float, position: float) -> tuple[float, float]:
    """Ignore share that puts surface and background in their target ranges when ``sheet_share``
    of the labelled voxels are sheet; ``position`` in [0, 1] picks a point of the feasible range.

    Returns ``(share, violation)``; violation > 0 when no share satisfies all three ranges."""
    f = min(max(sheet_share, 1e-3), 0.999)
    lo = max(_IGNORE_RANGE[0], 1.0 - _SURFACE_RANGE[1] / f, 1.0 - _BACKGROUND_RANGE[1] / (1.0 - f))
    hi = min(_IGNORE_RANGE[1], 1.0 - _SURFACE_RANGE[0] / f, 1.0 - _BACKGROUND_RANGE[0] / (1.0 - f))
    if lo > hi:  # sheets too dense or too sparse for all three ranges: best compromise
        mid = float(np.clip((lo + hi) / 2.0, _IGNORE_RANGE[0], _IGNORE_RANGE[1]))
        return mid, lo - hi
    return lo + position * (hi - lo), 0.0


def _n_labelled(ignore_share: float, border_share: float, n: int) -> int:
    """How many of ``n`` interior samples stay labelled for a total ``ignore_share``."""
    inner = (ignore_share - border_share) / (1.0 - border_share)
    return int(np.clip(round((1.0 - inner) * n), 1, n))


def _ignore_blobs(
    sheet: np.ndarray, size: float, border_share: float, rng: np.random.Generator, attempts: int = 3
) -> tuple[np.ndarray, float]:
    """A smooth blob/slab field and the threshold above which voxels become label 2.

    The threshold is chosen so that the label shares land in their target ranges given where the
    sheets are; a field (or its negative) that makes them unreachable is redrawn, up to
    ``attempts`` times, keeping the best.
    """
    shape = sheet.shape
    inner = tuple(slice(BORDER, n - BORDER) for n in shape)
    step = max(1, round(size / 64.0))  # ~250k samples whatever the size
    sheet_sub = sheet[inner][::step, ::step, ::step].ravel()
    position = rng.uniform(0.15, 0.85)
    best: tuple[float, np.ndarray, float] | None = None
    for _ in range(attempts):
        blobs = smooth_field(shape, float(np.clip(size / 3.0, 12.0, 64.0)), rng)
        slab_dir = rng.normal(size=3)
        slab_dir /= np.linalg.norm(slab_dir)
        blobs += np.float32(rng.uniform(0.5, 1.5) * 2.0 / size) * _plane_coord(shape, slab_dir, 0.0)
        for sign in (1.0, -1.0):
            blob_sub = sign * blobs[inner][::step, ::step, ::step].ravel()
            order = np.argsort(blob_sub, kind="stable")
            sheet_cum = np.cumsum(sheet_sub[order]) / np.arange(1, order.size + 1)
            share, bad = _ignore_share(float(sheet_sub.mean()), position)
            for _ in range(3):  # re-aim with the sheet share of the voxels that stay labelled
                n_keep = _n_labelled(share, border_share, order.size)
                share, bad = _ignore_share(float(sheet_cum[n_keep - 1]), position)
            n_keep = _n_labelled(share, border_share, order.size)
            thr = float(blob_sub[order[n_keep - 1]]) if n_keep < order.size else np.inf
            if best is None or bad < best[0]:
                best = (bad, blobs if sign > 0 else -blobs, thr)
            if bad <= 0.0:
                return best[1], best[2]
    assert best is not None
    return best[1], best[2]


def _wound_sheets(
    shape: tuple[int, int, int], style: ScrollStyle, rng: np.random.Generator, spacing_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Sheets of a wound scroll crossing a crop.

    Sheets are level sets ``u = r_k`` of the distance ``u`` to a tilted scroll axis plus
    low-frequency undulation; each sheet gets its own smooth offset (so gaps vary and close
    sheets touch in places) and its own holes. Distances are divided by ``|grad u|`` so the
    labelled thickness is ``2 * half_thickness`` along the sheet normal.

    Returns:
        ``(sheet bool (Z, Y, X), profile float32 (Z, Y, X))``: the labelled sheet voxels and a
        soft density profile (about 0..1.2, up to ~2 where two bodies merge) for the image.
    """
    size = float(np.mean(shape))
    e1, e2 = _axis_frame(style, rng)
    centre_dist = size * rng.uniform(0.7, 2.5)
    psi = rng.uniform(0.0, 2.0 * math.pi)
    q1 = _plane_coord(shape, e1, centre_dist * math.cos(psi))
    q2 = _plane_coord(shape, e2, centre_dist * math.sin(psi))
    u = np.sqrt(q1 * q1 + q2 * q2)
    del q1, q2
    und_cell = float(np.clip(size / 3.0, 16.0, 48.0))
    u += np.float32(style.undulation) * smooth_field(shape, und_cell, rng)
    u += np.float32(0.35 * style.undulation) * smooth_field(shape, float(rng.uniform(8.0, 14.0)), rng)

    # |grad u| turns radius differences into normal distances (uniform sheet thickness)
    grad = np.zeros(shape, dtype=np.float32)
    for g in np.gradient(u):
        grad += g * g
    np.sqrt(grad, out=grad)
    np.maximum(grad, np.float32(0.3), out=grad)
    radii = _sheet_radii(float(u.min()), float(u.max()), style, rng, spacing_scale)
    n_sheets = len(radii)
    jitter = rng.uniform(0.3, 1.0, n_sheets) * style.sheet_jitter
    theta = rng.uniform(0.0, 2.0 * math.pi, n_sheets)
    phi = rng.uniform(0.0, 2.0 * math.pi, n_sheets)
    hole_frac = np.clip(rng.uniform(0.0, 2.0 * style.hole_fraction, n_sheets), 1e-4, 0.5)
    hole_thr = special.ndtri(1.0 - hole_frac)
    # sentinels so that every voxel has a sheet below and above it
    radii = np.concatenate([[-1e6], radii, [1e6]]).astype(np.float32)
    pad = lambda a, v: np.concatenate([[v], a, [v]]).astype(np.float32)  # noqa: E731
    jc, js = pad(jitter * np.cos(theta), 0.0), pad(jitter * np.sin(theta), 0.0)
    hc, hs, hthr = pad(np.cos(phi), 0.0), pad(np.sin(phi), 0.0), pad(hole_thr, 9.0)
    bright = pad(rng.uniform(0.55, 1.15, n_sheets), 0.0)  # sheets differ in density
    oa, ob = (pad(rng.normal(0.0, style.body_offset / math.sqrt(2.0), n_sheets), 0.0) for _ in range(2))

    jit1 = smooth_field(shape, float(np.clip(size / 4.0, 12.0, 40.0)), rng)
    jit2 = smooth_field(shape, float(np.clip(size / 4.0, 12.0, 40.0)), rng)
    hole_cell = float(rng.uniform(10.0, 18.0))
    hole1 = smooth_field(shape, hole_cell, rng)
    hole2 = smooth_field(shape, hole_cell, rng)
    half = np.float32(style.half_thickness) + np.float32(0.12) * jit1
    # the papyrus body is wider than the labelled surface, and denser in some places than others
    sigma = np.float32(style.body_sigma) * (np.float32(1.0) + np.float32(0.12) * jit2)
    density = np.float32(1.0) + np.float32(style.density_var) * smooth_field(shape, float(rng.uniform(6.0, 12.0)), rng)

    upper = np.searchsorted(radii, u).astype(np.int32)
    sheet = np.zeros(shape, dtype=bool)
    profile = np.zeros(shape, dtype=np.float32)
    for k in (upper - 1, upper):
        d = (u - radii[k] - jc[k] * jit1 - js[k] * jit2) / grad
        h = hc[k] * hole1 + hs[k] * hole2 - hthr[k]  # < 0: sheet present
        sheet |= (np.abs(d) < half) & (h < 0)
        amp = np.clip(0.5 - h / np.float32(0.3), 0.0, 1.0)
        d -= oa[k] * jit1 + ob[k] * jit2  # the body's centre is not exactly the label's
        profile += bright[k] * amp * np.exp(-0.5 * (d / sigma) ** 2)  # bodies add up (partial volume)
        del d, h, amp
    profile *= density
    return sheet, profile


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random ``(3, 3)`` rotation matrix."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _local_grid(
    shape: Sequence[int], centre: np.ndarray, extent: float
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """Slices of the box ``centre +- extent`` clipped to the volume and the ``float32 (3, z, y, x)``
    voxel coordinates relative to ``centre`` inside it (``None`` when the box is outside)."""
    lo = np.maximum(np.floor(centre - extent).astype(int), 0)
    hi = np.minimum(np.ceil(centre + extent).astype(int) + 1, shape)
    if (hi <= lo).any():
        return None
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grid = np.stack(
        np.meshgrid(*(np.arange(a, b, dtype=np.float32) - np.float32(c) for a, b, c in zip(lo, hi, centre)), indexing="ij")
    )
    return box, grid


def _sheet_normal(sheet: np.ndarray, point: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit normal of the labelled sheet near ``point`` (smallest principal axis of the sheet voxels
    within 4 voxels); a random direction where there are too few of them."""
    lo = np.maximum(point - 4, 0)
    hi = point + 5
    pts = np.argwhere(sheet[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]).astype(np.float64)
    if len(pts) < 8:
        v = rng.normal(size=3)
        return v / np.linalg.norm(v)
    pts -= pts.mean(axis=0)
    return np.linalg.eigh(pts.T @ pts)[1][:, 0]


def _debris(shape: tuple[int, int, int], style: ScrollStyle, sheet: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unlabelled bright debris: ellipsoidal blobs, short fibre bundles floating between the
    sheets, and fibres sticking out of a sheet along its normal (some bridging to the next one).

    Returns:
        ``float32 (Z, Y, X)`` density in ``[0, ~1.1]`` with soft (partial-volume) edges.
    """
    # clumps and fibre fragments everywhere: the top ~0.1 % per unit of ``debris`` of a fine,
    # anisotropic random field (cheap at any size)
    cells = rng.permutation([rng.uniform(3.0, 6.0), rng.uniform(1.2, 2.0), rng.uniform(1.2, 2.0)])
    thr = float(special.ndtri(1.0 - min(0.001 * style.debris, 0.2)))
    field = smooth_field(shape, cells, rng)
    field -= np.float32(thr)
    field *= np.float32(rng.uniform(0.6, 1.0) * 2.0)
    np.clip(field, 0.0, 1.0, out=field)
    n_obj = int(rng.poisson(0.4 * style.debris * float(np.prod(shape)) / 64.0**3))
    if n_obj == 0:
        return field
    sheet_idx = np.flatnonzero(sheet[::2, ::2, ::2])
    sub_shape = sheet[::2, ::2, ::2].shape
    dims = np.asarray(shape, dtype=np.float64)
    for _ in range(n_obj):
        kind = rng.choice(3, p=(0.35, 0.3, 0.35)) if sheet_idx.size else rng.choice(2, p=(0.55, 0.45))
        bright = np.float32(rng.uniform(0.6, 1.1))
        if kind == 0:  # blob: a randomly oriented ellipsoid
            centre = rng.uniform(0.0, 1.0, 3) * dims
            axes = rng.uniform(1.2, 4.5, 3)
            found = _local_grid(shape, centre, float(axes.max()) + 1.5)
            if found is None:
                continue
            box, grid = found
            rot = _random_rotation(rng).astype(np.float32)
            q = np.tensordot(rot, grid, axes=1) / axes.astype(np.float32)[:, None, None, None]
            r = np.sqrt((q * q).sum(axis=0))
            val = np.clip((np.float32(1.0) - r) * np.float32(axes.min()) + np.float32(0.5), 0.0, 1.0)
        else:  # fibre (bundle): one to three parallel capsules
            if kind == 2:
                start = np.array(np.unravel_index(rng.choice(sheet_idx), sub_shape)) * 2
                direction = _sheet_normal(sheet, start, rng) * rng.choice((-1.0, 1.0))
                direction += rng.normal(0.0, 0.25, 3)
                length = rng.uniform(5.0, 20.0)
            else:
                start = rng.uniform(0.0, 1.0, 3) * dims
                direction = rng.normal(size=3)
                length = rng.uniform(6.0, 30.0)
            direction /= np.linalg.norm(direction)
            radius = rng.uniform(0.6, 1.3)
            centre = start + 0.5 * length * direction
            found = _local_grid(shape, centre, 0.5 * length + radius + 3.0)
            if found is None:
                continue
            box, grid = found
            v = direction.astype(np.float32)
            val = np.zeros(grid.shape[1:], dtype=np.float32)
            offsets = [np.zeros(3)] + [rng.normal(0.0, 1.2, 3) for _ in range(int(rng.integers(0, 3)))]
            for off in offsets:
                off = (off - (off @ direction) * direction).astype(np.float32)  # across the fibre
                p = grid - off[:, None, None, None]
                t = np.clip(np.tensordot(v, p, axes=1), -0.5 * length, 0.5 * length)
                d = np.sqrt(((p - v[:, None, None, None] * t) ** 2).sum(axis=0))
                np.maximum(val, np.clip(np.float32(radius + 0.5) - d, 0.0, 1.0), out=val)
        np.maximum(field[box], bright * val, out=field[box])
    return field


def _ring_artefacts(shape: tuple[int, int, int], amplitude: float, rng: np.random.Generator) -> np.ndarray:
    """CT ring artefacts: thin bright/dark arcs around a scanner axis parallel to z (usually outside
    the crop), slowly varying along z. ``float32 (Z, Y, X)``, about ``+-amplitude``."""
    nz, ny, nx = shape
    size = float(np.mean(shape))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    dist = size * rng.uniform(0.0, 2.5)
    cy, cx = ny / 2.0 + dist * math.sin(angle), nx / 2.0 + dist * math.cos(angle)
    y = np.arange(ny, dtype=np.float32)[:, None] - np.float32(cy)
    x = np.arange(nx, dtype=np.float32)[None, :] - np.float32(cx)
    r = np.sqrt(y * y + x * x)
    rings = np.zeros((ny, nx), dtype=np.float32)
    r_lo, r_hi = float(r.min()), float(r.max())
    n_rings = max(1, int(rng.poisson((r_hi - r_lo) / 10.0)))
    for r0, w, sign in zip(rng.uniform(r_lo, r_hi, n_rings), rng.uniform(0.6, 2.0, n_rings), rng.choice((-1.0, 1.0), n_rings)):
        rings += np.float32(sign * rng.uniform(0.4, 1.0)) * np.exp(-0.5 * ((r - np.float32(r0)) / np.float32(w)) ** 2)
    period = rng.uniform(4.0, 12.0)
    rings += np.float32(0.3) * np.sin(r * np.float32(2.0 * math.pi / period) + np.float32(rng.uniform(0, 2 * math.pi)))
    along_z = 1.0 + 0.4 * smooth_field((nz, 1, 1), (max(size / 3.0, 8.0), 1.0, 1.0), rng)
    return np.float32(amplitude) * along_z * rings[None, :, :]


def make_volume(
    shape: Sequence[int], seed: int, style: ScrollStyle | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic CT crop and its label.

    Args:
        shape: ``(Z, Y, X)``, each at least 16.
        seed: random seed (same seed and style, same arrays).
        style: the scroll's look; :class:`ScrollStyle` defaults when ``None``.

    Returns:
        ``(image, label)``, both ``uint8 (Z, Y, X)``; label values 0 background, 1 surface,
        2 ignore (including a 3-voxel border on every face).
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"make_volume: shape must be 3 sizes >= 16, got {shape}")
    style = style or ScrollStyle()
    rng = np.random.default_rng(seed)
    size = float(np.mean(shape))

    # --- geometry: sheets dense enough, not too dense, for the real label shares -------------
    inner = tuple(slice(BORDER, n - BORDER) for n in shape)
    step = max(1, round(size / 64.0))
    scale = 1.0
    for _ in range(4):
        sheet, profile = _wound_sheets(shape, style, rng, scale)
        share = float(sheet[inner][::step, ::step, ::step].mean())
        if share > _SHEET_SHARE[1]:
            scale *= 1.25
        elif share < _SHEET_SHARE[0]:
            scale /= 1.25
        else:
            break

    # --- intensities ----------------------------------------------------------------------------
    cells = np.asarray(style.fibre_cells)
    fibre = smooth_field(shape, cells, rng)
    np.maximum(profile, _debris(shape, style, sheet, rng), out=profile)
    image = np.float32(style.contrast) * profile * (np.float32(1.0) + np.float32(style.texture) * fibre)
    image += np.float32(style.base) + np.float32(style.drift) * smooth_field(shape, max(size / 2.0, 16.0), rng)
    image += np.float32(0.3 * style.noise_sigma) * fibre  # faint structure in the air too
    image += np.float32(style.noise_sigma) * rng.standard_normal(shape, dtype=np.float32)
    del fibre, profile
    image = ndimage.gaussian_filter(image, style.blur_sigma, truncate=3.0)
    image += _ring_artefacts(shape, style.rings, rng)
    image += np.float32(style.grain) * rng.standard_normal(shape, dtype=np.float32)
    np.clip(image, 0.0, 255.0, out=image)
    image_u8 = np.rint(image).astype(np.uint8)
    del image

    # --- labels: sheets, large ignore blobs/slabs, the border ---------------------------------
    border_share = 1.0 - float(np.prod([n - 2 * BORDER for n in shape])) / float(np.prod(shape))
    blobs, thr = _ignore_blobs(sheet, size, border_share, rng)
    label = sheet.astype(np.uint8)
    label[blobs > thr] = IGNORE_LABEL
    del blobs, sheet
    for axis in range(3):
        idx = [slice(None)] * 3
        idx[axis] = np.r_[0:BORDER, shape[axis] - BORDER : shape[axis]]
        label[tuple(idx)] = IGNORE_LABEL
    return image_u8, label


# ----------------------------------------------------------------------------------------------
# A dataset in the competition layout
# ----------------------------------------------------------------------------------------------


def _small_size(size: int) -> int:
    """``size * 0.8`` rounded down to a multiple of 8 (at least 16)."""
    return max(16, int(size * 0.8) // 8 * 8)


def volume_shapes(n: int, size: int, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """Shapes of ``n`` volumes: mostly ``size^3``, about 20 % ``(0.8 size)^3`` and 10 % non-cubic
    (one axis shortened); with ``n >= 2`` at least one smaller cube, ``n >= 3`` one non-cubic."""
    small = _small_size(size)
    n_small = max(1 if n >= 2 else 0, round(0.2 * n))
    n_odd = max(1 if n >= 3 else 0, round(0.1 * n))
    shapes: list[tuple[int, int, int]] = [(size, size, size)] * (n - n_small - n_odd)
    shapes += [(small, small, small)] * n_small
    for _ in range(n_odd):
        s = [size, size, size]
        s[int(rng.integers(3))] = small
        shapes.append((s[0], s[1], s[2]))
    order = rng.permutation(n)
    return [shapes[i] for i in order]


def _scroll_ids(n_scrolls: int, rng: np.random.Generator) -> list[str]:
    ids = list(SCROLL_IDS[:n_scrolls])
    while len(ids) < n_scrolls:
        cand = str(int(rng.integers(20000, 60000)))
        if cand not in ids:
            ids.append(cand)
    return ids


def _assign_scrolls(n: int, scrolls: list[str], rng: np.random.Generator) -> list[str]:
    """Uneven, like the real data (weights ~ 1/rank), but every scroll used once first."""
    base = [scrolls[i % len(scrolls)] for i in range(min(n, len(scrolls)))]
    weights = 1.0 / np.arange(1, len(scrolls) + 1)
    extra = rng.choice(len(scrolls), size=max(n - len(base), 0), p=weights / weights.sum())
    out = base + [scrolls[i] for i in extra]
    return [out[i] for i in rng.permutation(len(out))]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(["id", "scroll_id"])
            writer.writerows(rows)


def generate_dataset(
    out: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 2,
    size: int = 128,
    n_scrolls: int = 4,
    seed: int = 0,
    test_labels: bool = True,
    progress: bool = True,
) -> Path:
    """Write a synthetic dataset in the competition layout.

    Layout: ``train.csv`` and ``test.csv`` (``id,scroll_id``), ``train_images/{id}.tif``,
    ``train_labels/{id}.tif``, ``test_images/{id}.tif``: LZW-compressed ``uint8 (Z, Y, X)``
    TIFFs. Ids are numeric; scroll ids are the real ones (``34117`` ...) for up to 6 scrolls.
    Shapes are mostly ``size^3`` with some ``(0.8 size)^3`` and non-cubic volumes.
    Stale ``*.tif`` files of an earlier run in those three folders are removed.

    Args:
        out: output folder (created).
        n_train: number of training volumes (>= 1).
        n_test: number of test volumes (>= 0).
        size: edge length of most volumes (32 to :data:`MAX_SIZE`).
        n_scrolls: number of distinct scroll ids (>= 1).
        seed: random seed; the same arguments give byte-identical files.
        test_labels: also write the hidden answers of the test volumes to ``test_labels/{id}.tif``
            (not part of Kaggle's layout; lets ``score`` grade a synthetic ``submission.zip``).
        progress: a progress bar (:func:`kaggle_utils.progress.progress_bar`: only where someone watches).

    Returns:
        ``Path(out)``.
    """
    root = Path(out)
    _check_generate_args(root, n_train, n_test, size, n_scrolls)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 20251113])
    scrolls, splits, vol_seeds = _plan_splits(n_train, n_test, size, n_scrolls, rng)
    styles = {s: scroll_style(s, seed) for s in scrolls}
    folders = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels" if test_labels else None)}
    _prepare_folders(root, folders, splits)
    if not n_test:
        (root / "test.csv").unlink(missing_ok=True)
    _write_splits(root, folders, splits, vol_seeds, styles, progress)
    return root


_Split = tuple[str, list[str], list[str], list[tuple[int, int, int]]]
"""One split of :func:`generate_dataset`: ``(name, volume ids, scroll ids, (Z, Y, X) shapes)``."""


def _check_generate_args(root: Path, n_train: int, n_test: int, size: int, n_scrolls: int) -> None:
    """Raise ``ValueError`` (one line naming the argument) for arguments :func:`generate_dataset` rejects."""
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    if size > MAX_SIZE:
        raise ValueError(f"size must be <= {MAX_SIZE} (real volumes are at most 384^3), got {size}")
    if n_scrolls < 1:
        raise ValueError(f"n_scrolls must be >= 1, got {n_scrolls}")
    if root.exists() and not root.is_dir():
        raise ValueError(f"{root}: exists and is not a directory")


def _plan_splits(
    n_train: int, n_test: int, size: int, n_scrolls: int, rng: np.random.Generator
) -> tuple[list[str], list[_Split], np.ndarray]:
    """Draw the scroll ids, volume ids, scroll assignment, shapes and per-volume seeds.

    The draws from ``rng`` come in a fixed order (scrolls, ids, train scrolls + shapes, test
    scrolls + shapes, seeds): a seed's files depend on it.

    Returns:
        ``(scrolls, splits, vol_seeds)``: the distinct scroll ids, the train (and, when
        ``n_test``, test) splits, and ``int64 (n_train + n_test,)`` seeds for :func:`make_volume`
        in split order.
    """
    scrolls = _scroll_ids(n_scrolls, rng)
    n_all = n_train + n_test
    ids: list[str] = []
    while len(ids) < n_all:
        cand = str(int(rng.integers(10**6, 2 * 10**9)))
        if cand not in ids:
            ids.append(cand)
    splits = [("train", ids[:n_train], _assign_scrolls(n_train, scrolls, rng), volume_shapes(n_train, size, rng))]
    if n_test:
        splits.append(("test", ids[n_train:], _assign_scrolls(n_test, scrolls, rng), volume_shapes(n_test, size, rng)))
    vol_seeds = rng.integers(0, 2**31 - 1, size=n_all)
    return scrolls, splits, vol_seeds


def _prepare_folders(root: Path, folders: dict[str, tuple[str, str | None]], splits: list[_Split]) -> None:
    """Create the image/label folders under ``root`` and remove ``*.tif`` files no split will write."""
    for split, (img_dir, lbl_dir) in folders.items():
        wanted = {f"{v}.tif" for sp, vids, _, _ in splits if sp == split for v in vids}
        for d in (img_dir, lbl_dir):
            if d is None:
                continue
            (root / d).mkdir(parents=True, exist_ok=True)
            for stale in (root / d).glob("*.tif"):
                if stale.name not in wanted:
                    stale.unlink()


def _write_splits(
    root: Path,
    folders: dict[str, tuple[str, str | None]],
    splits: list[_Split],
    vol_seeds: np.ndarray,
    styles: dict[str, ScrollStyle],
    progress: bool = True,
) -> None:
    """Make and write every volume (and label, where the split has a label folder), then each ``{split}.csv``."""
    from .progress import progress_bar

    i = 0
    with progress_bar(total=len(vol_seeds), desc="synth", unit="vol", enabled=progress) as bar:
        for split, vids, sids, shapes in splits:
            img_dir, lbl_dir = folders[split]
            for vid, sid, shape in zip(vids, sids, shapes):
                image, label = make_volume(shape, int(vol_seeds[i]), styles[sid])
                write_volume(root / img_dir / f"{vid}.tif", image)
                if lbl_dir is not None:
                    write_volume(root / lbl_dir / f"{vid}.tif", label)
                i += 1
                bar.update(1)
            _write_csv(root / f"{split}.csv", list(zip(vids, sids)))


# ----------------------------------------------------------------------------------------------
# Preview
# ----------------------------------------------------------------------------------------------

_OVERLAY = np.array(
    [[0.0, 0.0, 0.0, 0.0], [1.0, 0.1, 0.1, 0.55], [0.45, 0.55, 0.8, 0.45]], dtype=np.float32
)


def save_preview(
    root: str | os.PathLike, png_path: str | os.PathLike, ids: Sequence[str] | None = None
) -> Path:
    """Save a montage of a few training volumes: per volume the middle z slice without and with
    the label overlay (1 red, 2 grey-blue, 0 transparent) and the middle y slice with it.

    Args:
        root: competition-layout folder with ``train.csv``, ``train_images/``, ``train_labels/``.
        png_path: output PNG.
        ids: volume ids to show; default up to 3, from different scrolls where possible.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    index = load_index(root, "train")
    if ids is None:
        chosen, seen = [], set()
        for rec in index:
            if rec.scroll_id not in seen:
                chosen.append(rec)
                seen.add(rec.scroll_id)
        chosen = (chosen + [r for r in index if r not in chosen])[:3]
    else:
        chosen = [index.by_id(str(v)) for v in ids]
    fig = Figure(figsize=(10.5, 3.5 * len(chosen)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(chosen), 3, squeeze=False)
    for row, rec in zip(axes, chosen):
        image = read_volume(rec.image_path)
        label = read_label(rec.label_path) if rec.label_path is not None else np.zeros_like(image)
        zc, yc = image.shape[0] // 2, image.shape[1] // 2
        views = [
            (image[zc], None, f"id {rec.id} (scroll {rec.scroll_id}) z={zc}"),
            (image[zc], label[zc], f"{'x'.join(map(str, image.shape))}  z={zc} + label"),
            (image[:, yc], label[:, yc], f"y={yc} + label (z down)"),
        ]
        for ax, (img, lbl, title) in zip(row, views):
            ax.imshow(img, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            if lbl is not None:
                ax.imshow(_OVERLAY[np.minimum(lbl, 2)], interpolation="nearest")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    png_path = Path(png_path)
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    return png_path
