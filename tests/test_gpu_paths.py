"""The CUDA code paths of training and inference, exercised on the CPU (issue 23).

No line of the GPU path may wait for the first user on a GPU to be tried: float16 autocast with a
``GradScaler`` (which runs on the CPU in current torch: ``device.resolve_amp_dtype`` is patched to give
float16 on the CPU, so the scaler is enabled exactly as on CUDA), a loss-scale overflow skipped and not
applied, the EMA of a float16 run, ``channels_last_3d`` for training and inference, the pinned-memory
and ``non_blocking`` copies, the out-of-memory fallback of sliding-window inference with a simulated
``torch.OutOfMemoryError``, and DistributedDataParallel (gloo, two processes) giving the gradient of one
process on the union batch. What only a GPU can show is listed in BENCHMARKS.md ("GPU check").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from kaggle_utils import device as device_mod
from kaggle_utils.train import dist as dist_mod
from kaggle_utils.train import loop as loop_mod
from kaggle_utils.train import setup as setup_mod
from kaggle_utils.config import from_dict
from kaggle_utils.inference import InferenceConfig, predict_volume, predict_windows, run_with_oom_fallback, \
    sliding_window_predict, tta_transforms
from kaggle_utils.train import TrainConfig

warnings.filterwarnings("ignore", category=FutureWarning)
REPO = Path(__file__).resolve().parents[1]

RESENC = {"arch": "ResEncUNet", "n_stages": 3, "features_per_stage": [4, 8, 8], "strides": [1, 2, 2],
          "n_blocks_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1]}
UNET_BN = {"arch": "Unet", "encoder": "resnet18", "decoder_channels": [8, 8, 8, 4, 4]}  # BatchNorm: buffers


def make_cfg(model: dict = RESENC, **sections) -> TrainConfig:
    """A tiny config: 32^3 patches, SGD without momentum, no augmentation, no label pre-check."""
    data = {
        "model": dict(model),
        "loss": {"name": None, "weights": {"dice": 1.0, "bce": 1.0}, "dice_batch": False,
                 "deep_supervision": model["arch"] == "ResEncUNet"},
        "sampler": {"patch_size": [32, 32, 32], "patches_per_epoch": 4},
        "augment": {},
        "optim": {"name": "SGD", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 0,
                  "schedule": "constant", "grad_clip": None},
        "train": {"epochs": 1, "batch_size": 2, "num_workers": 0, "seed": 5, "n_folds": 3, "augment": False,
                  "check_labels": False, "amp": "off"},
        "validation": {"patch_size": [32, 32, 32]},
        "inference": {"patch_size": [32, 32, 32]},
    }
    for key, value in sections.items():
        data[key].update(value)
    return from_dict(TrainConfig, data)


def set_up(cfg: TrainConfig, data_dir: Path):
    """``train.setup._set_up`` of a single CPU process: the run state the loop trains."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    dist = dist_mod._Dist("cpu")
    return setup_mod._set_up(cfg, data_dir, None, 0, dist, None, 0.0, False)


def fixed_batch(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float32 (n,1,32,32,32) image, uint8 labels in {0, 1})``: no ignore voxels, so every loss
    term is a plain mean over samples (what DDP's gradient averaging needs to equal the union batch)."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn((n, 1, 32, 32, 32), generator=g)
    label = (torch.rand((n, 1, 32, 32, 32), generator=g) > 0.85).to(torch.uint8)
    return image, label


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cpu_fp16(monkeypatch):
    """``train.amp: fp16`` resolves to float16 on the CPU, as it does on CUDA: autocast float16 and an
    enabled ``GradScaler("cpu")``."""
    real = device_mod.resolve_amp_dtype
    fake = lambda amp, dev: torch.float16 if real(amp, dev) is not None else None  # noqa: E731
    monkeypatch.setattr(device_mod, "resolve_amp_dtype", fake)  # autocast
    monkeypatch.setattr(setup_mod, "resolve_amp_dtype", fake)  # the GradScaler of _set_up


# ----------------------------------------------------------------------------------------------
# float16 autocast + GradScaler
# ----------------------------------------------------------------------------------------------


def test_fp16_step_is_scaled_and_an_overflow_step_is_skipped_not_applied(tiny_train_data, cpu_fp16):
    state = set_up(make_cfg(train={"amp": "fp16"}), tiny_train_data)
    assert state.scaler.is_enabled() and state.scaler.get_scale() == 65536.0
    seen = []
    state.model.register_forward_hook(lambda m, i, o: seen.append(o[0].dtype if isinstance(o, list) else o.dtype))
    image, label = fixed_batch()
    gen = torch.Generator()

    w0 = weights(state.model)
    parts = loop_mod._train_step(state, 0, image, label, gen)
    assert seen[-1] == torch.float16  # the forward ran under float16 autocast
    assert torch.isfinite(parts["total"])
    w1 = weights(state.model)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0), "a normal fp16 step must change the weights"
    assert all(torch.isfinite(v).all() for v in w1.values() if v.is_floating_point())
    assert state.scaler.get_scale() == 65536.0

    # an overflow: the scaled gradients exceed float16's range (as a too-large scale does on a GPU)
    state.scaler.update(new_scale=2.0**60)
    loop_mod._train_step(state, 0, image, label, gen)
    w2 = weights(state.model)
    assert all(torch.equal(w1[k], w2[k]) for k in w1), "the overflow step was applied to the weights"
    assert state.scaler.get_scale() == 2.0**59  # backed off by growth's inverse (0.5)

    state.scaler.update(new_scale=1024.0)  # at a scale that fits, training goes on
    loop_mod._train_step(state, 0, image, label, gen)
    w3 = weights(state.model)
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)


def test_fp16_overflow_step_with_gradient_clipping_and_accumulation_is_skipped(tiny_train_data, cpu_fp16):
    """Clipping unscales first (``scaler.unscale_``): inf gradients must still skip the step, not
    turn into NaN weights through the clipping factor."""
    cfg = make_cfg(train={"amp": "fp16", "batch_size": 1}, optim={"grad_clip": 1.0, "accumulate": 2})
    state = set_up(cfg, tiny_train_data)
    image, label = fixed_batch()

    def one_step() -> None:  # two micro-batches, one optimizer step
        for i in range(2):
            loop_mod._train_step(state, i, image[i:i + 1], label[i:i + 1], torch.Generator())

    one_step()
    state.scaler.update(new_scale=2.0**60)
    w0 = weights(state.model)
    one_step()
    assert all(torch.equal(w0[k], v) for k, v in weights(state.model).items())
    assert state.scaler.get_scale() == 2.0**59
    assert all(p.grad is None for p in state.model.parameters())  # zeroed for the next step


def test_ema_of_an_fp16_run_stays_float32_and_follows_the_weights(tiny_train_data, cpu_fp16):
    cfg = make_cfg(UNET_BN, train={"amp": "fp16", "ema": True, "ema_decay": 0.9})
    state = set_up(cfg, tiny_train_data)
    image, label = fixed_batch()
    loop_mod._train_step(state, 0, image, label, torch.Generator())
    ema1 = weights(state.ema.module)
    w1 = weights(state.model)
    for k, v in ema1.items():  # the first update copies the weights (and BatchNorm buffers)
        assert v.dtype == w1[k].dtype and torch.equal(v, w1[k]), k
    loop_mod._train_step(state, 0, image, label, torch.Generator())
    w2, ema2 = weights(state.model), weights(state.ema.module)
    for k, v in ema2.items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k
            torch.testing.assert_close(v, 0.9 * ema1[k] + 0.1 * w2[k], rtol=1e-5, atol=1e-6)
    assert ema2["encoder.bn1.num_batches_tracked"].dtype == torch.int64

    state.scaler.update(new_scale=2.0**60)  # a skipped step: the EMA moves towards unchanged weights
    loop_mod._train_step(state, 0, image, label, torch.Generator())
    ema3 = weights(state.ema.module)
    assert all(torch.isfinite(v).all() for v in ema3.values() if v.is_floating_point())
    assert all(torch.equal(w2[k], v) for k, v in weights(state.model).items() if "running" not in k
               and "num_batches" not in k)


# ----------------------------------------------------------------------------------------------
# channels_last_3d
# ----------------------------------------------------------------------------------------------


def test_channels_last_training_feeds_channels_last_and_matches_contiguous(tiny_train_data):
    image, label = fixed_batch()
    losses, formats = [], []
    for channels_last in (False, True):
        state = set_up(make_cfg(train={"channels_last": channels_last}), tiny_train_data)
        conv = next(m for m in state.model.modules() if isinstance(m, torch.nn.Conv3d) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d) == channels_last
        # the 1-channel batch is contiguous in both formats: the convolutions' outputs show the format
        # (InstanceNorm hands the next convolution a contiguous tensor again; benchmarks/gpu.py times it)
        seen: list[bool] = []
        for m in state.model.modules():
            if isinstance(m, torch.nn.Conv3d) and m.out_channels > 1:
                m.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last_3d)))
        losses.append(float(loop_mod._train_step(state, 0, image.clone(), label, torch.Generator())["total"]))
        formats.append(set(seen))
    assert formats == [{False}, {True}]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_channels_last_inference_matches_contiguous():
    torch.manual_seed(0)
    from kaggle_utils.models import ModelConfig, build_model

    model = build_model(ModelConfig(**RESENC)).eval()
    vol = np.random.default_rng(0).normal(size=(40, 48, 36)).astype(np.float32)
    plain = predict_volume(model, vol, InferenceConfig(patch_size=(32, 32, 32), tta="flips"), "cpu")
    cl = predict_volume(model, vol, InferenceConfig(patch_size=(32, 32, 32), tta="flips", channels_last=True), "cpu")
    np.testing.assert_allclose(cl, plain, atol=1e-5)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last_3d)))
    windows = torch.randn(2, 1, 32, 32, 32)
    predict_windows([model], windows, [1.0], tta_transforms("flips"), channels_last=True)
    assert len(seen) == 8 and all(seen)  # every TTA pass, flipped views included


# ----------------------------------------------------------------------------------------------
# pinned memory and non_blocking copies
# ----------------------------------------------------------------------------------------------


def test_pin_memory_is_requested_only_on_cuda_and_harmless_on_cpu(tiny_train_data, monkeypatch):
    from kaggle_utils import sampling

    calls = []
    real = sampling.make_loader
    monkeypatch.setattr(setup_mod, "make_loader", lambda *a, **k: calls.append(k) or real(*a, **k))
    state = set_up(make_cfg(), tiny_train_data)
    assert calls[-1]["pin_memory"] is False  # CPU training: nothing to pin for

    # requested on a machine without a GPU, the loader warns and yields the same batches, unpinned
    plain = [b[0] for b in sampling.make_loader(state.dataset, batch_size=2, num_workers=0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pinned = [b[0] for b in sampling.make_loader(state.dataset, batch_size=2, num_workers=0, pin_memory=True)]
    assert len(plain) == len(pinned) == 2
    for a, b in zip(plain, pinned):
        assert torch.equal(a, b)
        assert b.is_pinned() == torch.cuda.is_available()


def test_non_blocking_copy_leaves_the_loader_batch_untouched(tiny_train_data):
    """On the CPU ``.to(dev, non_blocking=True)`` returns the loader's own tensor (on CUDA, a copy):
    the step, augmentation included, must not write into it, or CPU and GPU runs would differ."""
    cfg = make_cfg(train={"augment": True}, augment={"p_flip": 1.0, "p_intensity": 1.0, "p_noise": 1.0,
                                                     "p_gamma": 1.0, "p_affine": 1.0})
    state = set_up(cfg, tiny_train_data)
    image, label = fixed_batch()
    image_before, label_before = image.clone(), label.clone()
    loop_mod._train_step(state, 0, image, label, torch.Generator().manual_seed(1))
    assert torch.equal(image, image_before) and torch.equal(label, label_before)


# ----------------------------------------------------------------------------------------------
# Out-of-memory fallback of sliding-window inference
# ----------------------------------------------------------------------------------------------


class _OOMOnce(torch.nn.Module):
    """Wraps a model; raises ``torch.OutOfMemoryError`` on the first ``fail`` forwards (as a GPU would)."""

    def __init__(self, model: torch.nn.Module, fail: int = 1):
        super().__init__()
        self.model, self.fail, self.batches = model, fail, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(x.shape[0]))
        if self.fail > 0:
            self.fail -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return self.model(x)


def test_oom_retries_with_half_the_window_batch_and_gives_the_same_probabilities():
    torch.manual_seed(0)
    inner = torch.nn.Conv3d(1, 1, 3, padding=1)
    vol = np.random.default_rng(1).normal(size=(48, 48, 48)).astype(np.float32)
    expected = sliding_window_predict(inner, vol, 32, overlap=0.5, batch_size=4, device="cpu")
    flaky = _OOMOnce(inner)
    with pytest.warns(RuntimeWarning, match="window batch 4 .* retrying with window batch 2"):
        got = sliding_window_predict(flaky, vol, 32, overlap=0.5, batch_size=4, device="cpu")
    assert flaky.batches[0] == 4 and max(flaky.batches[1:]) == 2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)  # batch-size-dependent float rounding only


def test_oom_that_persists_is_raised_after_every_fallback():
    flaky = _OOMOnce(torch.nn.Conv3d(1, 1, 3, padding=1), fail=10**6)
    vol = np.zeros((48, 48, 48), np.float32)  # 8 windows of 32^3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(torch.OutOfMemoryError):
            sliding_window_predict(flaky, vol, 32, batch_size=4, device="cpu")
    assert flaky.batches == [4, 2, 1]


def test_oom_fallback_order_on_a_gpu_moves_accumulation_to_the_cpu_last():
    tried = []

    def run(bs: int, dev) -> str:
        tried.append((bs, str(dev)))
        if str(dev) == "cuda":
            raise torch.OutOfMemoryError("simulated")
        return "done"

    with pytest.warns(RuntimeWarning):
        assert run_with_oom_fallback(run, 4, torch.device("cuda")) == "done"
    assert tried == [(4, "cuda"), (2, "cuda"), (1, "cuda"), (1, "cpu")]


def test_a_non_oom_error_is_not_retried():
    tried = []

    def run(bs: int, dev) -> None:
        tried.append(bs)
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_with_oom_fallback(run, 4, "cpu")
    assert tried == [4]


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, 2 processes): the gradient of the union batch
# ----------------------------------------------------------------------------------------------

DDP_CFG = {"train": {"batch_size": 1}, "optim": {"accumulate": 2}}  # per rank: two micro-batches of one


def sgd_step_weights(cfg: TrainConfig, data_dir: Path, batches: list) -> dict[str, torch.Tensor]:
    """Weights after one optimizer step of ``train.loop._train_step`` over ``batches`` (micro-batches), on
    the ranks of this process's launch (``WORLD_SIZE``), or one process."""
    dist = dist_mod._Dist("cpu")
    try:
        state = setup_mod._set_up(cfg, data_dir, None, 0, dist, None, 0.0, False)
        setup_mod._wrap_ddp(state)
        for i, (image, label) in enumerate(batches):
            loop_mod._train_step(state, i, image, label, torch.Generator())
        return weights(state.model)
    finally:
        dist.close()


DDP_SCRIPT = """
import json, sys, torch
sys.path.insert(0, sys.argv[3])
import test_gpu_paths as t
rank = int(__import__("os").environ["RANK"])
cfg = t.make_cfg(**json.loads(sys.argv[1]))
image, label = t.fixed_batch(4)
mine = range(2 * rank, 2 * rank + 2)  # rank r: samples 2r and 2r+1, one per micro-batch
w = t.sgd_step_weights(cfg, sys.argv[2], [(image[i:i + 1], label[i:i + 1]) for i in mine])
if rank == 0:
    torch.save(w, sys.argv[4])
"""


@pytest.mark.slow
def test_ddp_gloo_two_processes_step_equals_one_process_on_the_union_batch(tiny_train_data, tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
         json.dumps(DDP_CFG), str(tiny_train_data), str(Path(__file__).parent), str(tmp_path / "ddp.pt")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)

    image, label = fixed_batch(4)
    w0 = weights(set_up(make_cfg(), tiny_train_data).model)  # the same seed: the same initial weights
    union = sgd_step_weights(make_cfg(train={"batch_size": 4}), tiny_train_data, [(image, label)])
    local = sgd_step_weights(make_cfg(train={"batch_size": 2}), tiny_train_data, [(image[:2], label[:2])])
    moved = [k for k in w0 if not torch.equal(w0[k], union[k])]
    assert len(moved) > 20
    for k in w0:
        torch.testing.assert_close(ddp[k], union[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    assert any(not torch.allclose(ddp[k], local[k], rtol=1e-4, atol=1e-6) for k in moved), \
        "the DDP step equals rank 0's own half: gradients were not all-reduced"
