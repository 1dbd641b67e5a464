"""What kiln does per model kind beyond the exporter's and the runtimes' tables: how an engine of the kind is
verified against its source, at which precisions it has a gate, how its report reads in one line, and how
`kiln bench` measures it.

The exporter's kind (`exporter.graphs.KINDS`) captures the graphs; the runtimes' (`runtimes.loading.KINDS`)
runs them; this record checks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kiln import verify_diffusion
from kiln.errors import KilnError
from kiln.verify import decoder_summary, record_decoder, verify_decoder


@dataclass(frozen=True)
class ModelKind:
    name: str
    # (engine, loaded source, precision, profile=shape ranges or None) -> report: passed, failures...
    verify: Callable[..., dict]
    summary: Callable[[dict], str]  # the report in one line (convert, verify, inspect)
    # (loaded source, {role: signature}, profile) -> the source's outputs for `verify(..., recorded=)`, with
    # `fits(loaded, profile)`: a conversion records them right after the export and lets the source go, not to
    # hold it through optimization and beside the engine; None: verify runs the source beside the engine.
    record: Callable | None = None
    precisions: tuple[str, ...] | None = None  # those with a verification gate; None: all the target offers
    # A failed verification converts again pass by pass to say which pass made the error grow.
    blame_passes: bool = False
    # A module with `bench(engine_dirs, **options) -> report`, `table(report) -> lines`, `plot(report, path)`;
    # None: kiln.bench's decoder measurements (prefill, first token, decode).
    bench_module: str | None = None


KINDS = {k.name: k for k in (
    ModelKind("decoder-lm", verify_decoder, decoder_summary, record=record_decoder, blame_passes=True),
    ModelKind("diffusion", verify_diffusion.verify, verify_diffusion.summary, precisions=verify_diffusion.PRECISIONS,
              bench_module="kiln.bench_images"),
)}


def kind_checks(name: str) -> ModelKind:
    if name not in KINDS:
        raise KilnError(f"model kind {name!r} is unknown (known: {', '.join(KINDS)})")
    return KINDS[name]


def refuse_ungated_precision(kind: ModelKind, precision: str, where: str) -> None:
    """A precision the kind has no verification gate for is refused before any work."""
    if kind.precisions is not None and precision not in kind.precisions:
        raise KilnError(f"{where}: a {kind.name} engine at precision {precision!r} has no verification gate yet "
                        f"(supported: {', '.join(kind.precisions)})")
