"""Targets as data: what engine each builds, how it runs, and which precisions it offers."""
from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Target:
    name: str
    backend: str  # the runtimes adapter that runs its engines
    providers: tuple[str, ...]  # ONNX Runtime execution providers, in priority order
    precisions: tuple[str, ...]  # those implemented so far; the first is the default
    description: str


TARGETS = {
    t.name: t
    for t in (
        Target("cpu", "onnxruntime", ("CPUExecutionProvider",), ("fp32",), "ONNX Runtime on the CPU"),
    )
}


def target_named(name: str, precision: str) -> Target:
    if name not in TARGETS:
        raise KilnError(f"unknown target {name!r} (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    if precision not in target.precisions:
        raise KilnError(
            f"precision {precision!r} is not supported for target {name!r} (supported: {', '.join(target.precisions)})"
        )
    return target
