"""kaggle_utils: train, check and submit models for Vesuvius Challenge - Surface Detection.

Modules, one per concept: ``data``, ``synthetic``, ``sampling``, ``losses``, ``models``,
``inference``, ``postprocess``, ``metrics``, ``diagnostics``, ``train``, ``submission``,
``config``, ``cli``. Import them directly (``from kaggle_utils import metrics``); importing the
package itself is cheap and does not import torch.
"""

__version__ = "0.1.0"

from .environment import ensure_numba_cache_dir as _ensure_numba_cache_dir

# numba caches compiled metric kernels beside the source: on a read-only install (/kaggle/input on
# PYTHONPATH) point it at a writable temp folder before anything imports numba.
_ensure_numba_cache_dir()
