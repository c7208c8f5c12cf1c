"""Sliding-window inference of whole CT volumes, with blending, ensembles, TTA and OOM fallback.

A pipeline of small steps, each a public, testable function:

1. :func:`pad_widths` / :func:`plan_windows` -- pad the volume (to a multiple of 32 and at least the
   window) and place windows so every voxel is covered (:func:`window_starts` per axis);
2. :func:`importance_map` -- per-window blending weights (Gaussian with sigma = 1/8 of the window,
   as MONAI and nnU-Net, or constant), and :func:`window_weight_sum`, their sum over all windows;
3. :func:`predict_windows` -- one batch of windows through every model and TTA transform
   (:class:`TTATransform`, :func:`tta_transforms`), merged into one ``float32`` prediction;
4. accumulation of ``weight * prediction`` in ``float32`` on the device, normalization by the
   weight sum, crop back to the input shape (:func:`sliding_window_predict`);
5. :func:`run_with_oom_fallback` -- on CUDA out-of-memory, retry with half the window batch, then
   with accumulation on the CPU.

:class:`VolumePrefetcher` reads and normalizes the next volume in a background thread while the
GPU works on the current one. :class:`InferenceConfig` is the YAML-loadable section.

Shapes: volumes are ``(Z, Y, X)``; a model maps ``(B, 1, z, y, x) float`` windows to
``(B, 1, z, y, x)`` logits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import math
import queue
import threading
import warnings
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import PatchShape, as_patch_shape
from .device import normalize_amp, resolve_amp_dtype
from .moved import moved_name_error

__all__ = [
    "InferenceConfig",
    "TTATransform",
    "TTA_PRESETS",
    "window_starts",
    "pad_widths",
    "plan_windows",
    "gaussian_importance_map",
    "importance_map",
    "window_weight_sum",
    "window_weight_sum_chunks",
    "WindowPlan",
    "make_window_plan",
    "predict_volume",
    "as_inference_config",
    "tta_transforms",
    "predict_windows",
    "run_with_oom_fallback",
    "sliding_window_predict",
    "window_settings",
    "VolumePrefetcher",
]


#: Public names that moved out of this module (:func:`kaggle_utils.moved.moved_name_error`).
MOVED = {n: "kaggle_utils.device" for n in ("AMP_MODES", "normalize_amp", "resolve_amp_dtype")}


def __getattr__(name: str) -> object:
    """A one-line ``AttributeError`` naming the new home of a name in :data:`MOVED`."""
    raise moved_name_error(__name__, name, MOVED)

logger = logging.getLogger(__name__)

T = TypeVar("T")

PLACEMENTS = ("even", "monai")
BLENDS = ("gaussian", "constant")
ENSEMBLES = ("probs", "logits")
TTA_PRESETS = ("none", "flips", "rot90", "flips+rot90")

# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class InferenceConfig:
    """Sliding-window settings, loadable from YAML with :func:`kaggle_utils.config.from_dict`.

    Attributes:
        patch_size: window size ``(z, y, x)``, or one int for a cube (:func:`~kaggle_utils.config.as_patch_shape`);
            each edge a multiple of the network's divisor (32 for the smp U-Nets).
        overlap: fraction of a window shared with its neighbour, in ``[0, 1)``.
        batch_size: windows per forward pass.
        blend: ``"gaussian"`` (sigma = ``sigma_scale`` * window) or ``"constant"``.
        sigma_scale: Gaussian sigma as a fraction of the window size.
        tta: preset name, one of :data:`TTA_PRESETS`.
        amp: mixed precision, one of :data:`~kaggle_utils.device.AMP_MODES` (the same vocabulary as ``train.amp``):
            ``auto`` (float16 on CUDA, full precision on CPU), ``off``, ``fp16`` or ``bf16``; the
            old ``true`` still means ``fp16`` (with a deprecation warning).
        ensemble: average several models' ``"probs"`` or ``"logits"``.
        channels_last: run the models in ``torch.channels_last_3d`` memory format.
        placement: ``"even"`` (evenly spread windows) or ``"monai"`` (MONAI's placement).
    """

    patch_size: PatchShape = (128, 128, 128)  # type: ignore[assignment]
    overlap: float = 0.5
    batch_size: int = 2
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = 0.125
    tta: str = "none"
    amp: str | bool = "auto"
    ensemble: Literal["probs", "logits"] = "probs"
    channels_last: bool = False
    placement: Literal["even", "monai"] = "even"

    def __post_init__(self) -> None:
        self.patch_size = as_patch_shape(self.patch_size, "inference.patch_size")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"inference.overlap: must be in [0, 1), got {self.overlap}")
        if self.batch_size < 1:
            raise ValueError(f"inference.batch_size: must be >= 1, got {self.batch_size}")
        if self.tta not in TTA_PRESETS:
            raise ValueError(f"inference.tta: must be one of {list(TTA_PRESETS)}, got {self.tta!r}")
        self.amp = normalize_amp(self.amp, "inference.amp")

    def to_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`sliding_window_predict`."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# 1. Window placement
# ----------------------------------------------------------------------------------------------


def _check_overlap(overlap: float) -> None:
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")


def window_starts(size: int, roi: int, overlap: float, placement: str = "even") -> list[int]:
    """Start indices of the windows along one axis of length ``size >= roi``.

    Args:
        size: axis length (already padded, so ``size >= roi``).
        roi: window length along this axis.
        overlap: wanted fraction of overlap between neighbours, in ``[0, 1)``.
        placement: ``"even"``: the fewest windows whose step is at most ``roi * (1 - overlap)``,
            spread evenly from 0 to ``size - roi`` (nnU-Net's rule). ``"monai"``: MONAI's
            ``dense_patch_slices`` rule: step ``int(roi * (1 - overlap))`` (at least 1), windows
            until one reaches the end, each window shifted back to end inside the axis.

    Returns:
        Sorted starts; the windows ``[s, s + roi)`` cover ``[0, size)``.
    """
    if roi < 1 or size < roi:
        raise ValueError(f"window_starts needs 1 <= roi <= size, got size={size}, roi={roi}")
    _check_overlap(overlap)
    if placement == "even":
        if size == roi:
            return [0]
        target_step = roi * (1.0 - overlap)
        n = int(math.ceil((size - roi) / target_step - 1e-9)) + 1
        step = (size - roi) / (n - 1)
        return [int(round(i * step)) for i in range(n)]
    if placement == "monai":
        interval = roi if size == roi else max(int(roi * (1.0 - overlap)), 1)
        n = 1
        while (n - 1) * interval + roi < size:
            n += 1
        return [i * interval - max(i * interval + roi - size, 0) for i in range(n)]
    raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")


def pad_widths(
    shape: Sequence[int], roi_size: Sequence[int], placement: str = "even", multiple: int = 32
) -> list[tuple[int, int]]:
    """Padding ``(before, after)`` per axis applied before windows are placed.

    ``"even"``: pad at the end to a multiple of ``multiple`` and at least ``roi_size``.
    ``"monai"``: as MONAI, pad only axes shorter than the window, split half before / half after.
    """
    if len(shape) != len(roi_size):
        raise ValueError(f"shape {tuple(shape)} and roi_size {tuple(roi_size)} differ in length")
    out = []
    for s, r in zip(shape, roi_size):
        if placement == "even":
            target = max(int(math.ceil(s / multiple)) * multiple, r)
            out.append((0, target - s))
        elif placement == "monai":
            diff = max(r - s, 0)
            out.append((diff // 2, diff - diff // 2))
        else:
            raise ValueError(f"placement must be one of {list(PLACEMENTS)}, got {placement!r}")
    return out


def _axis_starts(shape: Sequence[int], roi_size: Sequence[int], overlap: float, placement: str) -> list[list[int]]:
    if len(shape) != len(roi_size):
        raise ValueError(f"shape {tuple(shape)} and roi_size {tuple(roi_size)} differ in length")
    return [window_starts(s, r, overlap, placement) for s, r in zip(shape, roi_size)]


def plan_windows(
    shape: Sequence[int], roi_size: Sequence[int], overlap: float, placement: str = "even"
) -> list[tuple[slice, ...]]:
    """All windows covering an (already padded) array of ``shape``, in C order (last axis fastest).

    Args:
        shape: spatial shape, each axis at least the window (pad first, see :func:`pad_widths`).
        roi_size: window size per axis.
        overlap: see :func:`window_starts`.
        placement: ``"even"`` or ``"monai"``; see :func:`window_starts`.

    Returns:
        One tuple of slices per window; together they cover every voxel.
    """
    starts = _axis_starts(shape, roi_size, overlap, placement)
    return [
        tuple(slice(s, s + r) for s, r in zip(corner, roi_size)) for corner in itertools.product(*starts)
    ]


# ----------------------------------------------------------------------------------------------
# 2. Blending weights
# ----------------------------------------------------------------------------------------------


def gaussian_importance_map(
    roi_size: Sequence[int],
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Gaussian window weights, as MONAI's ``compute_importance_map(mode="gaussian")``.

    The weight along each axis is ``exp(-d**2 / (2 sigma**2))`` with ``d`` the distance to the window
    centre and ``sigma = sigma_scale * roi``; the map is their product (1 at the centre for odd sizes),
    clamped below at ``max(min(map), 1e-3)`` so window borders still count.

    Returns:
        ``dtype`` tensor of shape ``roi_size`` on ``device``.
    """
    scales = [float(sigma_scale)] * len(roi_size) if np.isscalar(sigma_scale) else [float(s) for s in sigma_scale]  # type: ignore[arg-type]
    if len(scales) != len(roi_size):
        raise ValueError(f"sigma_scale {sigma_scale} does not match roi_size {tuple(roi_size)}")
    result: torch.Tensor | None = None
    for axis, (r, sc) in enumerate(zip(roi_size, scales)):
        sigma = sc * r
        if sigma <= 0:
            raise ValueError(f"sigma_scale must be positive, got {sigma_scale}")
        d = torch.arange(r, dtype=torch.float32, device=device) - (r - 1) / 2.0
        g = torch.exp(d**2 / (-2.0 * sigma**2))
        g = g.reshape([r if i == axis else 1 for i in range(len(roi_size))])
        result = g if result is None else result * g
    assert result is not None
    floor = max(float(result.min()), 1e-3)
    return result.clamp_(min=floor).to(dtype)


def importance_map(
    roi_size: Sequence[int],
    blend: str = "gaussian",
    sigma_scale: float | Sequence[float] = 0.125,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-window blending weights: ``"gaussian"`` (:func:`gaussian_importance_map`) or ``"constant"`` (ones)."""
    if blend == "gaussian":
        return gaussian_importance_map(roi_size, sigma_scale, device=device, dtype=dtype)
    if blend == "constant":
        return torch.ones(tuple(roi_size), device=device, dtype=dtype)
    raise ValueError(f"blend must be one of {list(BLENDS)}, got {blend!r}")


def _shift_add(
    part: torch.Tensor, size: int, starts: Sequence[int], axis: int, offset: int = 0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``sum_s part`` pasted at ``s - offset`` along ``axis`` into a zero array whose ``axis`` has ``size``
    (``out``, zeroed here, when given)."""
    out_shape = list(part.shape)
    out_shape[axis] = size
    if out is None:
        out = torch.zeros(out_shape, dtype=part.dtype, device=part.device)
    else:
        out.zero_()
    r = part.shape[axis]
    for s in starts:
        lo, hi = max(s - offset, 0), min(s - offset + r, size)
        if lo >= hi:
            continue
        dst = [slice(None)] * part.ndim
        src = [slice(None)] * part.ndim
        dst[axis] = slice(lo, hi)
        src[axis] = slice(lo - (s - offset), hi - (s - offset))
        out[tuple(dst)] += part[tuple(src)]
    return out


def window_weight_sum_chunks(
    shape: Sequence[int], starts: Sequence[Sequence[int]], weights: torch.Tensor, chunk: int = 32
) -> Iterator[tuple[int, torch.Tensor]]:
    """The normalizer of :func:`window_weight_sum` in slabs of ``chunk`` Z slices.

    The (Y, X) shift-and-add is done once; each slab then costs one shift-and-add along Z into a
    reused buffer, so a whole volume is normalized without a second full-size array.

    Yields:
        ``(z0, sums)``: ``sums`` is the ``(n, Y, X)`` normalizer of slices ``z0 .. z0 + n``
        (``n <= chunk``), a view of a buffer that the next slab overwrites.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    part = weights
    for axis in reversed(range(1, weights.ndim)):
        part = _shift_add(part, shape[axis], starts[axis], axis)
    buf = torch.empty((min(chunk, shape[0]), *part.shape[1:]), dtype=part.dtype, device=part.device)
    for z0 in range(0, shape[0], chunk):
        n = min(chunk, shape[0] - z0)
        yield z0, _shift_add(part, n, starts[0], 0, offset=z0, out=buf[:n])


def window_weight_sum(
    shape: Sequence[int], starts: Sequence[Sequence[int]], weights: torch.Tensor
) -> torch.Tensor:
    """Sum of ``weights`` pasted at every window of a Cartesian grid of starts: the normalizer.

    Computed axis by axis (shift-and-add along X, then Y, then Z), which is exact for any weight
    map and costs ``sum_axis n_axis * (size of the partial sum)`` instead of ``n_windows * roi**3``.

    Args:
        shape: padded spatial shape ``(Z, Y, X)``.
        starts: window starts per axis (as from :func:`window_starts`).
        weights: ``(z, y, x)`` weight map of one window.

    Returns:
        ``(Z, Y, X)`` tensor, same dtype and device as ``weights``.
    """
    (_, sums), = window_weight_sum_chunks(shape, starts, weights, chunk=max(int(shape[0]), 1))
    return sums


def _normalize_by_weight_sum(
    acc: torch.Tensor, starts: Sequence[Sequence[int]], weights: torch.Tensor, chunk: int = 32
) -> None:
    """``acc /= window_weight_sum(acc.shape, starts, weights)`` in place, ``chunk`` Z slices at a
    time (:func:`window_weight_sum_chunks`: no second full-size array)."""
    for z0, sums in window_weight_sum_chunks(acc.shape, starts, weights, chunk):
        acc[z0 : z0 + sums.shape[0]] /= sums


# ----------------------------------------------------------------------------------------------
# 3. Test-time augmentation
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TTATransform:
    """A flip of some spatial axes followed by ``rot90`` quarter turns in the (Y, X) plane.

    Attributes:
        flip_axes: spatial axes to flip, a subset of ``(0, 1, 2)`` = ``(Z, Y, X)``.
        rot90: number of quarter turns in the (Y, X) plane (needs square windows when odd).
    """

    flip_axes: tuple[int, ...] = ()
    rot90: int = 0

    def __post_init__(self) -> None:
        if any(a not in (0, 1, 2) for a in self.flip_axes):
            raise ValueError(f"TTATransform.flip_axes must be a subset of (0, 1, 2), got {self.flip_axes}")
        object.__setattr__(self, "flip_axes", tuple(sorted(set(self.flip_axes))))
        object.__setattr__(self, "rot90", int(self.rot90) % 4)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform ``(B, C, Z, Y, X)`` windows."""
        if self.flip_axes:
            x = torch.flip(x, [a + 2 for a in self.flip_axes])
        if self.rot90:
            x = torch.rot90(x, self.rot90, dims=(3, 4))
        return x

    def invert(self, y: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`apply` on ``(B, C, Z, Y, X)`` outputs."""
        if self.rot90:
            y = torch.rot90(y, -self.rot90, dims=(3, 4))
        if self.flip_axes:
            y = torch.flip(y, [a + 2 for a in self.flip_axes])
        return y


def tta_transforms(tta: str | Sequence[TTATransform] | None) -> list[TTATransform]:
    """Resolve ``tta`` into a list of transforms (the identity first).

    Presets: ``"none"`` (1 pass), ``"flips"`` (all 8 subsets of flipped axes), ``"rot90"``
    (4 quarter turns in Y-X), ``"flips+rot90"`` (the 16 distinct flips and in-plane rotations).
    """
    if tta is None or tta == "none":
        return [TTATransform()]
    if isinstance(tta, str):
        if tta == "flips":
            return [TTATransform(tuple(a for a in range(3) if m >> a & 1)) for m in range(8)]
        if tta == "rot90":
            return [TTATransform((), k) for k in range(4)]
        if tta == "flips+rot90":
            return [
                TTATransform(((0,) if fz else ()) + ((2,) if fx else ()), k)
                for fz in (0, 1) for fx in (0, 1) for k in range(4)
            ]
        raise ValueError(f"tta must be one of {list(TTA_PRESETS)} or a list of TTATransform, got {tta!r}")
    out = list(tta)
    if not out or not all(isinstance(t, TTATransform) for t in out):
        raise ValueError(f"tta must be a preset name or a non-empty list of TTATransform, got {tta!r}")
    return out


# ----------------------------------------------------------------------------------------------
# 4. Predicting a batch of windows
# ----------------------------------------------------------------------------------------------


def _activate(x: torch.Tensor, activation: str | Callable | None) -> torch.Tensor:
    if activation is None:
        return x
    if activation == "sigmoid":
        return torch.sigmoid(x)
    if callable(activation):
        return activation(x)
    raise ValueError(f"activation must be 'sigmoid', None or a callable, got {activation!r}")


def predict_windows(
    models: Sequence[nn.Module],
    windows: torch.Tensor,
    weights: Sequence[float],
    transforms: Sequence[TTATransform],
    activation: str | Callable | None = "sigmoid",
    ensemble: str = "probs",
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """Run a batch of windows through every model and TTA transform and merge the results.

    Args:
        models: models mapping ``(B, 1, z, y, x)`` to ``(B, 1, z, y, x)`` logits, on the windows' device.
        windows: ``(B, 1, z, y, x) float32`` input windows.
        weights: one weight per model, summing to 1.
        transforms: TTA transforms; each output is un-done before averaging (uniformly).
        activation: ``"sigmoid"``, ``None`` or a callable; with ``ensemble="probs"`` it is applied
            to every pass before averaging, with ``"logits"`` not at all (the caller applies it
            after blending).
        ensemble: ``"probs"`` or ``"logits"``.
        amp_dtype: autocast dtype, or ``None``.
        channels_last: feed inputs in ``channels_last_3d`` memory format.

    Returns:
        ``(B, z, y, x) float32`` merged predictions.
    """
    merged: torch.Tensor | None = None
    n_t = len(transforms)
    for model, w in zip(models, weights):
        for t in transforms:
            x = t.apply(windows)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            autocast = (
                torch.autocast(windows.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
            )
            with autocast:
                y = model(x)
            if not isinstance(y, torch.Tensor) or y.shape != x.shape:
                got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise ValueError(
                    f"model output must be a tensor of the input window's shape {tuple(x.shape)} "
                    f"(one logit channel), got {got}"
                )
            y = t.invert(y.float())[:, 0]
            if ensemble == "probs":
                y = _activate(y, activation)
            scale = float(w) / n_t
            if merged is None:
                merged = y * scale if scale != 1.0 else y.contiguous()
            else:
                merged.add_(y, alpha=scale)
    assert merged is not None
    return merged


# ----------------------------------------------------------------------------------------------
# 5. Out-of-memory fallback
# ----------------------------------------------------------------------------------------------


def run_with_oom_fallback(
    run: Callable[[int, torch.device | str], T],
    batch_size: int,
    accumulate_device: torch.device | str,
    fallback_device: torch.device | str = "cpu",
) -> T:
    """Call ``run(batch_size, accumulate_device)``; on CUDA out-of-memory retry with less memory.

    The policy: halve the window batch down to 1; then move accumulation to ``fallback_device``
    (with batch 1). Each retry is announced with a :class:`RuntimeWarning` (and a log line). The
    last error is re-raised only when batch 1 with accumulation on ``fallback_device`` fails too.

    Args:
        run: does the whole job for a given window batch size and accumulation device.
        batch_size: the first batch size to try.
        accumulate_device: the first accumulation device to try.
        fallback_device: accumulation device of the last attempt.
    """
    attempts: list[tuple[int, torch.device | str]] = [(batch_size, accumulate_device)]
    bs = batch_size
    while bs > 1:
        bs //= 2
        attempts.append((bs, accumulate_device))
    if torch.device(accumulate_device) != torch.device(fallback_device):
        attempts.append((1, fallback_device))
    for i, (bs, dev) in enumerate(attempts):
        try:
            return run(bs, dev)
        except torch.cuda.OutOfMemoryError:
            if i == len(attempts) - 1:
                raise
        # outside the except block, so the traceback no longer holds the failed attempt's tensors
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        nbs, ndev = attempts[i + 1]
        msg = (
            f"CUDA out of memory with window batch {bs} and accumulation on {dev}; "
            f"retrying with window batch {nbs} and accumulation on {ndev}"
        )
        logger.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------------------------
# 6. The whole volume
# ----------------------------------------------------------------------------------------------


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


@dataclasses.dataclass(frozen=True)
class WindowPlan:
    """Everything the window loop needs for one volume, fixed before the first window runs.

    Built by :func:`make_window_plan`; consumed by the steps of :func:`sliding_window_predict`.

    Attributes:
        models: the models (an ensemble when several), in eval mode on ``device``.
        weights: one weight per model, summing to 1.
        transforms: TTA passes (:func:`tta_transforms`), the identity first.
        shape: input volume shape ``(Z, Y, X)``.
        roi: window size ``(z, y, x)``.
        pads: ``(before, after)`` padding per axis (:func:`pad_widths`).
        starts: window starts per axis of the padded volume (:func:`window_starts`).
        windows: slices of every window in the padded volume, C order (:func:`plan_windows`).
        settings: the :class:`InferenceConfig` (blend, sigma, ensemble mode, channels_last, ...) the
            plan was made from; the one list of window settings.
        activation: ``"sigmoid"``, ``None`` or a callable.
        amp_dtype: autocast dtype, or ``None`` (:func:`~kaggle_utils.device.resolve_amp_dtype` of ``settings.amp``).
        device: where the models run.
        padding_mode: ``torch.nn.functional.pad`` mode.
    """

    models: tuple[nn.Module, ...]
    weights: tuple[float, ...]
    transforms: tuple[TTATransform, ...]
    shape: tuple[int, ...]
    roi: tuple[int, ...]
    pads: tuple[tuple[int, int], ...]
    starts: tuple[tuple[int, ...], ...]
    windows: tuple[tuple[slice, ...], ...]
    settings: InferenceConfig = dataclasses.field(default_factory=lambda: InferenceConfig())
    activation: str | Callable | None = "sigmoid"
    amp_dtype: torch.dtype | None = None
    device: torch.device = torch.device("cpu")
    padding_mode: str = "constant"

    @property
    def padded_shape(self) -> tuple[int, ...]:
        """Shape of the padded volume the windows are cut from."""
        return tuple(s + a + b for s, (a, b) in zip(self.shape, self.pads))

    @property
    def crop(self) -> tuple[slice, ...]:
        """Slices of the padded volume that hold the input volume."""
        return tuple(slice(a, a + s) for (a, _), s in zip(self.pads, self.shape))


def _model_weights(n: int, weights: Sequence[float] | None) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / n,) * n
    if len(weights) != n or any(x < 0 for x in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be {n} non-negative numbers with a positive sum, got {weights}")
    return tuple(float(x) / float(sum(weights)) for x in weights)


def make_window_plan(
    models: nn.Module | Sequence[nn.Module],
    shape: Sequence[int],
    settings: InferenceConfig,
    *,
    tta: str | Sequence[TTATransform] | None = None,
    device: torch.device | str | None = None,
    activation: str | Callable | None = "sigmoid",
    weights: Sequence[float] | None = None,
    pad_multiple: int = 32,
    padding_mode: str = "constant",
) -> WindowPlan:
    """Plan the windows of a ``shape`` volume under ``settings`` (the window settings, checked once
    by :class:`InferenceConfig`); ``tta`` replaces ``settings.tta`` when given (a list of
    :class:`TTATransform`, e.g. after a time-budget cut). Raises ``ValueError`` naming the bad setting."""
    model_list = [models] if isinstance(models, nn.Module) else list(models)
    if not model_list:
        raise ValueError("sliding_window_predict: no models given")
    w = _model_weights(len(model_list), weights)
    if settings.ensemble not in ENSEMBLES:
        raise ValueError(f"ensemble must be one of {list(ENSEMBLES)}, got {settings.ensemble!r}")
    if len(shape) != 3:
        raise ValueError(f"volume must be (Z, Y, X), got shape {tuple(shape)}")
    roi = tuple(settings.patch_size)
    transforms = tuple(tta_transforms(settings.tta if tta is None else tta))
    if any(t.rot90 % 2 for t in transforms) and roi[1] != roi[2]:
        raise ValueError(f"90-degree TTA rotations need square (Y, X) windows, got patch_size {roi}")
    dev = torch.device(device) if device is not None else _default_device()
    shape = tuple(int(s) for s in shape)
    pads = tuple(pad_widths(shape, roi, settings.placement, pad_multiple))
    padded = [s + a + b for s, (a, b) in zip(shape, pads)]
    return WindowPlan(
        models=tuple(model_list), weights=w, transforms=transforms, shape=shape, roi=roi, pads=pads,
        starts=tuple(tuple(s) for s in _axis_starts(padded, roi, settings.overlap, settings.placement)),
        windows=tuple(plan_windows(padded, roi, settings.overlap, settings.placement)), settings=settings,
        activation=activation, amp_dtype=resolve_amp_dtype(settings.amp, dev), device=dev, padding_mode=padding_mode,
    )


def window_settings(settings: "InferenceConfig | dict | int | Sequence[int] | None" = None,
                    **window: Any) -> tuple["InferenceConfig", list[TTATransform] | None]:
    """The window settings of one call: ``settings`` with ``window`` (any :class:`InferenceConfig` fields)
    on top, checked once by :class:`InferenceConfig`.

    Args:
        settings: an :class:`InferenceConfig`, a dict of its keys, a patch size alone (an int: a cube, or
            ``(z, y, x)``; the rest at their defaults), or ``None`` (the defaults).
        **window: :class:`InferenceConfig` fields replacing those of ``settings`` (``overlap=0.25``,
            ``tta="flips"``); ``tta`` may also be a list of :class:`TTATransform` (or ``None``: no TTA).

    Returns:
        ``(settings, transforms)``: ``transforms`` is the ``tta`` list when one was given, else ``None``.

    Raises:
        TypeError: a keyword that is no :class:`InferenceConfig` field (the message lists them).
        ValueError: a setting out of range (naming it).
    """
    fields = [f.name for f in dataclasses.fields(InferenceConfig)]
    unknown = sorted(set(window) - set(fields))
    if unknown:
        raise TypeError(f"sliding_window_predict: unknown setting(s) {unknown}; the window settings are "
                        f"InferenceConfig's fields: {', '.join(fields)}")
    if settings is None or isinstance(settings, (InferenceConfig, dict)):
        cfg = as_inference_config(settings)
    else:
        cfg = InferenceConfig(patch_size=settings)
    transforms = None
    if "tta" in window and not isinstance(window["tta"], str):
        tta = window.pop("tta")
        transforms = None if tta is None else list(tta)
        window["tta"] = "none"
    return (dataclasses.replace(cfg, **window) if window else cfg), transforms


def sliding_window_predict(
    models: nn.Module | Sequence[nn.Module],
    volume: np.ndarray | torch.Tensor,
    settings: "InferenceConfig | dict | int | Sequence[int] | None" = None,
    *,
    device: torch.device | str | None = None,
    activation: str | Callable | None = "sigmoid",
    weights: Sequence[float] | None = None,
    sw_device: torch.device | str | None = None,
    accumulate_device: torch.device | str | None = None,
    progress: bool = False,
    pad_multiple: int = 32,
    padding_mode: str = "constant",
    **window: Any,
) -> np.ndarray:
    """Predict a whole volume window by window and blend the windows.

    The steps: plan the windows (:func:`make_window_plan`), pad the volume once and keep it on
    ``sw_device``; then per batch of windows: cut, predict with every model and TTA pass
    (:func:`predict_windows`), add ``weight * prediction`` (``float32``) on ``accumulate_device``;
    finally divide by the summed weights (:func:`window_weight_sum_chunks`), crop back and return
    on the CPU. Runs under :func:`torch.inference_mode`; the models are put in ``eval()`` mode on
    ``device`` (``channels_last_3d`` when asked). Usually called through :func:`predict_volume`.

    The window settings (patch size, overlap, batch size, blend and sigma, TTA, AMP, ensemble mode,
    channels_last, placement) are :class:`InferenceConfig`'s fields, listed and checked there only:
    pass an :class:`InferenceConfig` (or just a patch size) as ``settings`` and/or any of its fields as
    keywords, e.g. ``sliding_window_predict(net, vol, 128, overlap=0.25, tta="flips")``
    (:func:`window_settings`).

    Args:
        models: one model or a list (an ensemble), each mapping ``(B, 1, z, y, x)`` windows to
            ``(B, 1, z, y, x)`` logits.
        volume: ``float32 (Z, Y, X)`` numpy array or tensor, already normalized.
        settings: :class:`InferenceConfig`, a dict of its keys, a patch size (int: a cube), or ``None``.
        device: where the models run; default CUDA when available, else CPU.
        activation: ``"sigmoid"`` (probabilities), ``None`` (blended raw outputs) or a callable.
        weights: one non-negative weight per model (normalized to sum 1); default equal.
        sw_device: where the padded volume is kept and windows are cut; default ``device``.
        accumulate_device: where the blended sums live; default ``device``.
        progress: show a tqdm bar over window batches.
        pad_multiple: ``"even"`` placement pads each axis to a multiple of this.
        padding_mode: ``torch.nn.functional.pad`` mode (``"constant"`` pads with 0).
        **window: :class:`InferenceConfig` fields replacing those of ``settings``; ``tta`` may also be a
            list of :class:`TTATransform`.

    Returns:
        ``float32 (Z, Y, X)`` numpy array: probabilities, or blended raw outputs if ``activation=None``.

    On CUDA out-of-memory the run is retried with half the batch, then with accumulation (and the
    padded volume) on the CPU, with a warning (:func:`run_with_oom_fallback`).
    """
    cfg, transforms = window_settings(settings, **window)
    plan = make_window_plan(models, tuple(volume.shape), cfg, tta=transforms, device=device,
                            activation=activation, weights=weights, pad_multiple=pad_multiple, padding_mode=padding_mode)
    vol = torch.as_tensor(volume)
    if not vol.is_floating_point():
        raise ValueError(f"volume must be float (already normalized), got {vol.dtype}")
    _prepare_models(plan.models, plan.device, cfg.channels_last)
    sw_dev = torch.device(sw_device) if sw_device is not None else plan.device
    acc_dev = torch.device(accumulate_device) if accumulate_device is not None else plan.device
    run = functools.partial(_pad_and_run_windows, plan, vol, sw_dev, acc_dev, progress)
    return run_with_oom_fallback(run, cfg.batch_size, acc_dev)


def _prepare_models(models: Sequence[nn.Module], device: torch.device, channels_last: bool) -> None:
    """Put every model in ``eval()`` mode on ``device`` (in place), ``channels_last_3d`` when asked."""
    for m in models:
        m.eval().to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last_3d)


def _pad_and_run_windows(
    plan: WindowPlan,
    vol: torch.Tensor,
    sw_dev: torch.device,
    acc_dev: torch.device,
    progress: bool,
    bs: int,
    acc_device: torch.device | str,
) -> np.ndarray:
    """One attempt of :func:`sliding_window_predict` (the callable of :func:`run_with_oom_fallback`).

    Pads ``vol`` (``float (Z, Y, X)``) as ``float32`` on ``sw_dev`` (on ``acc_device`` once the
    fallback moved accumulation off ``acc_dev``: the volume goes to the CPU too), then predicts and
    blends every window with batches of ``bs`` under :func:`torch.inference_mode`.

    Returns:
        ``float32 (Z, Y, X)`` numpy array, as :func:`sliding_window_predict`.
    """
    acc_device = torch.device(acc_device)
    vol_device = sw_dev if acc_device == acc_dev else acc_device
    with torch.inference_mode():
        padded = _pad_volume(vol.to(vol_device, torch.float32), plan.pads, plan.padding_mode)
        return _run_windows(plan, padded, bs, acc_device, progress)


def _pad_volume(vol: torch.Tensor, pads: Sequence[tuple[int, int]], mode: str) -> torch.Tensor:
    if not any(a or b for a, b in pads):
        return vol
    flat = [p for a_b in reversed(pads) for p in a_b]  # F.pad wants the last axis first
    if mode == "constant":
        return F.pad(vol, flat, mode="constant", value=0.0)
    return F.pad(vol[None, None], flat, mode=mode)[0, 0]


def _window_batches(
    windows: Sequence[tuple[slice, ...]], batch_size: int, progress: bool
) -> Iterable[Sequence[tuple[slice, ...]]]:
    """Step 2: the planned windows in batches of ``batch_size`` (a tqdm bar when ``progress``)."""
    batches: Iterable = _batches(windows, batch_size)
    if progress:
        from .progress import progress_bar

        batches = progress_bar(batches, total=math.ceil(len(windows) / batch_size), desc="windows", leave=False)
    return batches


def _accumulate(acc: torch.Tensor, windows: Sequence[tuple[slice, ...]], pred: torch.Tensor,
                wmap: torch.Tensor) -> None:
    """Step 4: ``acc[window] += wmap * pred[i]`` for every window of the batch (``pred``: ``(B, z, y, x)``)."""
    for sl, p in zip(windows, pred):
        acc[sl].addcmul_(p, wmap)


def _crop(acc: torch.Tensor, plan: WindowPlan) -> np.ndarray:
    """Step 6: the input's part of the normalized sums (activated here for ``ensemble="logits"``)."""
    out = acc[plan.crop]
    if plan.settings.ensemble == "logits":
        out = _activate(out, plan.activation)
    return np.ascontiguousarray(out.cpu().numpy())


def _run_windows(plan: WindowPlan, padded: torch.Tensor, batch_size: int, acc_device: torch.device,
                 progress: bool = False) -> np.ndarray:
    """Batch → predict (+TTA) → accumulate → normalize → crop over ``padded`` (``(Zp, Yp, Xp)``)."""
    wmap = importance_map(plan.roi, plan.settings.blend, plan.settings.sigma_scale, device=acc_device)
    acc = torch.zeros(padded.shape, dtype=torch.float32, device=acc_device)
    buf = torch.empty((batch_size, 1, *plan.roi), dtype=padded.dtype, device=padded.device)  # reused per batch
    for batch in _window_batches(plan.windows, batch_size, progress):
        torch.stack([padded[sl] for sl in batch], out=buf[: len(batch), 0])
        pred = predict_windows(plan.models, buf[: len(batch)].to(plan.device), plan.weights, plan.transforms,
                               plan.activation, plan.settings.ensemble, plan.amp_dtype, plan.settings.channels_last)
        _accumulate(acc, batch, pred.to(acc_device), wmap)
    _normalize_by_weight_sum(acc, plan.starts, wmap)
    return _crop(acc, plan)


def as_inference_config(cfg: "InferenceConfig | dict | None") -> "InferenceConfig":
    """An :class:`InferenceConfig` from ``None`` (the defaults), a dict (YAML keys; unknown keys
    raise :class:`~kaggle_utils.config.ConfigError`) or an :class:`InferenceConfig` (returned as is)."""
    if cfg is None:
        return InferenceConfig()
    if isinstance(cfg, InferenceConfig):
        return cfg
    if isinstance(cfg, dict):
        from .config import from_dict

        return from_dict(InferenceConfig, cfg, "inference")
    raise TypeError(f"inference settings must be an InferenceConfig, a dict or None, got {type(cfg).__name__}")


def predict_volume(
    models: nn.Module | Sequence[nn.Module],
    volume: np.ndarray | torch.Tensor,
    cfg: "InferenceConfig | dict | None" = None,
    device: torch.device | str | None = None,
    *,
    pad_multiple: int = 32,
    **overrides: Any,
) -> np.ndarray:
    """Probabilities of one normalized volume under ``cfg``: THE path from settings to inference.

    Validation and out-of-fold writing in :mod:`kaggle_utils.train`, ``predict`` and the submit
    notebook all call this, so the same :class:`InferenceConfig` gives the same probabilities
    everywhere (ensemble mode and TTA included).

    Args:
        models: one model or an ensemble (see :func:`sliding_window_predict`).
        volume: ``float32 (Z, Y, X)``, already normalized (``data.normalize_intensity``).
        cfg: :class:`InferenceConfig`, a dict of its keys, or ``None`` for the defaults.
        device: where the models run; default CUDA when available.
        pad_multiple: pad to a multiple of this (``models.model_divisor``).
        **overrides: keyword arguments of :func:`sliding_window_predict` that replace the config's
            (e.g. ``tta`` as a list of :class:`TTATransform` after a time-budget cut, ``progress``).

    Returns:
        ``float32 (Z, Y, X)`` probabilities.
    """
    return sliding_window_predict(models, volume, as_inference_config(cfg), device=device, pad_multiple=pad_multiple,
                                  **overrides)


# ----------------------------------------------------------------------------------------------
# 7. Overlapping data loading with GPU work
# ----------------------------------------------------------------------------------------------


class VolumePrefetcher:
    """Iterate ``(id, loader_fn(id))`` while a background thread loads the next ``depth`` volumes.

    ``loader_fn`` (e.g. read + :func:`kaggle_utils.data.normalize_intensity`) runs in a daemon
    thread, so reading and normalizing volume ``i + 1`` overlaps the GPU work on volume ``i``
    (numpy, tifffile and torch release the GIL). An exception in ``loader_fn`` is re-raised in the
    consumer when it reaches that id. Use as an iterator, ideally in a ``with`` block so an early
    ``break`` stops the thread.

    Args:
        loader_fn: ``id -> volume`` (any object).
        ids: ids in processing order.
        depth: how many loaded volumes may wait in the queue (memory: ``depth + 1`` volumes).
    """

    _DONE = object()

    def __init__(self, loader_fn: Callable[[Any], Any], ids: Iterable[Any], depth: int = 1):
        if depth < 1:
            raise ValueError(f"VolumePrefetcher depth must be >= 1, got {depth}")
        self._loader_fn = loader_fn
        self._ids = list(ids)
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="VolumePrefetcher", daemon=True)
        self._started = False

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        for vid in self._ids:
            if self._stop.is_set():
                return
            try:
                item = (vid, self._loader_fn(vid), None)
            except BaseException as exc:  # handed to the consumer
                item = (vid, None, exc)
            if not self._put(item):
                return
        self._put(self._DONE)

    def __len__(self) -> int:
        return len(self._ids)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        if self._started:
            raise RuntimeError("VolumePrefetcher can be iterated only once")
        self._started = True
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is self._DONE:
                    return
                vid, vol, exc = item
                if exc is not None:
                    raise exc
                yield vid, vol
        finally:
            self.close()

    def close(self) -> None:
        """Stop the background thread (pending volumes are dropped)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    def __enter__(self) -> "VolumePrefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
