"""Moved: the training configuration is :mod:`kaggle_utils.train.config` (importable from :mod:`kaggle_utils.train`)."""

raise ImportError("kaggle_utils.train_config moved to kaggle_utils.train.config "
                  "(e.g. from kaggle_utils.train import TrainConfig)")
