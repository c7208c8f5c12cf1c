"""3D segmentation models (segmentation-models-pytorch-3d), patch-size checks and checkpoints.

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

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "ARCHITECTURES",
    "KNOWN_ENCODERS",
    "ModelConfig",
    "build_model",
    "model_divisor",
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

#: Decoder architectures of segmentation-models-pytorch-3d that build and run on 3D patches.
ARCHITECTURES = ("Unet", "UnetPlusPlus", "FPN", "MAnet", "Linknet")

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
    """

    arch: str = "Unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    weights_path: str | None = None
    decoder_channels: list[int] | None = None
    in_channels: int = 1
    classes: int = 1

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch: unknown architecture {self.arch!r}; choose one of {list(ARCHITECTURES)}")
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


def model_divisor(cfg: ModelConfig | None = None) -> int:
    """Every patch edge must be a multiple of this: 32 (5 encoder stages, each halving every edge)."""
    return 32


def validate_patch_size(shape: int | Sequence[int], divisor: int = 32, name: str = "patch_size") -> tuple[int, int, int]:
    """Check a 3D patch size before it reaches the network.

    smp-3d encoders halve every edge ``log2(divisor)`` times and concatenate the skip connections
    on the way up; an edge that is not a multiple of ``divisor`` fails deep inside ``torch.cat``
    with a message about tensor sizes. This gives a clear error instead.

    Args:
        shape: one edge length (cube) or ``(Z, Y, X)``.
        divisor: required multiple (:func:`model_divisor`; 32 for a 5-stage encoder).
        name: the config key to name in the error.

    Returns:
        ``(Z, Y, X)`` as a tuple of ints.

    Raises:
        ValueError: wrong number of edges, non-positive edge or an edge not a multiple of ``divisor``.
    """
    edges = (int(shape),) * 3 if isinstance(shape, (int, float)) else tuple(int(s) for s in shape)
    if len(edges) != 3:
        raise ValueError(f"{name}: expected 3 edges (z, y, x), got {list(edges)}")
    bad = [(axis, e) for axis, e in zip("zyx", edges) if e <= 0 or e % divisor]
    if bad:
        details = ", ".join(
            f"{axis}={e} (use {max(divisor, e // divisor * divisor)} or {(e // divisor + 1) * divisor})"
            for axis, e in bad
        )
        raise ValueError(
            f"{name}: every edge must be a positive multiple of {divisor} (the encoder downsamples "
            f"{divisor}x), got {list(edges)}: {details}"
        )
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


def build_model(cfg: ModelConfig | None = None) -> nn.Module:
    """Build the network described by ``cfg`` (defaults: resnet18 U-Net, random init).

    Returns:
        ``nn.Module`` mapping ``float32 (B, in_channels, Z, Y, X)`` to logits
        ``float32 (B, classes, Z, Y, X)``; edges must pass :func:`validate_patch_size` with
        :func:`model_divisor`.
    """
    cfg = cfg or ModelConfig()
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
        missing, unexpected = model.load_state_dict(_load_state(cfg.weights_path), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"model.weights_path: {cfg.weights_path} does not fit {cfg.arch}/{cfg.encoder}: "
                f"{len(missing)} missing key(s) e.g. {missing[:3]}, {len(unexpected)} unexpected e.g. {unexpected[:3]}"
            )
    return model


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
            ``nn.Module`` values are stored as their (unwrapped) state dict.
    """
    from .data import atomic_path

    state = {k: (unwrap_model(v).state_dict() if isinstance(v, nn.Module) else v) for k, v in state.items()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def _torch_load(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """``torch.load(weights_only=True)`` of a kaggle_utils checkpoint, or a one-line :class:`CheckpointError`."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled objects outside the allowlist
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: cannot load checkpoint, truncated or not a torch file "
                              f"({type(exc).__name__}: {first})") from None
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
    model = build_model(from_dict(ModelConfig, model_dict, "model"))
    state = ckpt["ema"] if use_ema and isinstance(ckpt.get("ema"), dict) else ckpt["model"]
    state = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dtype != torch.float32 else v
             for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: weights do not fit {model_dict.get('arch')}/{model_dict.get('encoder')} "
                              f"({first})") from None
    model.to(map_location).eval()
    return model, cfg_dict, ckpt


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, fp16: bool = False) -> Path:
    """Write the small inference file of a checkpoint: what ``predict`` needs and nothing else.

    Keeps the weights (the EMA weights when the checkpoint has them, else the model's; floating
    tensors cast to float16 with ``fp16``, integer buffers unchanged), ``model_config``, the
    ``config`` sections ``model``, ``inference``, ``postprocess`` and ``sampler.normalization`` (the
    intensity normalization inference must repeat), ``fold`` (for ``predict --save-probs`` sidecars)
    and ``format``/``format_version``/``weights``/``dtype`` markers. Drops optimizer, scaler,
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
    """
    src, dst = Path(src), Path(dst)
    ckpt = _torch_load(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise CheckpointError(f"{dst}: refusing to overwrite the source checkpoint; choose another --out")
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
    weights_kind = "ema" if use_ema else ("model" if ckpt.get("format") != EXPORT_FORMAT else ckpt.get("weights", "model"))
    return save_checkpoint(
        dst, format=EXPORT_FORMAT, format_version=EXPORT_VERSION, model=state, model_config=model_dict,
        config=config, fold=fold, weights=weights_kind,
        dtype="float16" if any(v.dtype == torch.float16 for v in state.values()) else "float32",
    )


def find_checkpoints(root: str | os.PathLike, names: Sequence[str] = ("model.pt", "best.pt")) -> list[str]:
    """Checkpoints under ``root`` (e.g. ``/kaggle/input``): per folder, the first of ``names`` present.

    With the default names a folder holding both an exported ``model.pt`` and the training
    ``best.pt`` contributes only ``model.pt`` (the same weights, smaller); a folder with only
    ``best.pt`` contributes that. Returns sorted paths (strings); ``[]`` when ``root`` is missing.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    by_folder: dict[Path, Path] = {}
    for name in reversed(list(names)):  # earlier names overwrite later ones
        for path in root.rglob(name):
            if path.is_file():
                by_folder[path.parent] = path
    return sorted(str(p) for p in by_folder.values())
