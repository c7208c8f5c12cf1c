"""The device a run uses, and how it computes there: one home for device choice, mixed precision and
the GPU checks that training and prediction share.

* :func:`resolve_device`: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``None`` (CUDA when available) checked
  against this machine, as a ``torch.device``; :class:`DeviceError` (a
  :class:`~kaggle_utils.config.ConfigError`, one line) when it is not usable. :func:`device_name` says
  which GPU it is.
* One mixed-precision vocabulary (``train.amp`` and ``inference.amp``): :data:`AMP_MODES`,
  :func:`normalize_amp` (config values, old spellings mapped with a deprecation warning),
  :func:`resolve_amp_dtype` (the autocast dtype on a device) and :func:`autocast` (the context).
* torch 2.9.x disables cuDNN for half-precision 3D convolutions while cuDNN is 9.8-9.14 (Kaggle's
  Feb 2026 image: torch 2.9.0, cuDNN 9.10), so AMP training and prediction of 3D U-Nets run about 4x
  slower with far more memory (pytorch issue 166122; 2.9.0 disables it for every cuDNN, 2.9.1
  re-enables it from cuDNN 9.15). No ``torch.backends.cudnn`` flag brings it back: the check is
  compiled into ``ConvParams::use_cudnn``. :func:`warn_slow_conv3d_amp` says so once per process.
* A kernel pushed without ``machine_shape`` has been reported to land on a P100 (sm_60), for which the image's
  cu128 torch ships no kernels: ``torch.cuda.is_available()`` is True and the first CUDA operation fails with
  ``no kernel image is available``. :func:`check_gpu_supported` (``train`` and ``predict`` call it at start)
  compares the GPU's compute capability with ``torch.cuda.get_arch_list()`` and stops in one line.

torch is imported inside the functions (the CLI imports this module for its error types and must start
without torch); from the package it imports only :mod:`kaggle_utils.config`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeviceError",
    "resolve_device",
    "device_name",
    "AMP_MODES",
    "normalize_amp",
    "resolve_amp_dtype",
    "autocast",
    "CONV3D_AMP_WARNING",
    "slow_conv3d_amp",
    "warn_slow_conv3d_amp",
    "UnsupportedGPUError",
    "gpu_arch_problem",
    "check_gpu_supported",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Which device
# ----------------------------------------------------------------------------------------------


class DeviceError(ConfigError):
    """The device asked for is not a device name, or names a GPU torch does not see (one line)."""


def resolve_device(device: str | torch.device | None, local_rank: int | None = None) -> torch.device:
    """The device to run on: ``device`` checked, or CUDA when available, else CPU.

    ``"cuda"`` without an index is this process's GPU: ``local_rank`` under torchrun, else the
    current one.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"``, a ``torch.device``, or ``None`` (CUDA when available).
        local_rank: the process's ``LOCAL_RANK`` under torchrun (picks the GPU of a bare ``"cuda"``).

    Returns:
        A ``torch.device``; a CUDA one always carries its index.

    Raises:
        DeviceError: one line when ``device`` is not a device name, or names a GPU torch does
            not see (no CUDA build or driver, or an index past the last GPU).
    """
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise DeviceError(f"device {str(device)!r}: not a torch device ({str(exc).splitlines()[0]}); "
                          f"use cpu, cuda or cuda:N") from None
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise DeviceError(f"device {str(device)!r}: torch {torch.__version__} sees no CUDA GPU "
                          f"(torch.cuda.is_available() is False); use --device cpu, or leave it unset")
    count = torch.cuda.device_count()
    index = dev.index if dev.index is not None else (local_rank if local_rank is not None
                                                     else torch.cuda.current_device())
    if not 0 <= index < count:
        raise DeviceError(f"device {str(device)!r}: GPU {index} does not exist; torch sees {count} GPU(s) "
                          f"(cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_name(device: torch.device) -> str:
    """``cuda:0 (Tesla T4)``, ``cpu``...: the device and, for a GPU, its model."""
    import torch

    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


# ----------------------------------------------------------------------------------------------
# Mixed precision: one vocabulary
# ----------------------------------------------------------------------------------------------


#: The one mixed-precision vocabulary (``train.amp`` and ``inference.amp``): ``auto`` (float16
#: autocast on CUDA, full precision on CPU), ``off`` (full precision; YAML ``off``/``false`` read as
#: ``false`` mean the same), ``fp16`` (float16 on CUDA, bfloat16 on CPU) and ``bf16`` (bfloat16;
#: float16 on a GPU without it). See :func:`resolve_amp_dtype`.
AMP_MODES = ("auto", "off", "fp16", "bf16")

#: Old spellings still read, with a deprecation warning: ``none`` (old ``train.amp``) and ``true``
#: (old ``inference.amp``).
_AMP_ALIASES: dict[Any, str] = {"none": "off", True: "fp16"}


def normalize_amp(value: Any, key: str = "amp") -> str:
    """One of :data:`AMP_MODES` for a config or argument value.

    ``False`` (YAML ``off``/``false``/``no``) is ``"off"``; the old spellings ``"none"`` and ``True``
    are mapped with a :class:`~kaggle_utils.config.ConfigDeprecationWarning` naming ``key``.

    Raises:
        ValueError: any other value (the message names ``key`` and the vocabulary).
    """
    if value is False or value is None:
        return "off"
    if isinstance(value, str) and value in AMP_MODES:
        return value
    if (value is True or isinstance(value, str)) and value in _AMP_ALIASES:
        from .config import warn_deprecated

        new = _AMP_ALIASES[value]
        shown = "true" if value is True else repr(value)
        warn_deprecated(f"{key}: {shown} is deprecated, use {new!r} (one vocabulary: {', '.join(AMP_MODES)})")
        return new
    raise ValueError(f"{key}: must be one of {', '.join(AMP_MODES)}, got {value!r}")


def resolve_amp_dtype(amp: bool | str | None, device: torch.device | str) -> torch.dtype | None:
    """Autocast dtype for ``amp`` (:data:`AMP_MODES`, see :func:`normalize_amp`) on ``device``, or
    ``None`` for full precision. Training and inference both use it.

    ``"auto"``: float16 on CUDA, off on CPU. ``"fp16"``: float16 on CUDA, bfloat16 on CPU (CPU
    float16 autocast is slow). ``"bf16"``: bfloat16 where supported (float16 on a GPU without it).
    ``"off"`` (or ``False``/``None``): full precision.
    """
    import torch

    dev = torch.device(device)
    mode = normalize_amp(amp)
    if mode == "off":
        return None
    if mode == "auto":
        return torch.float16 if dev.type == "cuda" else None
    if mode == "fp16":
        return torch.float16 if dev.type == "cuda" else torch.bfloat16
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        warnings.warn("bfloat16 autocast not supported on this GPU; using float16", stacklevel=2)
        return torch.float16
    return torch.bfloat16


def autocast(device: torch.device, amp: bool | str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` on ``device`` with the dtype of :func:`resolve_amp_dtype`, or a no-op context
    for full precision (the one vocabulary of ``train.amp`` and ``inference.amp``)."""
    import torch

    dtype = resolve_amp_dtype(amp, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# GPU checks: torch 2.9's slow half-precision conv3d; a GPU the installed torch cannot run
# ----------------------------------------------------------------------------------------------


#: The message of :func:`warn_slow_conv3d_amp` (``{version}`` and ``{cudnn}`` filled in).
CONV3D_AMP_WARNING = (
    "torch {version} with cuDNN {cudnn}: 3D convolutions under AMP (float16/bfloat16) do not use cuDNN here and run "
    "about 4x slower with much more memory (pytorch issue 166122). Fix: pin the notebook to a Kaggle image with "
    "torch 2.8 or 2.10+ (or torch 2.9.1 with cuDNN >= 9.15); no torch.backends.cudnn setting re-enables it."
)

_warned = False


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def slow_conv3d_amp(torch_version: str, cudnn_version: int | None) -> bool:
    """Whether this torch/cuDNN pair runs half-precision 3D convolutions without cuDNN.

    Args:
        torch_version: ``torch.__version__`` (e.g. ``"2.9.0+cu126"``).
        cudnn_version: ``torch.backends.cudnn.version()`` (e.g. ``91002`` for 9.10.2), ``None`` if unknown.

    Returns:
        ``True`` for torch 2.9.0, and for later 2.9.x with cuDNN 9.8-9.14 (or unknown).
    """
    v = _version_tuple(torch_version)
    if v[:2] != (2, 9):
        return False
    if v[:3] == (2, 9, 0) or cudnn_version is None:
        return True
    return 90800 <= cudnn_version < 91500


def warn_slow_conv3d_amp(device, amp: bool = True) -> bool:
    """Log :data:`CONV3D_AMP_WARNING` once per process when AMP 3D convolutions on ``device`` will be slow.

    Call it where a model is moved to its device (training and prediction).

    Args:
        device: the model's device (``torch.device`` or string); only CUDA devices are affected.
        amp: whether autocast (float16/bfloat16) will be used.

    Returns:
        ``True`` when the warning applies (whether or not it was already logged).
    """
    global _warned
    import torch

    if not amp or torch.device(device).type != "cuda":
        return False
    try:
        cudnn = torch.backends.cudnn.version()
    except Exception:  # noqa: BLE001 - a broken cuDNN install reads as unknown
        cudnn = None
    if not slow_conv3d_amp(torch.__version__, cudnn):
        return False
    if not _warned:
        _warned = True
        logger.warning(CONV3D_AMP_WARNING.format(version=torch.__version__, cudnn=cudnn))
    return True


class UnsupportedGPUError(ValueError):
    """The CUDA GPU this process got cannot run the installed torch (no kernels for its architecture)."""


def _arch_number(arch: str) -> tuple[str, int] | None:
    """``"sm_86"`` -> ``("sm", 86)``, ``"compute_90"`` -> ``("compute", 90)``; ``None`` for anything else."""
    kind, _, number = arch.partition("_")
    digits = "".join(ch for ch in number if ch.isdigit())  # "sm_90a" -> 90
    return (kind, int(digits)) if kind in ("sm", "compute") and digits else None


def gpu_arch_problem(capability: tuple[int, int], arch_list: list[str] | tuple[str, ...], gpu_name: str = "the GPU",
                     torch_version: str = "") -> str | None:
    """Why torch cannot run on a GPU of this compute capability, or ``None`` when it can.

    A GPU of capability ``X.Y`` runs kernels compiled for ``sm_X<=Y`` (same major: binary compatible) or
    PTX ``compute_Z`` with ``Z <= XY`` (compiled just in time).

    Args:
        capability: ``torch.cuda.get_device_capability()``, e.g. ``(6, 0)`` for a P100, ``(7, 5)`` for a T4.
        arch_list: ``torch.cuda.get_arch_list()``, e.g. ``["sm_75", "sm_80", ..., "compute_120"]``; empty: unknown.
        gpu_name: ``torch.cuda.get_device_name()``, for the message.
        torch_version: ``torch.__version__``, for the message.

    Returns:
        One line naming the GPU, its ``sm_XY``, the torch build's architectures and the fix; or ``None``.
    """
    parsed = [a for a in (_arch_number(x) for x in arch_list) if a is not None]
    if not parsed:
        return None  # a build that does not say: let CUDA decide
    major, minor = int(capability[0]), int(capability[1])
    gpu = major * 10 + minor
    runs = any((kind == "sm" and n // 10 == major and n <= gpu) or (kind == "compute" and n <= gpu)
               for kind, n in parsed)
    if runs:
        return None
    built = ", ".join(sorted({f"sm_{n}" for kind, n in parsed if kind == "sm"}, key=lambda a: int(a[3:])))
    return (f"{gpu_name} (sm_{gpu}) cannot run this torch {torch_version} (built for {built}): on Kaggle set "
            f'"machine_shape": "NvidiaTeslaT4" in kernel-metadata.json (GPU T4 x2) and push again, or use '
            f"--device cpu")


def check_gpu_supported(device) -> None:
    """Stop at start, in one line, when ``device`` is a CUDA GPU the installed torch has no kernels for.

    Raises:
        UnsupportedGPUError: the message of :func:`gpu_arch_problem` (e.g. a P100 with a cu128 torch).
    """
    import torch

    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return
    try:
        capability = torch.cuda.get_device_capability(dev)
        arch_list = torch.cuda.get_arch_list()
        name = torch.cuda.get_device_name(dev)
    except Exception:  # noqa: BLE001 - a query that fails is left to the first real CUDA call
        return
    problem = gpu_arch_problem(capability, arch_list, name, torch.__version__)
    if problem is not None:
        raise UnsupportedGPUError(problem)
