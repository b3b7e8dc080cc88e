"""The size/quality Pareto frontier: which options no other option beats on both size and error.

A quantization option is worth showing as a choice only if nothing else is at most as large and at most as
wrong, and strictly better on one of the two. The compare page draws these as a step line and marks them in
its table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when minimizing both coordinates (size, error), sorted by size.

    A point is dominated when another is <= on both coordinates and < on one. Of exact duplicates (which do not
    dominate each other) only the lowest index is kept, so each frontier position appears once. Raises
    ValueError on NaN/Inf coordinates.
    """
    for i, (size, error) in enumerate(points):
        if not (math.isfinite(size) and math.isfinite(error)):
            raise ValueError(f"pareto_front: point {i} = ({size}, {error}) is not finite")
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1], i))
    front: list[int] = []
    best = math.inf
    for i in order:  # by size, then error: a point is on the front iff it beats every smaller one's error
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front
