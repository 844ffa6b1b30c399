"""The op table. Importing this package registers every op in OPS."""

from . import (  # noqa: F401  (each module registers its ops)
    elementwise,
    indexing,
    linalg,
    nn,
    reductions,
    shapes,
)
from .base import OPS, AttrSpec, Call, GradCall, InvalidValue, OpDef, Ref, ShapeError

__all__ = [
    "OPS",
    "AttrSpec",
    "Call",
    "GradCall",
    "InvalidValue",
    "OpDef",
    "Ref",
    "ShapeError",
]
