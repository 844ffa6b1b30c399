"""The op table. Importing this package registers every op in OPS."""

from . import elementwise, linalg, reductions, shapes  # noqa: F401  (each module registers its ops)
from .base import OPS, AttrSpec, Call, GradCall, OpDef, Ref, ShapeError

__all__ = ["OPS", "AttrSpec", "Call", "GradCall", "OpDef", "Ref", "ShapeError"]
