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

__all__ = ["VoiResult", "voi", "conditional_entropies"]


class VoiResult(NamedTuple):
    """VOI terms in bits and the score derived from them."""

    split: float
    merge: float
    voi: float
    score: float


def conditional_entropies(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Conditional entropies ``(H(a|b), H(b|a))`` in bits of two paired label sequences.

    Args:
        a: ``int (N,)`` non-negative labels.
        b: ``int (N,)`` non-negative labels, paired element-wise with ``a``.

    Returns:
        ``(H(a|b), H(b|a))``; ``(0.0, 0.0)`` when ``N == 0``.
    """
    a = np.asarray(a, dtype=np.int64).ravel()
    b = np.asarray(b, dtype=np.int64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"label sequences differ in length: {a.shape} vs {b.shape}")
    n = a.size
    if n == 0:
        return 0.0, 0.0
    na, nb = int(a.max()) + 1, int(b.max()) + 1
    keys = a * nb + b
    if na * nb <= 4 * n + 1024:  # dense histogram is cheap
        joint = np.bincount(keys, minlength=na * nb)
        cells = np.flatnonzero(joint)
        counts = joint[cells]
    else:
        cells, counts = np.unique(keys, return_counts=True)
    ca = np.bincount(a, minlength=na)  # marginal counts
    cb = np.bincount(b, minlength=nb)
    counts = counts.astype(np.float64)
    # H(a|b) = -sum p(a,b) log2 p(a,b)/p(b): every term is >= 0, no cancellation
    h_a_given_b = float(-(counts * np.log2(counts / cb[cells % nb])).sum() / n)
    h_b_given_a = float(-(counts * np.log2(counts / ca[cells // nb])).sum() / n)
    return max(0.0, h_a_given_b), max(0.0, h_b_given_a)


def voi(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.3, connectivity: int = 26) -> VoiResult:
    """VOI between the connected components of two binary volumes.

    Args:
        pred: ``(Z, Y, X)`` prediction; non-zero is foreground (ignore mask already applied).
        gt: ground truth, same shape; non-zero is foreground.
        alpha: strength of the score transform ``1 / (1 + alpha * VOI)`` (competition: 0.3).
        connectivity: 6, 18 or 26 (competition: 26).

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
    union = pred | gt
    box = []
    for axis in range(3):
        idx = np.flatnonzero(union.any(axis=tuple(i for i in range(3) if i != axis)))
        if idx.size == 0:
            return VoiResult(0.0, 0.0, 0.0, 1.0)
        box.append(slice(int(idx[0]), int(idx[-1]) + 1))
    pred, gt, union = pred[tuple(box)], gt[tuple(box)], union[tuple(box)]  # components do not change
    lab_pred = cc3d.connected_components(pred.view(np.uint8), connectivity=connectivity)
    lab_gt = cc3d.connected_components(gt.view(np.uint8), connectivity=connectivity)
    split, merge = conditional_entropies(lab_pred[union], lab_gt[union])
    total = split + merge
    return VoiResult(split, merge, total, 1.0 / (1.0 + alpha * total))
