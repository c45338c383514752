"""Training: ``train(config) -> TrainResult`` with a YAML-backed ``TrainConfig``.

>>> from trustseg.training import load_train_config, train
>>> config = load_train_config("configs/demo_synthetic.yaml", ["out=runs/demo"])  # doctest: +SKIP
>>> result = train(config)  # doctest: +SKIP
"""

from trustseg.training.config import (
    DataConfig,
    ASGConfig,
    DistillConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_from_dict,
    load_train_config,
)
from trustseg.training.loop import TrainResult, train

__all__ = [
    "DataConfig",
    "ASGConfig",
    "DistillConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "config_from_dict",
    "load_train_config",
    "train",
]
