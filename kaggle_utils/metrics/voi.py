"""Variation of information between the connected components of two binary volumes.

Each mask is labelled into 26-connected components (background is label 0). Over the voxels that
are foreground in *either* mask, the pair (pred label, gt label) of every voxel gives a joint
histogram, from which (in bits)::

    split = H(pred | gt)      # one GT component cut into several predicted ones
    merge = H(gt | pred)      # several GT components joined by the prediction
    VOI = split + merge,  score = 1 / (1 + alpha * VOI)

This is the competition's ``VOI_score`` with ``alpha = 0.3``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["VoiResult", "voi", "component_labels", "conditional_entropies", "joint_counts"]


class VoiResult(NamedTuple):
    """VOI terms in bits and the score derived from them."""

    split: float
    merge: float
    voi: float
    score: float


_DENSE_MAX_BINS = 1 << 22  # joint histograms up to this many cells are counted densely (32 MiB)
_CHUNK = 1 << 22  # voxels per chunk: keeps the int64 key temporaries small


def joint_counts(a: np.ndarray, b: np.ndarray, drop_background_pair: bool = False) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Sparse joint histogram of two paired label arrays, counted in chunks.

    Args:
        a, b: non-negative integer arrays of one shape (any dimensionality), paired element-wise.
        drop_background_pair: do not count pairs ``(0, 0)`` (voxels background in both).

    Returns:
        ``(cells, counts, na, nb)``: occupied cells ``a_label * nb + b_label`` (``int64``), their
        counts (``int64``), and the label ranges ``na = max(a) + 1``, ``nb = max(b) + 1``.
    """
    a = np.ascontiguousarray(a).reshape(-1)
    b = np.ascontiguousarray(b).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"label arrays differ in size: {a.size} vs {b.size}")
    if a.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 1, 1
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    dense = na * nb <= _DENSE_MAX_BINS
    joint = np.zeros(na * nb, np.int64) if dense else None
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, a.size, _CHUNK):
        ac, bc = a[start:start + _CHUNK], b[start:start + _CHUNK]
        if drop_background_pair:  # gather first: cheap when most voxels are background in both
            keep = (ac != 0) | (bc != 0)
            ac, bc = ac[keep], bc[keep]
        keys = ac.astype(np.int64) * nb + bc
        if dense:
            joint += np.bincount(keys, minlength=na * nb)
        else:
            parts.append(np.unique(keys, return_counts=True))
    if dense:
        cells = np.flatnonzero(joint)
        counts = joint[cells]
    else:
        keys = np.concatenate([u for u, _ in parts])
        cells, inverse = np.unique(keys, return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([c for _, c in parts])).astype(np.int64)
    return cells, counts, na, nb


def _entropies(cells: np.ndarray, counts: np.ndarray, na: int, nb: int) -> tuple[float, float]:
    n = counts.sum()
    if n == 0:
        return 0.0, 0.0
    ia, ib = cells // nb, cells % nb
    ca = np.bincount(ia, weights=counts, minlength=na)  # marginal counts
    cb = np.bincount(ib, weights=counts, minlength=nb)
    c = counts.astype(np.float64)
    # H(a|b) = -sum p(a,b) log2 p(a,b)/p(b): every term is >= 0, no cancellation
    h_a_given_b = float(-(c * np.log2(c / cb[ib])).sum() / n)
    h_b_given_a = float(-(c * np.log2(c / ca[ia])).sum() / n)
    return max(0.0, h_a_given_b), max(0.0, h_b_given_a)


def conditional_entropies(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Conditional entropies ``(H(a|b), H(b|a))`` in bits of two paired label sequences.

    Args:
        a: ``int (N,)`` non-negative labels.
        b: ``int (N,)`` non-negative labels, paired element-wise with ``a``.

    Returns:
        ``(H(a|b), H(b|a))``; ``(0.0, 0.0)`` when ``N == 0``.
    """
    return _entropies(*joint_counts(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))


def component_labels(gt: np.ndarray, connectivity: int = 26) -> np.ndarray:
    """Connected-component labels of a whole ground-truth mask (``(Z, Y, X)``, non-zero is
    foreground), for :func:`voi`'s ``gt_labels``: labels are numbered in raster order, so the crop
    :func:`voi` takes of them equals the labelling of the cropped mask."""
    import cc3d

    return cc3d.connected_components((np.asarray(gt) != 0).view(np.uint8), connectivity=connectivity)


def voi(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.3, connectivity: int = 26,
        gt_labels: np.ndarray | None = None) -> VoiResult:
    """VOI between the connected components of two binary volumes.

    Args:
        pred: ``(Z, Y, X)`` prediction; non-zero is foreground (ignore mask already applied).
        gt: ground truth, same shape; non-zero is foreground.
        alpha: strength of the score transform ``1 / (1 + alpha * VOI)`` (competition: 0.3).
        connectivity: 6, 18 or 26 (competition: 26).
        gt_labels: :func:`component_labels` of this ``gt`` with this connectivity (the caller guarantees
            it), to skip labelling the ground truth again.

    Returns:
        :class:`VoiResult` ``(split=H(pred|gt), merge=H(gt|pred), voi, score)``; both masks
        empty gives VOI 0 and score 1.
    """
    import cc3d

    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if connectivity not in (6, 18, 26):
        raise ValueError(f"connectivity must be 6, 18 or 26, got {connectivity}")
    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"voi needs two 3D volumes of one shape, got pred {pred.shape} and gt {gt.shape}")
    if gt_labels is not None and np.shape(gt_labels) != gt.shape:
        raise ValueError(f"voi: gt_labels shape {np.shape(gt_labels)} does not match gt {gt.shape}")
    union = pred | gt
    box = []
    for axis in range(3):
        idx = np.flatnonzero(union.any(axis=tuple(i for i in range(3) if i != axis)))
        if idx.size == 0:
            return VoiResult(0.0, 0.0, 0.0, 1.0)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    pred, gt = pred[tuple(box)], gt[tuple(box)]  # cropping does not change the components
    del union
    lab_pred = cc3d.connected_components(pred.view(np.uint8), connectivity=connectivity)
    if gt_labels is None:
        lab_gt = cc3d.connected_components(gt.view(np.uint8), connectivity=connectivity)
    else:
        lab_gt = np.asarray(gt_labels)[tuple(box)]
    # voxels outside the union are exactly the (0, 0) pairs: dropping them restricts to the union
    split, merge = _entropies(*joint_counts(lab_pred, lab_gt, drop_background_pair=True))
    total = split + merge
    return VoiResult(split, merge, total, 1.0 / (1.0 + alpha * total))
