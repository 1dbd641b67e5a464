"""What kiln does per model kind beyond the exporter's and the runtimes' tables: how an engine of the kind is
verified against its source, at which precisions it has a gate, and how its report reads in one line.

The exporter's kind (`exporter.graphs.KINDS`) captures the graphs; the runtimes' (`runtimes.loading.KINDS`)
runs them; this record checks them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kiln import verify_diffusion
from kiln.errors import KilnError
from kiln.verify import decoder_summary, verify_decoder


@dataclass(frozen=True)
class KindChecks:
    name: str
    verify: Callable[[object, object, str], dict]  # (engine, loaded source, precision) -> report: passed, failures...
    summary: Callable[[dict], str]  # the report in one line (convert, verify, inspect)
    precisions: tuple[str, ...] | None = None  # those with a verification gate; None: all the target offers
    # A failed verification converts again pass by pass to say which pass made the error grow.
    blame_passes: bool = False


KINDS = {k.name: k for k in (
    KindChecks("decoder-lm", verify_decoder, decoder_summary, blame_passes=True),
    KindChecks("diffusion", verify_diffusion.verify, verify_diffusion.summary, precisions=verify_diffusion.PRECISIONS),
)}


def kind_checks(name: str) -> KindChecks:
    if name not in KINDS:
        raise KilnError(f"model kind {name!r} is unknown (known: {', '.join(KINDS)})")
    return KINDS[name]


def refuse_ungated_precision(kind: KindChecks, precision: str, where: str) -> None:
    """A precision the kind has no verification gate for is refused before any work."""
    if kind.precisions is not None and precision not in kind.precisions:
        raise KilnError(f"{where}: a {kind.name} engine at precision {precision!r} has no verification gate yet "
                        f"(supported: {', '.join(kind.precisions)})")
