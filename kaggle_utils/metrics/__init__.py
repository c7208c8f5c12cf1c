"""The competition metric, reproduced exactly and fast.

``score = clip(0.30 TopoScore + 0.35 SurfaceDice@2 + 0.35 VOI_score, 0, 1)`` per volume, mean over
volumes. One module per term (:mod:`.surface_dice`, :mod:`.voi`, :mod:`.topo`) and
:mod:`.score` to preprocess, combine and score whole datasets.

Example::

    from kaggle_utils.metrics import score_volume
    s = score_volume(pred_uint8, label_uint8)
    s.score, s.topo_score, s.surface_dice, s.voi_score
"""

from .score import DatasetScore, GroundTruthCache, ScoreBound, VolumeScore, preprocess, score_bound, score_dataset, score_volume
from .surface_dice import surface_dice
from .voi import VoiResult, voi

__all__ = [
    "score_volume",
    "score_dataset",
    "score_bound",
    "ScoreBound",
    "GroundTruthCache",
    "VolumeScore",
    "DatasetScore",
    "preprocess",
    "surface_dice",
    "voi",
    "VoiResult",
    "topo_counts",
    "topo_score",
]


def __getattr__(name: str):
    # topo pulls in numba; import it only when asked for
    if name in ("topo_counts", "topo_score"):
        from . import topo

        return getattr(topo, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
