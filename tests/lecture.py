"""The lecture's example f = (x + y) * z at x = -2, y = 5, z = -4, shared by the tests:
f = -12, df/dx = df/dy = z = -4, df/dz = x + y = 3."""

from __future__ import annotations

from gradient_client import Graph

LECTURE = {"x": -2.0, "y": 5.0, "z": -4.0}


def lecture_graph() -> Graph:
    """The lecture's graph: q = x + y, f = q * z."""
    g = Graph()
    x, y, z = g.input("x"), g.input("y"), g.input("z")
    g.mul(g.add(x, y, name="q"), z, name="f")
    return g
