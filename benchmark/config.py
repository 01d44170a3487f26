"""The training recipe (`TrainConfig`) and how a saved one compares with it. No torch here: the report reads
saved recipes too, and should not pay torch's import time."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # peak learning rate for the one-cycle schedule
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | constant
    label_smoothing: float = 0.0
    augment: bool = False  # random affine per image: rotation, scale, shear, shift
    max_rotation: float = 12.0  # degrees
    max_scale: float = 0.1  # scale factor drawn from [1 - s, 1 + s]
    max_shear: float = 0.1
    max_shift: float = 2.5  # pixels
    elastic: float = 0.0  # elastic distortion strength alpha in pixels (Simard et al. 2003); 0 = affine only
    elastic_sigma: float = 4.0  # smoothing scale of the elastic displacement field, pixels
    labels: int | None = None  # train on this many labelled images only (class-balanced, seeded)
    teacher: str | None = None  # run whose probabilities on the other fit images are their targets (distillation)
    keep_best: bool = False  # end with the weights of the epoch with the fewest validation errors (latest on ties)
    all_train: bool = False  # fit on all 60,000 training images, the validation images too (nothing to select on)
    train_subset: int | None = None  # first N fit (and unlabelled) images: tests and smoke runs
    model_kwargs: dict = field(default_factory=dict)


def saved_config(config: dict) -> dict:
    """A TrainConfig as saved in meta.json (or `asdict` of one), completed and in JSON's types: keys added to
    TrainConfig since it was saved count as their defaults (the behaviour before they existed), tuples are lists."""
    def as_json(value):
        return json.loads(json.dumps(value, default=str))

    return {**as_json(asdict(TrainConfig())), **as_json(config)}


def recipe_changes(saved: dict, config: TrainConfig) -> list[str]:
    """What differs between a saved config (as in meta.json) and `config`: ["epochs 15 -> 30", ...]."""
    saved, now = saved_config(saved), saved_config(asdict(config))
    return [f"{key} {saved[key]} -> {now[key]}" for key in now if saved[key] != now[key]]
