"""3D segmentation models (segmentation-models-pytorch-3d and nnU-Net's networks), patch-size checks
and checkpoints.

Two families, one :class:`ModelConfig`:

* smp-3d encoder/decoder networks (``arch`` ``Unet``, ``UnetPlusPlus``, ``FPN``, ``MAnet``,
  ``Linknet`` with an ``encoder`` of :data:`KNOWN_ENCODERS`);
* nnU-Net's networks from ``dynamic-network-architectures`` (``arch`` ``ResEncUNet``, the residual
  encoder U-Net of nnU-Net's ResEnc presets that won this competition, and ``PlainConvUNet``, nnU-Net's
  default U-Net), sized by a ``preset`` of :data:`NNUNET_PRESETS` (``resenc-m`` for 128³, ``resenc-l``
  for 192³, ``resenc-xl`` for 256³ with 7 stages, ``plain-m``) whose every field can be overridden
  (``n_stages``, ``features_per_stage``, ``strides``, ``n_blocks_per_stage``, ...). The preset is
  resolved into explicit fields when the config is built, so a checkpoint's ``model_config`` describes
  the network completely and rebuilds it without the preset table.

A model maps a normalized CT patch ``float32 (B, 1, Z, Y, X)`` to surface logits
``float32 (B, 1, Z, Y, X)`` (one channel, no activation). It is described by a :class:`ModelConfig`
so that a checkpoint can rebuild it from plain data.

Checkpoints are written with :func:`save_checkpoint` (atomic: a killed write never leaves a broken
file) and read with :func:`load_checkpoint`, which uses ``torch.load(weights_only=True)``: everything
stored must be tensors, numbers, strings, ``None`` and lists/tuples/dicts of those. The config goes
in as plain dicts (``config.to_dict``), RNG states as tensors or lists.

:func:`export_checkpoint` (``python -m kaggle_utils export``) turns a training checkpoint into a small
inference file (:data:`EXPORT_FORMAT`): the weights (EMA when present, optionally float16), the model
config, the ``inference`` and ``postprocess`` sections and the intensity normalization; no optimizer,
scheduler, scaler, RNG or history. :func:`load_checkpoint` reads both kinds.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .config import as_patch_shape

__all__ = [
    "ARCHITECTURES",
    "NNUNET_ARCHITECTURES",
    "NNUNET_PRESETS",
    "NNUNet",
    "set_deep_supervision",
    "KNOWN_ENCODERS",
    "ModelConfig",
    "build_model",
    "describe_model",
    "model_divisor",
    "bottleneck_min_voxels",
    "validate_patch_size",
    "CheckpointError",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "save_checkpoint",
    "load_checkpoint",
    "export_checkpoint",
    "find_checkpoints",
    "unwrap_model",
]

#: nnU-Net's networks (``dynamic-network-architectures``): residual-encoder and plain-conv U-Nets.
NNUNET_ARCHITECTURES = ("ResEncUNet", "PlainConvUNet")

#: Decoder architectures that build and run on 3D patches: smp-3d's, then nnU-Net's.
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "MAnet", "Linknet") + NNUNET_ARCHITECTURES

_RESENC_6 = dict(n_stages=6, features_per_stage=[32, 64, 128, 256, 320, 320], strides=[1, 2, 2, 2, 2, 2],
                 n_blocks_per_stage=[1, 3, 4, 6, 6, 6], n_conv_per_stage_decoder=[1, 1, 1, 1, 1])

#: nnU-Net plans for an isotropic patch (nnunetv2 ResEnc presets; 3x3x3 kernels, InstanceNorm3d affine
#: eps 1e-5, LeakyReLU 0.01, conv bias): ``resenc-m`` is the 128^3 network of the 1st place (~9-11 GB
#: at batch 2), ``resenc-l`` the same 6-stage network planned for 192^3 (24 GB class), ``resenc-xl``
#: the 7-stage network nnU-Net plans for a 256^3 patch; ``plain-m`` nnU-Net's default 3d_fullres U-Net
#: (2 convs per stage) for 128^3. ``patch_size`` is the patch each plan was made for (documentation; the
#: sampler's patch size decides).
NNUNET_PRESETS: dict[str, dict[str, Any]] = {
    "resenc-m": dict(arch="ResEncUNet", patch_size=128, **_RESENC_6),
    "resenc-l": dict(arch="ResEncUNet", patch_size=192, **_RESENC_6),
    "resenc-xl": dict(arch="ResEncUNet", patch_size=256, n_stages=7,
                      features_per_stage=[32, 64, 128, 256, 320, 320, 320], strides=[1, 2, 2, 2, 2, 2, 2],
                      n_blocks_per_stage=[1, 3, 4, 6, 6, 6, 6], n_conv_per_stage_decoder=[1, 1, 1, 1, 1, 1]),
    "plain-m": dict(arch="PlainConvUNet", patch_size=128, n_stages=6,
                    features_per_stage=[32, 64, 128, 256, 320, 320], strides=[1, 2, 2, 2, 2, 2],
                    n_blocks_per_stage=[2, 2, 2, 2, 2, 2], n_conv_per_stage_decoder=[2, 2, 2, 2, 2]),
}
_DEFAULT_PRESET = {"ResEncUNet": "resenc-m", "PlainConvUNet": "plain-m"}
_NNUNET_FIELDS = ("n_stages", "features_per_stage", "strides", "n_blocks_per_stage", "n_conv_per_stage_decoder")

#: Encoders checked to build and run forward/backward in 3D with one input channel.
KNOWN_ENCODERS = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "densenet121",
    "efficientnet-b0",
    "efficientnet-b1",
    "efficientnet-b2",
    "efficientnet-b3",
    "dpn68",
    "vgg11",
    "tu-resnet18",
)


#: ``format`` marker of an exported inference file (:func:`export_checkpoint`).
EXPORT_FORMAT = "kaggle_utils.inference_model"
#: Newest ``format_version`` of exported files this code reads and writes.
EXPORT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. The message names the file and the problem."""


@dataclass
class ModelConfig:
    """Which network to build.

    Attributes:
        arch: decoder architecture, one of :data:`ARCHITECTURES` (``Unet``, ``UnetPlusPlus``, ``FPN``,
            ``MAnet``, ``Linknet``).
        encoder: encoder backbone, one of :data:`KNOWN_ENCODERS` (3D versions from smp-3d).
        encoder_weights: smp-3d pretrained-weights name; ``None`` (default) means random init. Named
            weights are downloaded, which Kaggle's offline rerun cannot do: prefer ``weights_path``.
        weights_path: optional local file with a state dict (or a checkpoint of :func:`save_checkpoint`)
            loaded into the freshly built model, e.g. from an attached Kaggle dataset.
        decoder_channels: channels of the 5 decoder stages (``Unet``, ``UnetPlusPlus``, ``MAnet``);
            ``None`` uses smp's default (256, 128, 64, 32, 16). Smaller is much faster on CPU.
        in_channels: input channels (1: the CT intensity).
        classes: output channels (1: one surface logit).
        preset: nnU-Net archs only: a :data:`NNUNET_PRESETS` name (default ``resenc-m`` for
            ``ResEncUNet``, ``plain-m`` for ``PlainConvUNet``); fields below left ``null`` take its values.
        n_stages: nnU-Net archs: resolution stages (encoder stages; the decoder has one less).
        features_per_stage: nnU-Net archs: channels of each stage, ``n_stages`` values.
        strides: nnU-Net archs: isotropic downsampling stride of each stage (the first is 1); every
            patch edge must be a multiple of their product (:func:`model_divisor`).
        n_blocks_per_stage: residual blocks (``ResEncUNet``) or convolutions (``PlainConvUNet``) per
            encoder stage, ``n_stages`` values.
        n_conv_per_stage_decoder: convolutions per decoder stage, ``n_stages - 1`` values.
        kernel_size: nnU-Net archs: isotropic convolution kernel (3).
        conv_bias: nnU-Net archs: convolutions with a bias (nnU-Net: on).
        norm_eps: nnU-Net archs: ``InstanceNorm3d(affine=True, eps=norm_eps)``.
        negative_slope: nnU-Net archs: ``LeakyReLU(negative_slope)``.

    For the nnU-Net archs ``encoder``, ``encoder_weights`` and ``decoder_channels`` are not used.
    """

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    weights_path: str | None = None
    decoder_channels: list[int] | None = None
    in_channels: int = 1
    classes: int = 1
    preset: str | None = None
    n_stages: int | None = None
    features_per_stage: list[int] | None = None
    strides: list[int] | None = None
    n_blocks_per_stage: list[int] | None = None
    n_conv_per_stage_decoder: list[int] | None = None
    kernel_size: int = 3
    conv_bias: bool = True
    norm_eps: float = 1e-5
    negative_slope: float = 0.01

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch: unknown architecture {self.arch!r}; choose one of {list(ARCHITECTURES)}")
        if self.arch in NNUNET_ARCHITECTURES:
            self._resolve_nnunet()
        elif self.preset is not None:
            raise ValueError(f"model.preset: {self.preset!r} is for the nnU-Net archs {list(NNUNET_ARCHITECTURES)}, "
                             f"not {self.arch}")
        if self.encoder not in KNOWN_ENCODERS:
            raise ValueError(
                f"model.encoder: {self.encoder!r} is not a known-good 3D encoder; choose one of {list(KNOWN_ENCODERS)}"
            )
        if self.decoder_channels is not None and len(self.decoder_channels) != 5:
            raise ValueError(
                f"model.decoder_channels: needs 5 values (one per encoder stage), got {list(self.decoder_channels)}"
            )
        if self.in_channels < 1 or self.classes < 1:
            raise ValueError("model.in_channels and model.classes must be >= 1")

    def _resolve_nnunet(self) -> None:
        """Fill the ``null`` nnU-Net fields from the preset and check their lengths (``ValueError`` naming the key)."""
        name = self.preset or _DEFAULT_PRESET[self.arch]
        if name not in NNUNET_PRESETS:
            raise ValueError(f"model.preset: unknown preset {name!r}; choose one of {sorted(NNUNET_PRESETS)}")
        plan = NNUNET_PRESETS[name]
        if plan["arch"] != self.arch:
            raise ValueError(f"model.preset: {name!r} is a {plan['arch']} preset, not a {self.arch} one")
        self.preset = name
        if self.n_stages is None:
            self.n_stages = len(self.features_per_stage) if self.features_per_stage else plan["n_stages"]
        n = int(self.n_stages)
        if n < 2:
            raise ValueError(f"model.n_stages: must be >= 2, got {n}")
        for key in _NNUNET_FIELDS[1:]:
            want = n - 1 if key == "n_conv_per_stage_decoder" else n
            value = getattr(self, key)
            if value is None:  # the preset's values, cut or extended (last value repeated) to n stages
                base = list(plan[key])
                value = base[:want] + [base[-1]] * max(0, want - len(base))
            value = [int(v) for v in value]
            if len(value) != want:
                raise ValueError(f"model.{key}: needs {want} values for n_stages {n}, got {value}")
            if any(v < 1 for v in value):
                raise ValueError(f"model.{key}: every value must be >= 1, got {value}")
            setattr(self, key, value)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"model.kernel_size: must be an odd number >= 1, got {self.kernel_size}")


def model_divisor(cfg: ModelConfig | None = None) -> int:
    """Every patch edge must be a multiple of this: the network's total downsampling.

    32 for the smp-3d networks (5 encoder stages, each halving every edge); the product of
    ``strides`` for the nnU-Net archs (32 for ``resenc-m``/``resenc-l``, 64 for ``resenc-xl``).
    """
    if cfg is not None and cfg.arch in NNUNET_ARCHITECTURES and cfg.strides:
        return int(math.prod(cfg.strides))
    return 32


def bottleneck_min_voxels(cfg: ModelConfig | None = None, batch_size: int | None = None) -> int:
    """Fewest voxels the deepest feature map may have: 2 for the nnU-Net archs, 1 otherwise (2 at batch 1).

    nnU-Net's networks normalize with ``InstanceNorm3d``, which computes a mean and variance over each
    sample's spatial voxels and raises ("Expected more than 1 spatial element") on a 1x1x1 map, in
    training and in eval mode alike. The smp-3d networks use BatchNorm, which pools over the batch too:
    a 1x1x1 map fails only when training with one patch per batch (``batch_size`` 1).
    """
    if cfg is not None and cfg.arch in NNUNET_ARCHITECTURES:
        return 2
    return 2 if batch_size == 1 else 1


def _check_bottleneck(edges: tuple[int, ...], divisor: int, min_voxels: int, name: str) -> None:
    """``ValueError`` naming the patch when its deepest feature map (``edges // divisor``) is too small."""
    deepest = [e // divisor for e in edges]
    if math.prod(deepest) >= min_voxels:
        return
    raise ValueError(
        f"{name}: {list(edges)} leaves a {'x'.join(map(str, deepest))} feature map after the network's {divisor}x "
        f"downsampling, and its normalization (InstanceNorm; BatchNorm at batch size 1) needs more than one voxel "
        f"there: make at least one edge "
        f"{2 * divisor} (the smallest cube that works is {2 * divisor}^3)"
    )


def validate_patch_size(shape: int | Sequence[int], divisor: int = 32, name: str = "patch_size",
                        min_bottleneck_voxels: int = 1) -> tuple[int, int, int]:
    """Check a 3D patch size before it reaches the network.

    smp-3d encoders halve every edge ``log2(divisor)`` times and concatenate the skip connections
    on the way up; an edge that is not a multiple of ``divisor`` fails deep inside ``torch.cat``
    with a message about tensor sizes. This gives a clear error instead.

    Args:
        shape: one edge length (cube) or ``(Z, Y, X)``.
        divisor: required multiple (:func:`model_divisor`; 32 for a 5-stage encoder).
        name: the config key to name in the error.
        min_bottleneck_voxels: fewest voxels the deepest feature map (each edge / ``divisor``) must
            have (:func:`bottleneck_min_voxels`: 2 for the InstanceNorm of the nnU-Net archs).

    Returns:
        ``(Z, Y, X)`` as a tuple of ints.

    Raises:
        ValueError: not a patch shape (:func:`~kaggle_utils.config.as_patch_shape`), an edge not a multiple of ``divisor``,
            or a deepest feature map of fewer than ``min_bottleneck_voxels`` voxels.
    """
    edges = as_patch_shape(shape, name)
    bad = [(axis, e) for axis, e in zip("zyx", edges) if e % divisor]
    if bad:
        details = ", ".join(
            f"{axis}={e} (use {max(divisor, e // divisor * divisor)} or {(e // divisor + 1) * divisor})"
            for axis, e in bad
        )
        raise ValueError(
            f"{name}: every edge must be a positive multiple of {divisor} (the encoder downsamples "
            f"{divisor}x), got {list(edges)}: {details}"
        )
    _check_bottleneck(edges, divisor, min_bottleneck_voxels, name)
    return edges  # type: ignore[return-value]


def _load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"model.weights_path: {path}: file not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.weights_path: {path}: expected a state dict or a kaggle_utils checkpoint")
    return {k.removeprefix("module."): v for k, v in state.items()}


class NNUNet(nn.Module):
    """An nnU-Net network (``dynamic-network-architectures``) with switchable deep supervision.

    The decoder always holds one segmentation head per stage (so the state dict does not depend on
    deep supervision). In ``train()`` mode with :attr:`deep_supervision` on, ``forward`` returns one
    logits tensor per decoder stage, highest resolution first (``(B, classes, Z/s_k, Y/s_k, X/s_k)``,
    ``s_0 = 1``); otherwise (evaluation, validation, inference) only the full-resolution logits
    ``float32 (B, classes, Z, Y, X)``, as every other model here.

    Args:
        net: a ``ResidualEncoderUNet`` or ``PlainConvUNet`` built with ``deep_supervision=True``.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.deep_supervision = False

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        ds = self.deep_supervision and self.training
        self.net.decoder.deep_supervision = ds
        out = self.net(x)
        return list(out) if ds else out


def set_deep_supervision(model: nn.Module, enabled: bool) -> bool:
    """Switch deep supervision of an :class:`NNUNet` (inside any DDP/compile/EMA wrapper) on or off.

    Returns:
        whether ``model`` supports it (``False`` for the smp-3d networks: nothing changed).
    """
    inner = unwrap_model(model)
    if isinstance(inner, NNUNet):
        inner.deep_supervision = bool(enabled)
        return True
    return False


def _build_nnunet(cfg: ModelConfig) -> nn.Module:
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    common = dict(
        input_channels=cfg.in_channels, n_stages=cfg.n_stages, features_per_stage=list(cfg.features_per_stage),
        conv_op=nn.Conv3d, kernel_sizes=[[cfg.kernel_size] * 3] * cfg.n_stages,
        strides=[[s] * 3 for s in cfg.strides], num_classes=cfg.classes,
        n_conv_per_stage_decoder=list(cfg.n_conv_per_stage_decoder), conv_bias=cfg.conv_bias,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": cfg.norm_eps, "affine": True},
        dropout_op=None, dropout_op_kwargs=None, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": cfg.negative_slope, "inplace": True}, deep_supervision=True,
    )
    if cfg.arch == "ResEncUNet":
        net = ResidualEncoderUNet(n_blocks_per_stage=list(cfg.n_blocks_per_stage), **common)
    else:
        net = PlainConvUNet(n_conv_per_stage=list(cfg.n_blocks_per_stage), **common)
    net.apply(net.initialize)  # nnU-Net's He init (and zeroed last norm of each residual block)
    return NNUNet(net)


def build_model(cfg: ModelConfig | None = None) -> nn.Module:
    """Build the network described by ``cfg`` (defaults: resnet18 U-Net, random init).

    Returns:
        ``nn.Module`` mapping ``float32 (B, in_channels, Z, Y, X)`` to logits
        ``float32 (B, classes, Z, Y, X)``; edges must pass :func:`validate_patch_size` with
        :func:`model_divisor`. The nnU-Net archs return an :class:`NNUNet` (a list of logits per
        decoder stage in training mode once :func:`set_deep_supervision` switched it on).
    """
    cfg = cfg or ModelConfig()
    if cfg.arch in NNUNET_ARCHITECTURES:
        model = _build_nnunet(cfg)
        if cfg.weights_path:
            _load_weights(model, cfg)
        return model
    # its first import draws from torch's RNG: fork it, so a process's first model is initialized as every later one
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        warnings.simplefilter("ignore", FutureWarning)  # smp-3d imports torch.jit.script users
        import segmentation_models_pytorch_3d as smp

    kwargs: dict[str, Any] = dict(
        encoder_name=cfg.encoder,
        encoder_weights=cfg.encoder_weights,
        in_channels=cfg.in_channels,
        classes=cfg.classes,
    )
    if cfg.arch in ("Unet", "UnetPlusPlus", "MAnet"):
        kwargs["decoder_channels"] = list(cfg.decoder_channels or (256, 128, 64, 32, 16))
    model = getattr(smp, cfg.arch)(**kwargs)
    if cfg.weights_path:
        _load_weights(model, cfg)
    return model


def _load_weights(model: nn.Module, cfg: ModelConfig) -> None:
    state = _load_state(cfg.weights_path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same keys, other shapes
        first = (str(exc).strip().splitlines() or [""])[-1].strip()[:200]
        raise ValueError(f"model.weights_path: {cfg.weights_path} does not fit {describe_model(cfg)}: {first}") from None
    if missing or unexpected:
        raise ValueError(
            f"model.weights_path: {cfg.weights_path} does not fit {describe_model(cfg)}: "
            f"{len(missing)} missing key(s) e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}"
        )


def describe_model(cfg: ModelConfig) -> str:
    """``ResEncUNet/resenc-m`` or ``Unet/resnet18``: the network in a few characters, for messages."""
    return f"{cfg.arch}/{cfg.preset if cfg.arch in NNUNET_ARCHITECTURES else cfg.encoder}"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside ``DistributedDataParallel`` / ``DataParallel`` / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, **state: Any) -> Path:
    """Write a checkpoint atomically (temporary file + rename).

    Args:
        path: destination (``RUN_DIR/last.pt``).
        **state: what to store, e.g. ``model=state_dict, model_config=to_dict(cfg.model),
            config=to_dict(cfg), epoch=3``. Only tensors, numbers, strings, bools, ``None`` and
            lists/tuples/dicts of them, so :func:`load_checkpoint` can use ``weights_only=True``.
            ``nn.Module`` values are stored as their (unwrapped) state dict. ``kaggle_utils_version``
            (:func:`kaggle_utils.version.version_stamp`) is added unless given.
    """
    from .data import atomic_path
    from .version import CHECKPOINT_KEY, version_stamp

    state = {k: (unwrap_model(v).state_dict() if isinstance(v, nn.Module) else v) for k, v in state.items()}
    state.setdefault(CHECKPOINT_KEY, version_stamp())  # which code wrote it: "0.1.0 (commit 1a2b3c4d5e)"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _load_failure(path: Path, exc: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused ``path``, in our words.

    Never torch's own message: for pickled objects it advises ``weights_only=False``, which would run
    any code the file carries; a kaggle_utils checkpoint never needs it.
    """
    import zipfile

    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    with open(path, "rb") as fh:
        if fh.read(6) == b"\x93NUMPY":
            return "it is a numpy .npy file, not a torch checkpoint"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one has lost its directory
        return "truncated or not a torch file"
    if "weights only load failed" in str(exc).lower():
        return ("it holds pickled Python objects beyond tensors and plain values (a whole pickled model, a numpy "
                "file, another tool's checkpoint?); kaggle_utils loads weights only and never runs pickled code")
    return f"truncated or not a torch file ({type(exc).__name__})"


def _torch_load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` of a kaggle_utils checkpoint, or a one-line :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled objects outside the allowlist
        raise CheckpointError(f"{path}: cannot load checkpoint, {_load_failure(path, exc)}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a kaggle_utils checkpoint (no 'model' entry)")
    if ckpt.get("format") == EXPORT_FORMAT and int(ckpt.get("format_version") or 0) > EXPORT_VERSION:
        raise CheckpointError(
            f"{path}: exported with format version {ckpt['format_version']}, this kaggle_utils reads up to "
            f"{EXPORT_VERSION}: install the kaggle_utils version that exported it"
        )
    return ckpt


def _model_config_dict(path: Path, ckpt: dict) -> dict:
    model_dict = ckpt.get("model_config") or (ckpt.get("config") or {}).get("model")
    if model_dict is None:
        raise CheckpointError(f"{path}: checkpoint has no model_config; cannot rebuild the network")
    return dict(model_dict)


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", use_ema: bool = True
) -> tuple[nn.Module, dict, dict]:
    """Rebuild the model stored in a checkpoint of :func:`save_checkpoint` or :func:`export_checkpoint`.

    The checkpoint needs ``model`` (a state dict) and ``model_config`` (a :class:`ModelConfig` as a
    dict) or ``config["model"]``. When it also holds ``ema`` weights and ``use_ema`` is true, those
    are loaded (they are what validation scored). Float16 weights of an ``export --fp16`` file are
    cast to float32.

    Returns:
        ``(model in eval mode on map_location, config dict (the full training config when stored;
        the model, inference, postprocess and sampler.normalization sections of an exported file),
        the whole checkpoint dict)``.

    Raises:
        CheckpointError: file missing, unreadable, not a kaggle_utils checkpoint, without a model
            config, of a newer export format, or weights that do not fit the model config.
    """
    from .config import from_dict

    path = Path(path)
    ckpt = _torch_load(path, map_location)
    cfg_dict = ckpt.get("config") or {}
    model_dict = dict(_model_config_dict(path, ckpt), weights_path=None, encoder_weights=None)
    model_cfg = from_dict(ModelConfig, model_dict, "model")
    model = build_model(model_cfg)
    state = ckpt["ema"] if use_ema and isinstance(ckpt.get("ema"), dict) else ckpt["model"]
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32 else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: weights do not fit {describe_model(model_cfg)} "
                              f"({first})") from None
    model.to(map_location).eval()
    return model, cfg_dict, ckpt


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fp16: bool = False) -> Path:
    """Write the small inference file of a checkpoint: what ``predict`` needs and nothing else.

    Keeps the weights (the EMA weights when the checkpoint has them, else the model's; floating
    tensors cast to float16 with ``fp16``, integer buffers unchanged), ``model_config``, the
    ``config`` sections ``model``, ``inference``, ``postprocess`` and ``sampler.normalization`` (the
    intensity normalization inference must repeat), ``fold`` (for ``predict --save-probs`` sidecars),
    ``trained_with`` (the version stamp of the code that trained it; ``kaggle_utils_version`` is the
    exporting code's) and ``format``/``format_version``/``weights``/``dtype`` markers. Drops optimizer, scaler,
    scheduler, RNG states, metrics and history. The file loads with ``torch.load(weights_only=True)``
    through :func:`load_checkpoint` and ``predict``.

    Args:
        src: a checkpoint of :func:`save_checkpoint` (``RUN_DIR/best.pt``) or an exported file.
        dst: the file to write (atomically), e.g. ``model.pt``.
        fp16: store float16 weights (about half the size; predictions within ~1e-3 in probability).

    Returns:
        ``Path(dst)``.

    Raises:
        CheckpointError: ``src`` is not a usable checkpoint or ``dst`` is the same file.
        OutputError: ``dst`` cannot be written (checked before ``src`` is read) or has no room for the weights
            (``DiskFullError``, before writing).
    """
    from .outputs import check_output

    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.is_file() and src.is_file() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: refusing to overwrite the source checkpoint; choose another --out")
    check_output(dst, "file", what="--out")  # read-only, a folder in the way: before loading anything
    ckpt = _torch_load(src)
    model_dict = _model_config_dict(src, ckpt)
    use_ema = isinstance(ckpt.get("ema"), dict)
    state = ckpt["ema"] if use_ema else ckpt["model"]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{src}: the {'ema' if use_ema else 'model'} entry is not a state dict of tensors")
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    state = {k.removeprefix("module."): v.detach().clone().contiguous() for k, v in state.items()}
    cfg = ckpt.get("config") or {}
    normalization = (cfg.get("sampler") or {}).get("normalization") or "zscore"
    config = {"model": model_dict, "sampler": {"normalization": normalization}}
    for section in ("inference", "postprocess"):
        if isinstance(cfg.get(section), dict):
            config[section] = dict(cfg[section])
    fold = ckpt.get("fold")
    if fold is None:
        fold = (cfg.get("train") or {}).get("fold")
    check_output(dst, "file", need_bytes=sum(v.numel() * v.element_size() for v in state.values()), what="--out")
    weights_kind = "ema" if use_ema else ("model" if ckpt.get("format") != EXPORT_FORMAT else ckpt.get("weights", "model"))
    from .version import CHECKPOINT_KEY

    return save_checkpoint(
        dst, format=EXPORT_FORMAT, format_version=EXPORT_VERSION, model=state, model_config=model_dict,
        config=config, fold=fold, weights=weights_kind,
        trained_with=ckpt.get("trained_with") or ckpt.get(CHECKPOINT_KEY) or "unknown (no version stamp)",
        dtype="float16" if any(v.dtype == torch.float16 for v in state.values()) else "float32",
    )


def _trained_on_everything(folder: Path) -> bool:
    """Whether ``folder`` holds a finished run that held nothing out (its ``result.json`` says fold
    ``"all"``, or nothing was validated): its ``last.pt`` is the final, annealed model and it has no ``best.pt``."""
    import json

    try:
        result = json.loads((folder / "result.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(result, dict) and (result.get("fold") == "all" or result.get("best_epoch") is None)


def find_checkpoints(root: str | os.PathLike, names: Sequence[str] = ("model.pt", "best.pt")) -> list[str]:
    """Checkpoints under ``root`` (e.g. ``/kaggle/input``): per folder, the first of ``names`` present.

    With the default names a folder holding both an exported ``model.pt`` and the training
    ``best.pt`` contributes only ``model.pt`` (the same weights, smaller); a folder with only
    ``best.pt`` contributes that. A folder with none of ``names`` but a finished run trained on every
    volume (``--fold all`` or ``train.n_folds`` 1: ``result.json`` with fold ``"all"`` or no validation)
    contributes its ``last.pt``, the final weights of the winners' path; a ``last.pt`` of a fold run (or of
    an unfinished run) never counts. Returns sorted paths (strings); ``[]`` when ``root`` is missing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    by_folder: dict[Path, Path] = {}
    for name in reversed(list(names)):  # earlier names overwrite later ones
        for path in root.rglob(name):
            if path.is_file():
                by_folder[path.parent] = path
    for path in root.rglob("last.pt"):
        if path.is_file() and path.parent not in by_folder and _trained_on_everything(path.parent):
            by_folder[path.parent] = path
    return sorted(str(p) for p in by_folder.values())
