"""Small helpers on shapes (tuples of ints) shared by the formula files."""
from __future__ import annotations

import math


def numel(shape) -> int:
    """Elements of a shape; of a list of shapes, their sum; None counts as 0."""
    if shape is None:
        return 0
    if isinstance(shape, list) or (len(shape) and isinstance(shape[0], (tuple, list))):
        return sum(numel(s) for s in shape)
    return math.prod(shape)


def first_shape(x):
    """The first shape in a (possibly nested) output: a shape, or a tuple/list of shapes."""
    if x is None or (isinstance(x, (tuple, list)) and (len(x) == 0 or isinstance(x[0], int))):
        return x
    return first_shape(x[0])
