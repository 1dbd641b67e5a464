"""The IO signature of an engine: names, dtypes and symbolic shapes, and the feed check."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from runtimes.errors import FeedError

Dim = int | str  # a fixed size, or a symbolic name such as "batch" shared between tensors


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "int64", "float32", "float16"
    shape: tuple[Dim, ...]

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: Mapping) -> TensorSpec:
        return cls(data["name"], data["dtype"], tuple(data["shape"]))


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict:
        return {"inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}

    @classmethod
    def from_json(cls, data: Mapping) -> Signature:
        return cls(
            tuple(TensorSpec.from_json(t) for t in data["inputs"]),
            tuple(TensorSpec.from_json(t) for t in data["outputs"]),
        )

    def input(self, name: str) -> TensorSpec:
        return next(t for t in self.inputs if t.name == name)

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise FeedError naming the input when `feeds` does not fit this signature."""
        expected = [t.name for t in self.inputs]
        missing = [n for n in expected if n not in feeds]
        extra = [n for n in feeds if n not in expected]
        if missing:
            raise FeedError(f"missing input {missing[0]!r} (expected inputs: {', '.join(expected)})")
        if extra:
            raise FeedError(f"unknown input {extra[0]!r} (expected inputs: {', '.join(expected)})")
        bound: dict[str, tuple[int, str]] = {}  # symbolic dim -> (size, input that set it)
        for spec in self.inputs:
            value = feeds[spec.name]
            if not isinstance(value, np.ndarray):
                raise FeedError(f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}")
            if value.dtype != np.dtype(spec.dtype):
                raise FeedError(f"input {spec.name!r}: expected dtype {spec.dtype}, got {value.dtype}")
            if value.ndim != len(spec.shape):
                raise FeedError(
                    f"input {spec.name!r}: expected rank {len(spec.shape)} {list(spec.shape)}, "
                    f"got rank {value.ndim} {list(value.shape)}"
                )
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                raise FeedError(f"input {spec.name!r}: contains NaN or infinite values")
            for axis, (dim, size) in enumerate(zip(spec.shape, value.shape)):
                if isinstance(dim, int):
                    if dim != size:
                        raise FeedError(f"input {spec.name!r}: axis {axis} must be {dim}, got {size}")
                elif dim in bound and bound[dim][0] != size:
                    other_size, other = bound[dim]
                    raise FeedError(
                        f"input {spec.name!r}: axis {axis} ({dim}) is {size}, "
                        f"but {other!r} has {dim} = {other_size}"
                    )
                else:
                    bound.setdefault(dim, (size, spec.name))
