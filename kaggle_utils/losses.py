"""Loss terms for binary surface segmentation with an ignore label, their composite, and presets.

Every term takes ``logits (B,1,Z,Y,X)`` (float16/bfloat16/float32) and ``target (B,1,Z,Y,X)``
integer labels ({0,1,2} in the competition) and returns a scalar float32 tensor.

One ignore mechanism (as ``ignore_index`` in segmentation_models_pytorch): :func:`apply_ignore`
computes ``valid = target != ignore_label`` once and zeroes prediction and target there
(logits are replaced by 0 *before* the sigmoid and the probability is then set to 0), so an
ignored voxel contributes nothing to any term and receives exactly zero gradient; the labels or
logits at ignored voxels cannot influence any value or gradient elsewhere. Every reduction that
averages divides by the number of *valid* voxels. ``ignore_label=None`` disables the mask.

Foreground is "non-zero and not ignored": with ``ignore_label=2`` that is ``label == 1``; with
``ignore_label=None`` it is ``label > 0``, which reproduces the seed's failing setup where label 2
(57.7 % of voxels) counts as surface (see ``docs/losses.md``).

All arithmetic runs in float32 with autocast disabled inside the loss, so the terms work under
``torch.autocast`` with float16/bfloat16.

Terms (registry names): ``dice``, ``bce``, ``focal``, ``boundary``, ``cldice``,
``skeleton_recall``, ``connectivity``, ``variance``, ``entropy``. Combine them with
:class:`CompositeLoss` or :func:`build_loss` (presets ``"default"``, ``"seed-v1"``, ``"seed-v2"``).

Deep supervision (``loss.deep_supervision: true``, nnU-Net's): :class:`DeepSupervisionLoss` applies
the composite to every decoder output of an nnU-Net network with :func:`deep_supervision_weights`
(``1/2^k`` normalised, the lowest resolution weighted 0) and labels reduced by
:func:`downsample_label`: a low-resolution voxel is *ignored* when any voxel of its block is ignored
(max-pool of the ignore mask), else *surface* when any voxel of its block is surface (max-pool of
the foreground), else background. Ignore therefore only grows with the scale, never shrinks: no
ignored voxel ever becomes supervised, and a 1–3 voxel thick sheet survives at 1/16 resolution
(nearest-neighbour sampling, nnU-Net's choice, would drop it from most blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError, from_dict

__all__ = [
    "TERM_NAMES",
    "PRESETS",
    "MaskedInput",
    "apply_ignore",
    "soft_dice_loss",
    "bce_loss",
    "focal_loss",
    "signed_distance_map",
    "boundary_loss",
    "soft_erode",
    "soft_dilate",
    "soft_skeleton",
    "cldice_loss",
    "skeleton_recall_loss",
    "connectivity_loss",
    "variance_regularizer",
    "entropy_regularizer",
    "DiceLoss",
    "BCELoss",
    "FocalLoss",
    "BoundaryLoss",
    "ClDiceLoss",
    "SkeletonRecallLoss",
    "ConnectivityLoss",
    "VarianceRegularizer",
    "EntropyRegularizer",
    "CompositeLoss",
    "DeepSupervisionLoss",
    "deep_supervision_weights",
    "downsample_label",
    "LossConfig",
    "build_loss",
]

TERM_NAMES = (
    "dice", "bce", "focal", "boundary", "cldice", "skeleton_recall", "connectivity", "variance", "entropy",
)
RegForm = Literal["v1", "v2"]


# ----------------------------------------------------------------------------------------------
# The ignore mechanism
# ----------------------------------------------------------------------------------------------


class MaskedInput(NamedTuple):
    """Prediction and target after the ignore mask; every tensor float32 ``(B,1,Z,Y,X)``.

    ``logits`` and ``prob`` are 0 at ignored voxels (``prob = sigmoid(logits) * valid``),
    ``target`` is the binary foreground (0 at ignored voxels), ``valid`` is 1 where counted.
    """

    logits: Tensor
    prob: Tensor
    target: Tensor
    valid: Tensor


def apply_ignore(logits: Tensor, target: Tensor, ignore_label: int | None = 2) -> MaskedInput:
    """Cast to float32 and apply the ignore mask once.

    Args:
        logits: ``(B,1,Z,Y,X)`` float16/bfloat16/float32 raw scores.
        target: ``(B,1,Z,Y,X)`` integer labels (uint8/int); foreground = non-zero and not ignored.
        ignore_label: label whose voxels are excluded; ``None`` counts every voxel.

    Raises:
        ValueError: shapes differ, are not 5-D with one channel, or target is floating point.
    """
    if logits.ndim != 5 or logits.shape[1] != 1:
        raise ValueError(f"logits must have shape (B,1,Z,Y,X), got {tuple(logits.shape)}")
    if target.shape != logits.shape:
        raise ValueError(f"target shape {tuple(target.shape)} differs from logits shape {tuple(logits.shape)}")
    if target.is_floating_point():
        raise ValueError(f"target must hold integer labels (uint8/int), got {target.dtype}")
    target = target.to(logits.device)
    if ignore_label is None:
        valid_b = torch.ones_like(target, dtype=torch.bool)
    else:
        valid_b = target != ignore_label
    z = torch.where(valid_b, logits.float(), torch.zeros((), device=logits.device))
    valid = valid_b.float()
    prob = torch.sigmoid(z) * valid
    fg = ((target != 0) & valid_b).float()
    return MaskedInput(z, prob, fg, valid)


def _disable_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


# ----------------------------------------------------------------------------------------------
# Region terms
# ----------------------------------------------------------------------------------------------


def soft_dice_loss(m: MaskedInput, smooth: float = 1.0, batch: bool = False, eps: float = 1e-7) -> Tensor:
    """Soft Dice loss ``1 - (2 Σ p g + s) / (Σ p + Σ g + s)`` over valid voxels.

    Args:
        m: output of :func:`apply_ignore`.
        smooth: ``s``, added to numerator and denominator.
        batch: sum over the whole batch (one Dice, nnU-Net's ``batch_dice``); otherwise one Dice per
            sample, averaged over samples that have at least one valid voxel.
    """
    dims = (0, 1, 2, 3, 4) if batch else (1, 2, 3, 4)
    inter = (m.prob * m.target).sum(dims)
    denom = m.prob.sum(dims) + m.target.sum(dims)
    loss = 1.0 - (2.0 * inter + smooth) / (denom + smooth).clamp_min(eps)
    if batch:
        return loss
    has = m.valid.sum(dims) > 0
    return (loss * has).sum() / has.sum().clamp_min(1)


def _valid_mean(x: Tensor, valid: Tensor) -> Tensor:
    return (x * valid).sum() / valid.sum().clamp_min(1.0)


def bce_loss(m: MaskedInput) -> Tensor:
    """Binary cross-entropy with logits, mean over valid voxels: ``-[g log p + (1-g) log(1-p)]``."""
    ce = F.binary_cross_entropy_with_logits(m.logits, m.target, reduction="none")
    return _valid_mean(ce, m.valid)


def focal_loss(m: MaskedInput, gamma: float = 2.0, alpha: float | None = None) -> Tensor:
    """Focal loss ``-α_t (1 - p_t)^γ log p_t``, mean over valid voxels (Lin et al. 2017).

    ``p_t = p`` where ``g = 1`` else ``1 - p``; ``α_t = α`` for foreground, ``1 - α`` for
    background; ``alpha=None`` weights both classes 1. ``gamma=0, alpha=None`` equals BCE.
    """
    ce = F.binary_cross_entropy_with_logits(m.logits, m.target, reduction="none")
    p_t = torch.exp(-ce)
    loss = (1.0 - p_t).clamp_min(0.0).pow(gamma) * ce
    if alpha is not None:
        loss = loss * (alpha * m.target + (1.0 - alpha) * (1.0 - m.target))
    return _valid_mean(loss, m.valid)


# ----------------------------------------------------------------------------------------------
# Boundary (distance-transform) term
# ----------------------------------------------------------------------------------------------


def _edt(mask: np.ndarray) -> np.ndarray:
    """Euclidean distance of every True voxel to the nearest False voxel (0 on False voxels)."""
    try:
        import edt

        return edt.edt(np.ascontiguousarray(mask), black_border=False, parallel=1).astype(np.float32)
    except ImportError:  # pragma: no cover - edt is optional, scipy is a runtime dependency
        from scipy.ndimage import distance_transform_edt

        return distance_transform_edt(mask).astype(np.float32)


def signed_distance_map(
    target: Tensor | np.ndarray, ignore_label: int | None = 2, max_distance: float | None = None
) -> Tensor:
    """Signed Euclidean distance to the target surface, computed on the CPU (``edt`` or scipy).

    ``φ = d_out - d_in``: outside the foreground ``d_out`` is the distance to the nearest
    foreground voxel (positive), inside ``d_in`` is the distance to the nearest non-foreground
    voxel (foreground voxels are ≤ -1). Ignored voxels count as non-foreground (their labels are
    unknown); the loss multiplies them by 0 anyway. A sample with no foreground gets ``φ = 0``
    (the distance is undefined; Dice/BCE handle empty patches), and so does a sample that is all
    foreground. ``max_distance`` clips ``|φ|``.

    Args:
        target: ``(B,1,Z,Y,X)`` integer labels (torch or numpy).

    Returns:
        float32 ``(B,1,Z,Y,X)`` tensor on the CPU (torch input: on the target's device).
    """
    device = target.device if isinstance(target, Tensor) else torch.device("cpu")
    lab = target.detach().cpu().numpy() if isinstance(target, Tensor) else np.asarray(target)
    fg = lab != 0
    if ignore_label is not None:
        fg &= lab != ignore_label
    out = np.zeros(lab.shape, dtype=np.float32)
    for b in range(lab.shape[0]):
        f = fg[b, 0]
        if not f.any() or f.all():
            continue
        out[b, 0] = _edt(~f) - _edt(f)
    if max_distance is not None:
        np.clip(out, -max_distance, max_distance, out=out)
    return torch.from_numpy(out).to(device)


def boundary_loss(m: MaskedInput, dist: Tensor) -> Tensor:
    """Boundary loss (Kervadec et al. 2019) shifted to be 0 at the optimum: ``mean_valid((p - g) φ)``.

    ``φ`` is the signed distance map of the target (:func:`signed_distance_map`); because ``φ < 0``
    on the foreground and ``φ > 0`` outside, every summand is ≥ 0 and the minimum is the target.
    The gradient ``∂/∂p = φ`` is that of the original ``mean(p φ)``.
    """
    dist = dist.to(m.prob.device, torch.float32)
    return _valid_mean((m.prob - m.target) * dist, m.valid)


# ----------------------------------------------------------------------------------------------
# Skeleton terms
# ----------------------------------------------------------------------------------------------


def soft_erode(x: Tensor) -> Tensor:
    """Soft erosion of ``(B,C,Z,Y,X)``: minimum over the 6-neighbour cross (three 1-D min-pools of 3)."""
    a = -F.max_pool3d(-x, (3, 1, 1), 1, (1, 0, 0))
    b = -F.max_pool3d(-x, (1, 3, 1), 1, (0, 1, 0))
    c = -F.max_pool3d(-x, (1, 1, 3), 1, (0, 0, 1))
    return torch.minimum(torch.minimum(a, b), c)


def soft_dilate(x: Tensor) -> Tensor:
    """Soft dilation of ``(B,C,Z,Y,X)``: maximum over the 3×3×3 cube."""
    return F.max_pool3d(x, 3, 1, 1)


def soft_skeleton(x: Tensor, iters: int = 3) -> Tensor:
    """Soft morphological skeleton (Shit et al. 2021) by iterated min/max pooling.

    ``S_0 = relu(x - open(x))``; for ``k = 1..iters``: ``x ← erode(x)``,
    ``δ = relu(x - open(x))``, ``S ← S + relu(δ - S δ)``, with ``open = dilate ∘ erode``.
    Values stay in [0, 1] for x in [0, 1]; a binary input gives a binary skeleton inside it.

    Shape: ``(B,C,Z,Y,X)`` in and out.
    """
    skel = F.relu(x - soft_dilate(soft_erode(x)))
    for _ in range(iters):
        x = soft_erode(x)
        delta = F.relu(x - soft_dilate(soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def cldice_loss(m: MaskedInput, iters: int = 3, smooth: float = 1.0) -> Tensor:
    """clDice loss ``1 - 2 T_prec T_sens / (T_prec + T_sens)`` over the whole batch.

    ``T_prec = (Σ S(p) g + s) / (Σ S(p) + s)``, ``T_sens = (Σ S(g) p + s) / (Σ S(g) + s)``,
    ``S`` = :func:`soft_skeleton` with ``iters`` iterations. Prediction and target are 0 at
    ignored voxels, so the skeletons are 0 there too.
    """
    skel_p = soft_skeleton(m.prob, iters) * m.valid
    with torch.no_grad():
        skel_g = soft_skeleton(m.target, iters) * m.valid
    tprec = ((skel_p * m.target).sum() + smooth) / (skel_p.sum() + smooth).clamp_min(1e-7)
    tsens = ((skel_g * m.prob).sum() + smooth) / (skel_g.sum() + smooth).clamp_min(1e-7)
    return 1.0 - 2.0 * tprec * tsens / (tprec + tsens).clamp_min(1e-7)


def skeleton_recall_loss(m: MaskedInput, iters: int = 3, smooth: float = 1.0) -> Tensor:
    """Skeleton recall ``1 - (Σ S(g) p + s) / (Σ S(g) + s)`` (the target side of clDice).

    Kirchhoff et al. (2024) take the target skeleton from a CPU skeletonization; here ``S(g)``
    is :func:`soft_skeleton` of the binary target (exact for binary input, no gradient, on the
    tensors' device), so it costs a few pooling passes and no extra dependency.
    """
    with torch.no_grad():
        skel_g = soft_skeleton(m.target, iters) * m.valid
    return 1.0 - ((skel_g * m.prob).sum() + smooth) / (skel_g.sum() + smooth).clamp_min(1e-7)


# ----------------------------------------------------------------------------------------------
# Connectivity and the seed's regularizers
# ----------------------------------------------------------------------------------------------


def connectivity_loss(m: MaskedInput) -> Tensor:
    """Local neighbourhood consistency of the prediction with the target surface.

    With ``N(v)`` the 3×3×3 neighbourhood of voxel ``v``, ``S`` the valid target-surface voxels
    and ``F`` the valid voxels with no target surface in ``N(v)``:

    - break term (gaps that split a sheet): for ``v ∈ S``,
      ``relu(sg[max_{u ∈ N(v) ∩ S} p(u)] - p(v))`` (``sg`` = stop-gradient, so only the gap is
      raised, never its neighbours lowered), averaged over ``S``;
    - island term (foreground not attached to any target surface: spurious components and
      bridges between sheets): ``p(v)`` averaged over ``F``.

    ``L = (break + island) / 2``; 0 for the perfect prediction. It measures consistency, not
    coverage (``p ≡ 0`` also scores 0), so use it beside Dice/BCE.
    """
    with torch.no_grad():
        best = F.max_pool3d(m.prob * m.target, 3, 1, 1)
        far = (1.0 - F.max_pool3d(m.target, 3, 1, 1)) * m.valid
    gap = F.relu(best - m.prob) * m.target
    brk = gap.sum() / m.target.sum().clamp_min(1.0)
    island = (m.prob * far).sum() / far.sum().clamp_min(1.0)
    return 0.5 * (brk + island)


def _valid_var(m: MaskedInput) -> Tensor:
    n = m.valid.sum().clamp_min(1.0)
    mean = m.prob.sum() / n
    return (((m.prob - mean) * m.valid) ** 2).sum() / n


def variance_regularizer(m: MaskedInput, form: RegForm = "v1") -> Tensor:
    """The seed's prediction-variance regularizer over valid voxels (population variance).

    ``v1``: ``clamp(0.01 - var(p), min=0) / 0.01`` (only fights an almost constant prediction);
    ``v2``: ``(1 - var(p))**2``. A sigmoid output has ``var ≤ 0.25``, so v2 is never below 0.5625
    and always pushes voxels away from the mean towards 0/1, whatever the target says.
    """
    var = _valid_var(m)
    if form == "v1":
        return torch.clamp(0.01 - var, min=0.0) / 0.01
    if form == "v2":
        return (1.0 - var) ** 2
    raise ValueError(f"variance form must be 'v1' or 'v2', got {form!r}")


def _binary_entropy(m: MaskedInput) -> Tensor:
    # H(p) in nats from logits, stable: p·softplus(-z) + (1-p)·softplus(z)
    p = torch.sigmoid(m.logits)
    return p * F.softplus(-m.logits) + (1.0 - p) * F.softplus(m.logits)


def entropy_regularizer(m: MaskedInput, form: RegForm = "v1") -> Tensor:
    """The seed's entropy regularizer on the mean binary entropy ``H̄`` (nats) over valid voxels.

    ``v1``: ``H̄`` itself (entropy minimization, favours confident predictions; the issue does not
    record the seed's v1 formula, this is the standard form); ``v2``: ``clamp(0.5 - H̄, min=0)``,
    which *penalizes confidence*: it is 0.5 at a perfectly confident prediction and 0 once the mean
    entropy reaches 0.5 nats (``p ≈ 0.2`` or ``0.8`` everywhere).
    """
    h = _valid_mean(_binary_entropy(m), m.valid)
    if form == "v1":
        return h
    if form == "v2":
        return torch.clamp(0.5 - h, min=0.0)
    raise ValueError(f"entropy form must be 'v1' or 'v2', got {form!r}")


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------


class _Term(nn.Module):
    """Base: ``forward(logits (B,1,Z,Y,X) float, target (B,1,Z,Y,X) int) -> scalar float32``."""

    def __init__(self, ignore_label: int | None = 2) -> None:
        super().__init__()
        self.ignore_label = ignore_label

    def loss(self, m: MaskedInput, **extra: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, logits: Tensor, target: Tensor, **extra: Any) -> Tensor:
        with _disable_autocast(logits.device):
            return self.loss(apply_ignore(logits, target, self.ignore_label), **extra)


class DiceLoss(_Term):
    """Soft Dice loss (:func:`soft_dice_loss`).

    Args:
        smooth: added to numerator and denominator.
        batch: one Dice over the batch (True) or the mean of per-sample Dice (False).
        ignore_label: label excluded from the loss; ``None`` keeps every voxel.

    Shape:
        logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def __init__(self, smooth: float = 1.0, batch: bool = False, ignore_label: int | None = 2) -> None:
        super().__init__(ignore_label)
        self.smooth, self.batch = smooth, batch

    def loss(self, m: MaskedInput) -> Tensor:
        return soft_dice_loss(m, self.smooth, self.batch)


class BCELoss(_Term):
    """Binary cross-entropy with logits over valid voxels (:func:`bce_loss`).

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def loss(self, m: MaskedInput) -> Tensor:
        return bce_loss(m)


class FocalLoss(_Term):
    """Focal loss (:func:`focal_loss`).

    Args:
        gamma: focusing exponent γ ≥ 0.
        alpha: foreground weight α in [0, 1] (background ``1 - α``), or ``None`` for no weighting.

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | None = None, ignore_label: int | None = 2) -> None:
        super().__init__(ignore_label)
        if gamma < 0:
            raise ValueError(f"focal gamma must be >= 0, got {gamma}")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise ValueError(f"focal alpha must be in [0, 1] or None, got {alpha}")
        self.gamma, self.alpha = gamma, alpha

    def loss(self, m: MaskedInput) -> Tensor:
        return focal_loss(m, self.gamma, self.alpha)


class BoundaryLoss(_Term):
    """Distance-weighted boundary loss (:func:`boundary_loss`).

    The signed distance map is either passed precomputed as ``forward(logits, target, dist=...)``
    (``(B,1,Z,Y,X)`` float, from :func:`signed_distance_map`, e.g. in a data-loader worker) or,
    when ``dist`` is None, computed from the target **on the fly on the CPU** (``edt``/scipy,
    about 0.1 s per 128³ sample), which also copies the target to the CPU.

    Args:
        max_distance: clip ``|φ|`` (None: no clipping).

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def __init__(self, max_distance: float | None = None, ignore_label: int | None = 2) -> None:
        super().__init__(ignore_label)
        self.max_distance = max_distance

    def loss(self, m: MaskedInput, dist: Tensor | None = None, target: Tensor | None = None) -> Tensor:
        if dist is None:
            dist = signed_distance_map(target, self.ignore_label, self.max_distance)
        return boundary_loss(m, dist)

    def forward(self, logits: Tensor, target: Tensor, dist: Tensor | None = None) -> Tensor:
        with _disable_autocast(logits.device):
            return self.loss(apply_ignore(logits, target, self.ignore_label), dist=dist, target=target)


class ClDiceLoss(_Term):
    """clDice loss (:func:`cldice_loss`) with a soft skeleton of ``iters`` min/max-pool iterations.

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def __init__(self, iters: int = 3, smooth: float = 1.0, ignore_label: int | None = 2) -> None:
        super().__init__(ignore_label)
        if iters < 0:
            raise ValueError(f"cldice iters must be >= 0, got {iters}")
        self.iters, self.smooth = iters, smooth

    def loss(self, m: MaskedInput) -> Tensor:
        return cldice_loss(m, self.iters, self.smooth)


class SkeletonRecallLoss(ClDiceLoss):
    """Skeleton recall loss (:func:`skeleton_recall_loss`).

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def loss(self, m: MaskedInput) -> Tensor:
        return skeleton_recall_loss(m, self.iters, self.smooth)


class ConnectivityLoss(_Term):
    """Neighbourhood-consistency loss (:func:`connectivity_loss`, break + island terms).

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def loss(self, m: MaskedInput) -> Tensor:
        return connectivity_loss(m)


class VarianceRegularizer(_Term):
    """The seed's variance regularizer (:func:`variance_regularizer`), ``form`` ``"v1"`` or ``"v2"``.

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def __init__(self, form: RegForm = "v1", ignore_label: int | None = 2) -> None:
        super().__init__(ignore_label)
        if form not in ("v1", "v2"):
            raise ValueError(f"{type(self).__name__}: form must be 'v1' or 'v2', got {form!r}")
        self.form = form

    def loss(self, m: MaskedInput) -> Tensor:
        return variance_regularizer(m, self.form)


class EntropyRegularizer(VarianceRegularizer):
    """The seed's entropy regularizer (:func:`entropy_regularizer`), ``form`` ``"v1"`` or ``"v2"``.

    Shape: logits ``(B,1,Z,Y,X)`` float, target ``(B,1,Z,Y,X)`` uint8/int → scalar float32.
    """

    def loss(self, m: MaskedInput) -> Tensor:
        return entropy_regularizer(m, self.form)


# ----------------------------------------------------------------------------------------------
# Composite, config, presets
# ----------------------------------------------------------------------------------------------


class CompositeLoss(nn.Module):
    """Weighted sum of named terms: ``total = Σ_k w_k · term_k(logits, target)``.

    The ignore mask is applied once (:func:`apply_ignore`) and shared by every term. Terms listed
    with weight 0 are computed without gradient, for logging only.

    Args:
        weights: ``{term name: weight}``; names from :data:`TERM_NAMES`.
        ignore_label: label excluded from every term; ``None`` keeps every voxel.
        smooth, dice_batch: :class:`DiceLoss` arguments (``smooth`` also for clDice / skeleton recall).
        focal_gamma, focal_alpha: :class:`FocalLoss` arguments.
        boundary_max_distance: :class:`BoundaryLoss` ``max_distance``.
        cldice_iters: skeleton iterations for clDice and skeleton recall.
        variance_form, entropy_form: ``"v1"`` or ``"v2"`` (see :func:`variance_regularizer`).

    Shape:
        ``forward(logits (B,1,Z,Y,X) float, target (B,1,Z,Y,X) uint8/int, dist=None)`` →
        ``(total scalar float32, parts {name: detached scalar})``; ``parts`` holds every term of
        ``weights`` and ``"total"``. ``dist`` is an optional precomputed signed distance map.

    Raises:
        ValueError: unknown term name (the message lists the valid ones) or negative weight.
    """

    def __init__(
        self,
        weights: dict[str, float],
        ignore_label: int | None = 2,
        *,
        smooth: float = 1.0,
        dice_batch: bool = False,
        focal_gamma: float = 2.0,
        focal_alpha: float | None = None,
        boundary_max_distance: float | None = None,
        cldice_iters: int = 3,
        variance_form: RegForm = "v1",
        entropy_form: RegForm = "v1",
    ) -> None:
        super().__init__()
        unknown = sorted(set(weights) - set(TERM_NAMES))
        if unknown:
            raise ValueError(f"unknown loss term(s) {unknown}; valid terms: {list(TERM_NAMES)}")
        if not weights:
            raise ValueError(f"loss weights are empty; give at least one of {list(TERM_NAMES)}")
        for k, w in weights.items():
            if not math.isfinite(float(w)) or w < 0:
                raise ValueError(f"loss weight {k!r} must be a finite number >= 0, got {w!r}")
        self.weights = {k: float(w) for k, w in weights.items()}
        self.ignore_label = ignore_label
        factories = {
            "dice": lambda: DiceLoss(smooth, dice_batch, ignore_label),
            "bce": lambda: BCELoss(ignore_label),
            "focal": lambda: FocalLoss(focal_gamma, focal_alpha, ignore_label),
            "boundary": lambda: BoundaryLoss(boundary_max_distance, ignore_label),
            "cldice": lambda: ClDiceLoss(cldice_iters, smooth, ignore_label),
            "skeleton_recall": lambda: SkeletonRecallLoss(cldice_iters, smooth, ignore_label),
            "connectivity": lambda: ConnectivityLoss(ignore_label),
            "variance": lambda: VarianceRegularizer(variance_form, ignore_label),
            "entropy": lambda: EntropyRegularizer(entropy_form, ignore_label),
        }
        self.terms = nn.ModuleDict({k: factories[k]() for k in TERM_NAMES if k in self.weights})

    def forward(self, logits: Tensor, target: Tensor, dist: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        with _disable_autocast(logits.device):
            m = apply_ignore(logits, target, self.ignore_label)
            total = logits.new_zeros((), dtype=torch.float32)
            parts: dict[str, Tensor] = {}
            for name, term in self.terms.items():
                extra = {"dist": dist, "target": target} if name == "boundary" else {}
                w = self.weights[name]
                if w == 0.0:
                    with torch.no_grad():
                        value = term.loss(m, **extra)
                else:
                    value = term.loss(m, **extra)
                    total = total + w * value
                parts[name] = value.detach()
            parts["total"] = total.detach()
        return total, parts

    def extra_repr(self) -> str:
        return f"weights={self.weights}, ignore_label={self.ignore_label}"


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's deep-supervision weights of ``n`` outputs, highest resolution first.

    ``w_k = 1 / 2^k``, the lowest resolution set to 0 (when ``n > 1``), normalised to sum 1; for
    ``n = 5``: ``[0.5333, 0.2667, 0.1333, 0.0667, 0]``.
    """
    if n < 1:
        raise ValueError(f"deep supervision needs at least one output, got {n}")
    w = [1.0 / 2**k for k in range(n)]
    if n > 1:
        w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def downsample_label(target: Tensor, shape: tuple[int, ...] | torch.Size, ignore_label: int | None = 2) -> Tensor:
    """Reduce integer labels ``(B,1,Z,Y,X)`` to ``shape`` (``(Z', Y', X')``, each edge dividing the label's).

    Block rule: ignored if any voxel of the block is ``ignore_label`` (max-pool of the ignore mask),
    else 1 if any voxel is foreground (non-zero), else 0. An ignored voxel never turns into a
    supervised one at a lower resolution.

    Returns:
        tensor of ``target``'s dtype, ``(B, 1, *shape)``.

    Raises:
        ValueError: an edge of ``shape`` does not divide the label's edge.
    """
    full = tuple(target.shape[-3:])
    shape = tuple(int(s) for s in shape[-3:])
    if shape == full:
        return target
    if any(s < 1 or f % s for f, s in zip(full, shape)):
        raise ValueError(f"deep supervision: output shape {shape} does not divide the label shape {full}")
    kernel = tuple(f // s for f, s in zip(full, shape))
    if ignore_label is None:
        ign = torch.zeros_like(target, dtype=torch.bool)
    else:
        ign = target == ignore_label
    fg = (target != 0) & ~ign
    pool = lambda m: F.max_pool3d(m.float(), kernel, kernel) > 0  # noqa: E731
    ign_s, fg_s = pool(ign), pool(fg)
    out = fg_s.to(target.dtype)
    if ignore_label is not None:
        out = torch.where(ign_s, torch.full_like(out, ignore_label), out)
    return out


class DeepSupervisionLoss(nn.Module):
    """A :class:`CompositeLoss` summed over the decoder outputs of a deep-supervised network.

    ``total = Σ_k w_k · loss(outputs[k], downsample_label(target, outputs[k].shape))`` with
    ``w = deep_supervision_weights(len(outputs))``; outputs with weight 0 are not computed. A single
    tensor (validation, smp-3d networks) is passed to the composite unchanged.

    Args:
        loss: the composite applied at every scale (its ``ignore_label`` is used to reduce labels).

    Shape:
        ``forward(outputs: list of (B,1,Z/s_k,Y/s_k,X/s_k) float logits, highest resolution first, or
        one (B,1,Z,Y,X) tensor; target (B,1,Z,Y,X) uint8/int; dist=None)`` →
        ``(total scalar float32, parts {name: detached scalar})``, each part the same weighted sum
        over scales as the total.
    """

    def __init__(self, loss: CompositeLoss) -> None:
        super().__init__()
        self.loss = loss

    @property
    def weights(self) -> dict[str, float]:
        """The composite's term weights (the loss parts logged per epoch)."""
        return self.loss.weights

    @property
    def ignore_label(self) -> int | None:
        return self.loss.ignore_label

    def forward(self, outputs: Tensor | list[Tensor] | tuple[Tensor, ...], target: Tensor,
                dist: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if torch.is_tensor(outputs):
            return self.loss(outputs, target, dist)
        outputs = list(outputs)
        total: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for k, (w, logits) in enumerate(zip(deep_supervision_weights(len(outputs)), outputs)):
            if w == 0.0:  # kept in the graph with zero gradient (DistributedDataParallel expects every head)
                total = total + 0.0 * logits.float().sum() if total is not None else 0.0 * logits.float().sum()
                continue
            t_k = downsample_label(target, logits.shape[-3:], self.loss.ignore_label)
            value, p = self.loss(logits, t_k, dist if k == 0 else None)
            total = w * value if total is None else total + w * value
            for name, v in p.items():
                parts[name] = w * v if name not in parts else parts[name] + w * v
        assert total is not None  # weight 0 only for the last of several outputs
        return total, parts

    def extra_repr(self) -> str:
        return "deep supervision (nnU-Net weights 1/2^k, lowest resolution 0)"


def _normalized(w: dict[str, float]) -> dict[str, float]:
    s = sum(w.values())
    return {k: v / s for k, v in w.items()}


# name -> (weights, term kwargs)
PRESETS: dict[str, tuple[dict[str, float], dict[str, Any]]] = {
    # Recommended: nnU-Net's Dice + cross-entropy (1:1, batch Dice) with the ignore label, plus a
    # small clDice for sheet connectivity (3rd place used clDice on top of nnU-Net). See docs/losses.md.
    "default": ({"dice": 1.0, "bce": 1.0, "cldice": 0.1}, {"dice_batch": True}),
    # The seed's first composite, weights as its table lists them (sum 1.15), normalized to sum 1.
    "seed-v1": (
        _normalized({"dice": 0.4, "focal": 0.2, "boundary": 0.2, "cldice": 0.1, "connectivity": 0.1,
                     "variance": 0.1, "entropy": 0.05}),
        {"variance_form": "v1", "entropy_form": "v1"},
    ),
    # The seed's second composite (sums to 1), with the v2 regularizers that reward 0/1 noise.
    "seed-v2": (
        {"dice": 0.3, "focal": 0.15, "boundary": 0.15, "cldice": 0.05, "connectivity": 0.05,
         "variance": 0.25, "entropy": 0.05},
        {"variance_form": "v2", "entropy_form": "v2"},
    ),
}


@dataclass
class LossConfig:
    """The ``loss:`` section of a training config.

    ``name`` picks a preset (``default``, ``seed-v1``, ``seed-v2``); ``weights`` replaces the
    preset's weights (or stands alone when ``name`` is None); every other field left ``None``
    keeps the preset's or the term's default. ``ignore_label: null`` disables the ignore mask.
    ``deep_supervision: true`` applies the loss to every decoder output of an nnU-Net network
    (:class:`DeepSupervisionLoss`); validation and inference use the full-resolution output only.
    """

    name: str | None = "default"
    weights: dict[str, float] | None = None
    ignore_label: int | None = 2
    smooth: float | None = None
    dice_batch: bool | None = None
    focal_gamma: float | None = None
    focal_alpha: float | None = None
    boundary_max_distance: float | None = None
    cldice_iters: int | None = None
    variance_form: RegForm | None = None
    entropy_form: RegForm | None = None
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        if self.focal_alpha is not None and not 0.0 <= self.focal_alpha <= 1.0:
            raise ValueError(f"loss.focal_alpha: must be a probability weight in [0, 1], got {self.focal_alpha}")


_KWARG_FIELDS = (
    "smooth", "dice_batch", "focal_gamma", "focal_alpha", "boundary_max_distance", "cldice_iters",
    "variance_form", "entropy_form",
)


def _from_config(cfg: LossConfig) -> CompositeLoss | DeepSupervisionLoss:
    weights: dict[str, float] | None = None
    kwargs: dict[str, Any] = {}
    if cfg.name is not None:
        if cfg.name not in PRESETS:
            raise ConfigError(f"loss.name: unknown preset {cfg.name!r}; valid presets: {sorted(PRESETS)}")
        weights, kwargs = dict(PRESETS[cfg.name][0]), dict(PRESETS[cfg.name][1])
    if cfg.weights is not None:
        weights = dict(cfg.weights)
    if weights is None:
        raise ConfigError("loss: give a preset `name` or a `weights` mapping")
    for f in _KWARG_FIELDS:
        if getattr(cfg, f) is not None:
            kwargs[f] = getattr(cfg, f)
    loss = CompositeLoss(weights, cfg.ignore_label, **kwargs)
    return DeepSupervisionLoss(loss) if cfg.deep_supervision else loss


def build_loss(spec: str | dict | LossConfig, ignore_label: int | None = 2) -> CompositeLoss | DeepSupervisionLoss:
    """Build a :class:`CompositeLoss` from a preset name, a weights dict, or a config section
    (a :class:`DeepSupervisionLoss` around it when the section sets ``deep_supervision``).

    Args:
        spec: ``"default"`` | ``"seed-v1"`` | ``"seed-v2"``; a ``{term: weight}`` dict (keys all in
            :data:`TERM_NAMES`); a YAML ``loss:`` section as a dict (keys of :class:`LossConfig`,
            its own ``ignore_label`` wins); or a :class:`LossConfig`.
        ignore_label: for preset names and weight dicts. ``build_loss("seed-v1", ignore_label=None)``
            reproduces the seed exactly (label 2 counted as foreground).

    Raises:
        ValueError: unknown preset or term (the message lists the valid ones); ``ConfigError``
            (a ValueError) for a bad config section.
    """
    if isinstance(spec, LossConfig):
        return _from_config(spec)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown loss preset {spec!r}; valid presets: {sorted(PRESETS)}")
        weights, kwargs = PRESETS[spec]
        return CompositeLoss(dict(weights), ignore_label, **kwargs)
    if isinstance(spec, dict):
        cfg_keys = set(LossConfig.__dataclass_fields__)
        if not set(spec) & cfg_keys:  # a weights mapping; unknown terms are reported by CompositeLoss
            return CompositeLoss(dict(spec), ignore_label)
        return _from_config(from_dict(LossConfig, spec, "loss"))
    raise ValueError(f"build_loss: expected a preset name, a dict or a LossConfig, got {type(spec).__name__}")
