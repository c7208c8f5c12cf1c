"""kaggle_utils: train, check and submit models for Vesuvius Challenge - Surface Detection.

Modules, one per concept: ``data``, ``synthetic``, ``sampling``, ``losses``, ``models``,
``inference``, ``postprocess``, ``metrics``, ``diagnostics``, ``train``, ``submission``,
``config``, ``cli``. Import them directly (``from kaggle_utils import metrics``); importing the
package itself is cheap and does not import torch.
"""

__version__ = "0.1.0"
