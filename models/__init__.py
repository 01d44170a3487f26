"""Model families, one file each; importing this package registers them all."""

from models import cnn, cowmask, generator, glimpse, mixer, mlp, softorder  # noqa: F401  (imported for their @register_model side effect)
from models.registry import REGISTRY, create_model, get_entry, parameter_count, register_model

__all__ = ["REGISTRY", "create_model", "get_entry", "parameter_count", "register_model"]
