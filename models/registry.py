"""A registry of model variants, in the spirit of timm's `register_model`.

Each family file decorates a builder with `@register_model(name, description, **train_defaults)`.
`train_defaults` override fields of `benchmark.config.TrainConfig` for that model (epochs, lr, ...), so the
configuration a name trains with by default lives next to the architecture it belongs to.

Every model maps a float batch (B, 1, 28, 28) with grey levels scaled to [0, 1] to logits (B, 10). A model
may also define `training_loss(x, y, label_smoothing) -> scalar` when it trains on more than its final
logits (the glimpse net trains every step's prediction).
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., nn.Module]
    description: str
    train_defaults: dict = field(default_factory=dict)


REGISTRY: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, **train_defaults):
    """Decorator: register `builder(**model_kwargs) -> nn.Module` under `name`."""

    def decorate(builder):
        if name in REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        REGISTRY[name] = ModelEntry(name, builder, description, train_defaults)
        return builder

    return decorate


def get_entry(name: str) -> ModelEntry:
    """The registry entry for `name`; KeyError lists the known names."""
    if name not in REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def create_model(name: str, **model_kwargs) -> nn.Module:
    return get_entry(name).builder(**model_kwargs)


def parameter_count(model: nn.Module) -> int:
    """Trainable parameters (a mean teacher's moving-average copy is not counted twice)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


KIND_WORDS = {bool: "True or False", int: "a whole number", float: "a number", str: "a word"}


def of_kind(value, expected: type) -> bool:
    """Whether `value` is of an option's kind: bools are not numbers here, and a whole number is a number."""
    if expected is bool or isinstance(value, bool):
        return isinstance(value, bool) and expected is bool
    return isinstance(value, expected) or (expected is float and isinstance(value, int))


def parse_model_options(name: str, items: list[str]) -> dict:
    """`KEY=VALUE` strings -> builder keyword arguments for model `name`, checked against its signature.

    VALUE is read as a Python literal when it is one (2, 0.5, True, (3, 12)), else kept as a string
    (pool=max). The model is built once with the options, so a bad value (pool=mean) fails here, before
    any data is loaded. Raises ValueError naming the bad item and the options the builder accepts, or
    the builder's own complaint.
    """
    parameters = inspect.signature(get_entry(name).builder).parameters
    accepted = list(parameters)
    options = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"model option {item!r} is not KEY=VALUE (for example pool=max)")
        if key not in accepted:
            raise ValueError(f"model {name} has no option {key!r}; it accepts: {', '.join(accepted) or 'none'}")
        if key in options:
            raise ValueError(f"model option {key} is given twice; give it once")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        # the default's type is the option's, so a builder's own checks see the kind of value they expect
        default = parameters[key].default
        expected = type(default) if isinstance(default, (bool, int, float, str)) else None
        if expected is not None and not of_kind(value, expected):
            raise ValueError(f"model option {key}={text}: expected {KIND_WORDS[expected]} (default {default!r})")
        options[key] = value
    try:
        create_model(name, **options)
    except Exception as exc:  # ValueError from the builder's own checks; sizes torch cannot make (width=-1)...
        raise ValueError(f"model {name} cannot be built with {' '.join(items)}: {exc}") from None
    return options
