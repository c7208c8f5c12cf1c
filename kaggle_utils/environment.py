"""Runtime environment checks for the Kaggle image: a writable numba cache, the torch 2.9 conv3d pitfall, a GPU
the installed torch has no kernels for.

All are things a Kaggle user cannot see coming:

* numba caches compiled kernels (``@njit(cache=True)`` in :mod:`kaggle_utils.metrics.topo`) next to
  the source. When the package sits on a read-only path (``/kaggle/input/...`` on ``PYTHONPATH``)
  and ``NUMBA_CACHE_DIR`` is unset, :func:`ensure_numba_cache_dir` points numba at a writable temp
  folder. The package ``__init__`` calls it, before anything imports numba.
* torch 2.9.x disables cuDNN for half-precision 3D convolutions while cuDNN is 9.8-9.14 (Kaggle's
  Feb 2026 image: torch 2.9.0, cuDNN 9.10), so AMP training and prediction of 3D U-Nets run about 4x
  slower with far more memory (pytorch issue 166122; 2.9.0 disables it for every cuDNN, 2.9.1
  re-enables it from cuDNN 9.15). No ``torch.backends.cudnn`` flag brings it back: the check is
  compiled into ``ConvParams::use_cudnn``. :func:`warn_slow_conv3d_amp` says so once per process.
* A kernel pushed without ``machine_shape`` has been reported to land on a P100 (sm_60), for which the image's
  cu128 torch ships no kernels: ``torch.cuda.is_available()`` is True and the first CUDA operation fails with
  ``no kernel image is available``. :func:`check_gpu_supported` (``train`` and ``predict`` call it at start)
  compares the GPU's compute capability with ``torch.cuda.get_arch_list()`` and stops in one line.

This module imports only the standard library at import time (the package ``__init__`` uses it).
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path

__all__ = ["ensure_numba_cache_dir", "slow_conv3d_amp", "warn_slow_conv3d_amp", "CONV3D_AMP_WARNING",
           "UnsupportedGPUError", "gpu_arch_problem", "check_gpu_supported"]

logger = logging.getLogger(__name__)

#: The message of :func:`warn_slow_conv3d_amp` (``{version}`` and ``{cudnn}`` filled in).
CONV3D_AMP_WARNING = (
    "torch {version} with cuDNN {cudnn}: 3D convolutions under AMP (float16/bfloat16) do not use cuDNN here and run "
    "about 4x slower with much more memory (pytorch issue 166122). Fix: pin the notebook to a Kaggle image with "
    "torch 2.8 or 2.10+ (or torch 2.9.1 with cuDNN >= 9.15); no torch.backends.cudnn setting re-enables it."
)

_warned = False


def _writable(path: Path) -> bool:
    """Whether numba could write its cache under ``path`` (its ``__pycache__`` or, if absent, itself)."""
    cache = path / "__pycache__"
    target = cache if cache.is_dir() else path
    return os.access(target, os.W_OK)


def ensure_numba_cache_dir(package_dir: str | os.PathLike | None = None) -> str | None:
    """Give numba a writable cache folder when the installed package is read-only.

    Does nothing when ``NUMBA_CACHE_DIR`` is already set or the package folders holding numba
    kernels (``kaggle_utils/`` and ``kaggle_utils/metrics/``) are writable. Otherwise sets
    ``NUMBA_CACHE_DIR`` (and ``numba.config.CACHE_DIR`` when numba is already imported) to
    ``<tempdir>/kaggle_utils-numba-cache``.

    Args:
        package_dir: the ``kaggle_utils`` folder to check; default: this package's.

    Returns:
        The cache folder it set, or ``None`` when nothing had to change.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return None
    pkg = Path(package_dir) if package_dir is not None else Path(__file__).resolve().parent
    if all(_writable(p) for p in (pkg, pkg / "metrics") if p.is_dir()):
        return None
    cache = Path(tempfile.gettempdir()) / "kaggle_utils-numba-cache"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(cache)
    numba = sys.modules.get("numba")
    if numba is not None:  # numba read its config at import: update it too
        numba.config.CACHE_DIR = str(cache)
    return str(cache)


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
