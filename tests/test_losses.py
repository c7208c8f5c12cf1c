"""Tests for kaggle_utils.losses: ignore invariance, finiteness, optima, skeleton, presets, config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kaggle_utils import losses as L
from kaggle_utils.config import ConfigError

SHAPE = (2, 1, 16, 16, 16)
TERMS = list(L.TERM_NAMES)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP overhead on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _single(name: str, **kw) -> L.CompositeLoss:
    return L.CompositeLoss({name: 1.0}, **kw)


def _target(seed: int = 0, ignore_share: float = 0.5) -> torch.Tensor:
    """Two sheets (label 1) in background (0), an ignored slab and random ignored voxels (2)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(SHAPE, dtype=torch.uint8)
    t[:, :, 4:6] = 1
    t[:, :, 10:12, :, 3:13] = 1
    rnd = torch.rand(SHAPE, generator=g) < ignore_share
    t[rnd] = 2
    t[:, :, :, :2] = 2  # border slab, as in the competition labels
    return t


def _logits(seed: int = 1, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g) * scale


def _value_and_grad(loss: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    total, parts = loss(x, target)
    total.backward()
    return total.detach(), x.grad.detach(), parts


# ---------------------------------------------------------------------------- ignore invariance


@pytest.mark.parametrize("name", TERMS + ["seed-v1", "seed-v2", "default", "all"])
def test_ignored_logits_change_nothing(name):
    if name in L.PRESETS:
        loss = L.build_loss(name)
    elif name == "all":
        loss = L.CompositeLoss({k: 1.0 for k in TERMS})
    else:
        loss = _single(name)
    t = _target()
    ign = t == 2
    x1 = _logits(1)
    x2 = x1.clone()
    x2[ign] = torch.randn(int(ign.sum()), generator=torch.Generator().manual_seed(9)) * 20.0
    v1, g1, p1 = _value_and_grad(loss, x1, t)
    v2, g2, p2 = _value_and_grad(loss, x2, t)
    assert torch.equal(v1, v2), (v1, v2)
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    assert torch.equal(g1, g2)
    assert torch.all(g1[ign] == 0)
    assert g1[~ign].abs().sum() > 0 or name in ("variance",)  # v1 variance is flat on noisy logits


@pytest.mark.parametrize("name", TERMS)
def test_value_of_the_ignore_label_does_not_matter(name):
    """Ignored voxels relabelled to another value (with ignore_label following) give the same loss."""
    t = _target(3)
    t255 = t.clone()
    t255[t == 2] = 255
    x = _logits(4)
    v1, g1, _ = _value_and_grad(_single(name, ignore_label=2), x, t)
    v2, g2, _ = _value_and_grad(_single(name, ignore_label=255), x, t255)
    assert torch.allclose(v1, v2) and torch.allclose(g1, g2)


@pytest.mark.parametrize("name", ["dice", "bce", "focal", "variance", "entropy"])
def test_voxelwise_terms_equal_the_loss_on_the_valid_voxels_alone(name):
    """Dropping the ignored voxels from the tensor is the same as masking them (non-spatial terms)."""
    t = _target(5)
    x = _logits(6)
    loss = _single(name, smooth=1.0, dice_batch=True)
    v_masked, _, _ = _value_and_grad(loss, x, t)
    keep = (t != 2).reshape(-1)
    xs, ts = x.reshape(-1)[keep].reshape(1, 1, 1, 1, -1), t.reshape(-1)[keep].reshape(1, 1, 1, 1, -1)
    v_kept, _, _ = _value_and_grad(_single(name, ignore_label=None, smooth=1.0, dice_batch=True), xs, ts)
    assert torch.allclose(v_masked, v_kept, atol=1e-6)


def test_ignore_none_counts_label_2_as_foreground():
    t = _target(7)
    x = _logits(8)
    m = L.apply_ignore(x, t, None)
    assert torch.equal(m.target.bool(), t > 0) and torch.all(m.valid == 1)
    m2 = L.apply_ignore(x, t, 2)
    assert torch.equal(m2.target.bool(), t == 1) and torch.equal(m2.valid.bool(), t != 2)


# ---------------------------------------------------------------------------- finiteness


def _special_targets():
    bg = torch.zeros(SHAPE, dtype=torch.uint8)
    fg = torch.ones(SHAPE, dtype=torch.uint8)
    ign = torch.full(SHAPE, 2, dtype=torch.uint8)
    mixed = bg.clone()
    mixed[0] = 2  # one sample entirely ignored
    mixed[1, :, 5:7] = 1
    return {"background": bg, "foreground": fg, "ignore": ign, "one-sample-ignored": mixed, "random": _target(2)}


ALL = {k: 1.0 for k in TERMS}


@pytest.mark.parametrize("kind", ["background", "foreground", "ignore", "one-sample-ignored", "random"])
@pytest.mark.parametrize("form", ["v1", "v2"])
def test_finite_values_and_gradients(kind, form):
    t = _special_targets()[kind]
    for dice_batch in (False, True):
        loss = L.CompositeLoss(ALL, variance_form=form, entropy_form=form, dice_batch=dice_batch, smooth=1.0)
        for scale in (0.0, 50.0):
            x = (_logits(3) * scale).requires_grad_(True)
            total, parts = loss(x, t)
            total.backward()
            assert all(torch.isfinite(v) for v in parts.values()), (kind, parts)
            assert torch.isfinite(x.grad).all()
            if kind == "ignore":
                assert torch.all(x.grad == 0)


def test_finite_with_zero_smoothing():
    loss = L.CompositeLoss({"dice": 1.0, "cldice": 1.0, "skeleton_recall": 1.0}, smooth=0.0)
    for t in _special_targets().values():
        x = _logits(3).requires_grad_(True)
        total, _ = loss(x, t)
        total.backward()
        assert torch.isfinite(total) and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_and_half_logits(dtype):
    loss = L.CompositeLoss(ALL, variance_form="v2", entropy_form="v2")
    t = _target(4)
    conv = torch.nn.Conv3d(1, 1, 3, padding=1)
    inp = torch.randn(SHAPE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(inp)
        assert logits.dtype == torch.bfloat16
        total, parts = loss(logits, t)
    assert total.dtype == torch.float32
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in parts.values())
    assert torch.isfinite(conv.weight.grad).all() and conv.weight.grad.abs().sum() > 0
    x = _logits(5).to(dtype).requires_grad_(True)
    total, _ = loss(x, t)
    total.backward()
    assert torch.isfinite(total) and x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    ref, _ = loss(x.detach().float(), t)
    assert math.isclose(total.item(), ref.item(), rel_tol=1e-6)


# ---------------------------------------------------------------------------- optima and known values


@pytest.mark.parametrize("name", ["dice", "bce", "focal", "cldice", "skeleton_recall", "connectivity", "boundary"])
def test_perfect_logits_are_near_minimal(name):
    t = _target(6, ignore_share=0.2)
    fg = (t == 1).float()
    perfect = (fg * 2 - 1) * 20.0
    loss = _single(name, smooth=1e-5)
    best = loss(perfect, t)[0].item()
    assert best < 1e-3, best
    for seed in range(3):
        assert loss(_logits(seed), t)[0].item() > best + 0.05
    # ignored voxels may hold anything
    junk = perfect.clone()
    junk[t == 2] = _logits(9)[t == 2] * 10
    assert math.isclose(loss(junk, t)[0].item(), best, abs_tol=1e-7)


def test_dice_known_value_and_batch_mode():
    t = torch.zeros(2, 1, 1, 1, 4, dtype=torch.uint8)
    t[0, 0, 0, 0, :2] = 1  # sample 0: 2 fg
    t[1, 0, 0, 0, :] = 2  # sample 1: all ignored
    x = torch.full(t.shape, 50.0)  # p = 1 everywhere
    # sample 0: 2*2 / (4 + 2) = 2/3; sample 1 excluded from the mean
    d = L.DiceLoss(smooth=0.0)(x, t)
    assert math.isclose(d.item(), 1 - 2 / 3, rel_tol=1e-5)
    t[1, 0, 0, 0, :] = 0
    d_s = L.DiceLoss(smooth=0.0)(x, t)  # sample 1: 0/(4+0) → loss 1
    d_b = L.DiceLoss(smooth=0.0, batch=True)(x, t)  # 4 / (8 + 2)
    assert math.isclose(d_s.item(), (1 / 3 + 1) / 2, rel_tol=1e-5)
    assert math.isclose(d_b.item(), 1 - 4 / 10, rel_tol=1e-5)


def test_focal_reduces_to_bce_and_downweights_easy_voxels():
    t, x = _target(1), _logits(2)
    bce = L.BCELoss()(x, t)
    assert torch.allclose(L.FocalLoss(gamma=0.0)(x, t), bce)
    assert L.FocalLoss(gamma=2.0)(x, t) < bce
    assert torch.allclose(L.FocalLoss(gamma=0.0, alpha=0.5)(x, t), 0.5 * bce)


def test_signed_distance_map_and_boundary_sign():
    t = torch.zeros(1, 1, 9, 5, 5, dtype=torch.uint8)
    t[..., 4, :, :] = 1
    t[..., 0, :, :] = 2
    phi = L.signed_distance_map(t)
    assert torch.all(phi[..., 4, :, :] == -1)
    assert torch.allclose(phi[0, 0, :, 2, 2], torch.tensor([4.0, 3, 2, 1, -1, 1, 2, 3, 4]))
    assert torch.all(L.signed_distance_map(torch.zeros_like(t)) == 0)
    assert torch.all(L.signed_distance_map(t, max_distance=2.0).abs() <= 2)
    # precomputed map gives the same loss as the on-the-fly one
    x = torch.randn(t.shape)
    assert torch.allclose(L.BoundaryLoss()(x, t), L.BoundaryLoss()(x, t, dist=phi))
    comp = L.CompositeLoss({"boundary": 1.0})
    assert torch.allclose(comp(x, t)[0], comp(x, t, dist=phi)[0])
    # a false positive far from the sheet costs more than one next to it
    base = torch.full(t.shape, -20.0)
    base[..., 4, :, :] = 20.0
    near, far = base.clone(), base.clone()
    near[..., 5, 2, 2] = 20.0
    far[..., 8, 2, 2] = 20.0
    b = L.BoundaryLoss()
    assert b(far, t) > b(near, t) > b(base, t)


def test_soft_skeleton_of_thin_plate_lies_inside_plate():
    x = torch.zeros(1, 1, 16, 16, 16)
    x[:, :, 7:9, 2:14, 2:14] = 1.0  # a 2-voxel-thick plate
    for iters in (0, 3, 10):
        s = L.soft_skeleton(x, iters)
        assert s.sum() > 0
        assert torch.all(s[x == 0] == 0)
        assert s.max() <= 1
    thick = torch.zeros(1, 1, 16, 16, 16)
    thick[:, :, 4:11, 2:14, 2:14] = 1.0
    s = L.soft_skeleton(thick, 5)
    assert torch.all(s[thick == 0] == 0) and 0 < s.sum() < thick.sum() / 2
    # soft input: skeleton bounded and inside the support
    soft = thick * 0.7
    assert torch.all(L.soft_skeleton(soft, 3)[soft == 0] == 0)


def test_connectivity_penalizes_a_hole_and_an_island():
    t = torch.zeros(1, 1, 12, 12, 12, dtype=torch.uint8)
    t[..., 5, :, :] = 1
    perfect = (t.float() * 2 - 1) * 20
    c = L.ConnectivityLoss()
    assert c(perfect, t).item() < 1e-6
    hole = perfect.clone()
    hole[..., 5, 6, 6] = -20
    island = perfect.clone()
    island[..., 10, 6, 6] = 20
    assert c(hole, t) > 1e-4 and c(island, t) > 1e-4
    x = hole.clone().requires_grad_(True)
    c(x, t).backward()
    assert x.grad[0, 0, 5, 6, 6] < 0  # gradient descent raises the hole
    assert torch.all(x.grad[0, 0, 5][torch.arange(12) != 6] <= 0)  # never lowers its neighbours


def test_regularizer_forms():
    t = _target(1)
    confident = ((t == 1).float() * 2 - 1) * 30
    flat = torch.zeros(SHAPE)
    v2 = L.VarianceRegularizer("v2")
    assert v2(confident, t).item() >= 0.5625 - 1e-6  # var of a sigmoid ≤ 0.25
    assert math.isclose(L.VarianceRegularizer("v1")(flat, t).item(), 1.0)
    assert L.VarianceRegularizer("v1")(confident, t).item() == 0.0
    assert math.isclose(L.EntropyRegularizer("v2")(confident, t).item(), 0.5, abs_tol=1e-4)
    assert L.EntropyRegularizer("v2")(flat, t).item() == 0.0  # ln 2 > 0.5: uncertainty is rewarded
    assert math.isclose(L.EntropyRegularizer("v1")(flat, t).item(), math.log(2), rel_tol=1e-5)
    with pytest.raises(ValueError):
        L.VarianceRegularizer("v3")


# ---------------------------------------------------------------------------- presets and config


def test_preset_weights():
    v1 = L.build_loss("seed-v1").weights
    raw = {"dice": .4, "focal": .2, "boundary": .2, "cldice": .1, "connectivity": .1, "variance": .1, "entropy": .05}
    assert set(v1) == set(raw) and math.isclose(sum(v1.values()), 1.0)
    for k in raw:
        assert math.isclose(v1[k], raw[k] / 1.15)
    v2 = L.build_loss("seed-v2")
    assert v2.weights == {"dice": .3, "focal": .15, "boundary": .15, "cldice": .05, "connectivity": .05,
                          "variance": .25, "entropy": .05}
    assert v2.terms["variance"].form == "v2" and v2.terms["entropy"].form == "v2"
    assert L.build_loss("seed-v1").terms["variance"].form == "v1"
    d = L.build_loss("default")
    assert d.weights == {"dice": 1.0, "bce": 1.0, "cldice": 0.1} and d.ignore_label == 2
    assert d.terms["dice"].batch is True
    assert L.build_loss("seed-v2", ignore_label=None).ignore_label is None


def test_parts_and_total():
    loss = L.build_loss({"dice": 0.5, "bce": 2.0, "entropy": 0.0})
    t, x = _target(2), _logits(3).requires_grad_(True)
    total, parts = loss(x, t)
    assert set(parts) == {"dice", "bce", "entropy", "total"}
    assert all(not v.requires_grad for v in parts.values())
    assert math.isclose(total.item(), 0.5 * parts["dice"].item() + 2 * parts["bce"].item(), rel_tol=1e-6)
    assert math.isclose(parts["total"].item(), total.item())


def test_build_from_config_section_and_errors(tmp_path):
    import yaml

    from kaggle_utils.config import load_yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"loss": {"name": "seed-v2", "ignore_label": None, "cldice_iters": 5,
                                          "focal_gamma": 1.0, "focal_alpha": 0.5}}))
    loss = L.build_loss(load_yaml(p)["loss"])
    assert loss.ignore_label is None and loss.terms["cldice"].iters == 5
    assert loss.terms["focal"].gamma == 1.0 and loss.terms["focal"].alpha == 0.5
    assert loss.terms["variance"].form == "v2"
    cfg = L.LossConfig(name=None, weights={"dice": 1.0, "skeleton_recall": 0.5}, dice_batch=True, smooth=0.0)
    loss = L.build_loss(cfg)
    assert loss.weights == {"dice": 1.0, "skeleton_recall": 0.5} and loss.terms["dice"].smooth == 0.0
    with pytest.raises(ValueError, match="valid terms"):
        L.build_loss({"dice": 1.0, "tversky": 1.0})
    with pytest.raises(ValueError, match="skeleton_recall"):
        L.build_loss({"weights": {"dcie": 1.0}})
    with pytest.raises(ValueError, match="valid presets"):
        L.build_loss("seed-v3")
    with pytest.raises(ConfigError, match="loss.focal_gamma"):
        L.build_loss({"name": "default", "focal_gamma": "two"})
    with pytest.raises(ConfigError, match="valid presets"):
        L.build_loss({"name": "nope"})
    with pytest.raises(ValueError):
        L.CompositeLoss({"dice": -1.0})
    with pytest.raises(ValueError, match="shape"):
        L.build_loss("default")(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="integer"):
        L.build_loss("default")(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 4, 4, 4))


def test_functional_cores_match_modules():
    t, x = _target(8), _logits(8)
    m = L.apply_ignore(x, t, 2)
    assert torch.allclose(L.soft_dice_loss(m, 1.0, True), L.DiceLoss(1.0, True)(x, t))
    assert torch.allclose(L.cldice_loss(m, 3), L.ClDiceLoss(3)(x, t))
    assert torch.allclose(L.boundary_loss(m, L.signed_distance_map(t)), L.BoundaryLoss()(x, t))
    assert np.isfinite(L.connectivity_loss(m).item())


# ----------------------------------------------------------------------------------------------
# Deep supervision
# ----------------------------------------------------------------------------------------------


def test_deep_supervision_weights_are_nnunets():
    from kaggle_utils.losses import deep_supervision_weights

    w = deep_supervision_weights(5)
    assert w == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert deep_supervision_weights(1) == [1.0]


def test_downsample_label_keeps_ignore_and_thin_surface():
    from kaggle_utils.losses import downsample_label

    t = torch.zeros(1, 1, 4, 4, 4, dtype=torch.uint8)
    t[0, 0, 0, 0, 0] = 2          # one ignore voxel in block (0,0,0)
    t[0, 0, 0, 0, 1] = 1          # ...and a surface voxel in the same block: ignore wins
    t[0, 0, 3, 3, 3] = 1          # a lone surface voxel in block (1,1,1): kept
    d = downsample_label(t, (2, 2, 2))
    assert d.dtype == torch.uint8 and d.shape == (1, 1, 2, 2, 2)
    assert d[0, 0, 0, 0, 0] == 2 and d[0, 0, 1, 1, 1] == 1 and int(d.sum()) == 3
    # no ignored voxel becomes supervised: every block with an ignore voxel is ignored
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g).to(torch.uint8)
    d = downsample_label(r, (2, 2, 2))
    blocks = r.reshape(2, 1, 2, 4, 2, 4, 2, 4).permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(2, 1, 2, 2, 2, -1)
    assert torch.equal(d == 2, (blocks == 2).any(-1))


def test_deep_supervision_ignore_voxels_change_no_loss_and_no_gradient_at_any_scale():
    from kaggle_utils.losses import DeepSupervisionLoss, LossConfig, build_loss, downsample_label

    loss = build_loss(LossConfig(name="default", deep_supervision=True))
    assert isinstance(loss, DeepSupervisionLoss)
    g = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 1, 16, 16, 16), generator=g).to(torch.uint8)
    target[:, :, 4:12, 4:12, 4:12] = torch.randint(0, 2, (2, 1, 8, 8, 8), generator=g).to(torch.uint8)
    shapes = [16, 8, 4, 2]
    base = [torch.randn(2, 1, s, s, s, generator=g) for s in shapes]

    def run(outs):
        outs = [o.clone().requires_grad_(True) for o in outs]
        total, _ = loss(outs, target)
        total.backward()
        return total.detach(), [o.grad for o in outs]

    t0, g0 = run(base)
    changed = []
    for o in base:
        ign = downsample_label(target, o.shape[-3:]) == 2
        assert ign.any()
        changed.append(torch.where(ign, o + 50 * torch.randn(o.shape, generator=g), o))
    t1, g1 = run(changed)
    assert torch.allclose(t0, t1, atol=1e-6)
    for a, b, o in zip(g0, g1, base):
        assert torch.allclose(a, b, atol=1e-7)
        assert torch.all(a[downsample_label(target, o.shape[-3:]) == 2] == 0)
    assert torch.all(g0[-1] == 0)  # the lowest resolution is weighted 0
    # one tensor (validation) is the plain composite
    single, _ = loss(base[0], target)
    assert torch.allclose(single, loss.loss(base[0], target)[0])
