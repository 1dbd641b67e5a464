"""TensorRT optimization profiles: the `--profile` text parsed into ranges of the contract's dynamic dims,
and the min/opt/max shape of every input. Plain arithmetic; no TensorRT needed."""
from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError
from runtimes.signature import Signature

# min, opt, max of each dim of one input: what IOptimizationProfile.set_shape takes.
ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Profile:
    """Ranges of the contract's dynamic dims; total_sequence follows from past_sequence + sequence, capped at
    the model's `positions` (a past near the end leaves room for a decode step, not for a long prompt)."""

    batch: DimRange
    sequence: DimRange
    past_sequence: DimRange
    positions: int | None = None

    @property
    def total_sequence(self) -> DimRange:
        past, seq = self.past_sequence, self.sequence
        cap = self.positions if self.positions is not None else past.max + seq.max
        return DimRange(min(past.min + seq.min, cap), min(past.opt + seq.opt, cap), min(past.max + seq.max, cap))

    def to_json(self) -> dict[str, list[int]]:
        """The manifest's `profile`: dim -> [min, opt, max]; verification keeps its inputs inside it."""
        return {name: [r.min, r.opt, r.max] for name, r in self.dims().items()}

    def dims(self) -> dict[str, DimRange]:
        return {"batch": self.batch, "sequence": self.sequence, "past_sequence": self.past_sequence,
                "total_sequence": self.total_sequence}


# Opt is the decode step (one new token after a long past): decode steps outnumber prefills.
DEFAULT_PROFILE = Profile(DimRange(1, 1, 8), DimRange(1, 1, 512), DimRange(0, 512, 1536))
_FIELDS = {"batch": "batch", "sequence": "sequence", "past": "past_sequence", "past_sequence": "past_sequence"}
_LOWEST = {"batch": 1, "sequence": 1, "past_sequence": 0}  # a prefill has no past; a step has a token


def parse_profile(text: str | None, max_positions: int | None = None) -> Profile:
    """`"batch=1:4:8,sequence=1:128:512,past=0:512:2048"` -> Profile; fields left out keep the defaults.

    A field is `min:opt:max` or one number (fixed). Defaults shrink to fit `max_positions` (the
    model's position table); ranges given explicitly beyond it are an error. past + sequence never exceeds
    `max_positions` either: the attention mask's range (total_sequence) stops there.
    """
    given: dict[str, DimRange] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in _FIELDS:
            raise KilnError(
                f"--profile: expected fields batch=, sequence=, past= (min:opt:max each), got {item.strip()!r}"
            )
        field = _FIELDS[key]
        if field in given:
            raise KilnError(f"--profile: field {key!r} is given twice")
        given[field] = _parse_range(key, value.strip(), _LOWEST[field])
    ranges = {}
    for field, default in DEFAULT_PROFILE.dims().items():
        if field == "total_sequence":
            continue
        limit = _position_limit(field, max_positions)
        if field in given:
            if limit is not None and given[field].max > limit:
                raise KilnError(
                    f"--profile: field {_key_of(field)!r}: max {given[field].max} exceeds the model's "
                    f"{max_positions} positions (expected at most {limit})"
                )
            ranges[field] = given[field]
        else:
            ranges[field] = _clamp(default, limit)
    return Profile(**ranges, positions=max_positions)


def _parse_range(key: str, value: str, lowest: int) -> DimRange:
    expected = f"min:opt:max integers (or one integer) with {lowest} <= min <= opt <= max"
    parts = value.split(":")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if len(numbers) == 1:
        numbers *= 3
    if len(numbers) != 3 or not lowest <= numbers[0] <= numbers[1] <= numbers[2]:
        raise KilnError(f"--profile: field {key!r}: expected {expected}, got {value!r}")
    return DimRange(*numbers)


def _position_limit(field: str, max_positions: int | None) -> int | None:
    if max_positions is None or field == "batch":
        return None
    # A past of max_positions - 1 still leaves room for the one token of a decode step.
    return max_positions if field == "sequence" else max_positions - 1


def _clamp(default: DimRange, limit: int | None) -> DimRange:
    if limit is None:
        return default
    return DimRange(min(default.min, limit), min(default.opt, limit), min(default.max, limit))


def _key_of(field: str) -> str:
    return "past" if field == "past_sequence" else field


def profile_shapes(signature: Signature, profile: Profile) -> dict[str, ShapeRange]:
    """Every input of `signature` -> (min, opt, max) shapes, its symbolic dims looked up in `profile`.

    e.g. `past_key_values.0.key [batch, 4, past_sequence, 16]` -> ((1,4,0,16), (1,4,512,16), (8,4,1536,16)).
    """
    dims = profile.dims()
    shapes = {}
    for spec in signature.inputs:
        low, opt, high = [], [], []
        for axis, dim in enumerate(spec.shape):
            if isinstance(dim, int):
                size = DimRange(dim, dim, dim)
            elif dim in dims:
                size = dims[dim]
            else:
                raise KilnError(
                    f"input {spec.name!r}: axis {axis} is {dim!r}; a TensorRT profile covers "
                    f"{', '.join(dims)} and fixed sizes only"
                )
            low.append(size.min)
            opt.append(size.opt)
            high.append(size.max)
        shapes[spec.name] = (tuple(low), tuple(opt), tuple(high))
    return shapes
