"""Engine backends as records: one module each (onnxruntime, aoti, tensorrt), one `BACKEND` record per module.

A record says how its engines are captured, which passes optimize them, how they are built, what the host
needs, what the manifest gets, and which runtimes adapter runs them. The pipeline, the CLI and bench look
the record up by the target's `backend`; nothing else names a backend.
"""
from __future__ import annotations

import runtimes.loading
from kiln.backends import aoti, onnxruntime, tensorrt
from kiln.backends.record import Backend, BuildRequest
from kiln.errors import KilnError

BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Make `backend` available to targets naming it, and its engines loadable by runtimes.load."""
    BACKENDS[backend.name] = backend
    runtimes.loading.register_adapter(backend.name, backend.adapter)


def backend_named(name: str) -> Backend:
    if name not in BACKENDS:
        raise KilnError(f"backend {name!r} is unknown (known: {', '.join(BACKENDS)})")
    return BACKENDS[name]


def backend_of(target) -> Backend:
    return backend_named(target.backend)


def refuse_unhosted_passes(backend: Backend, passes: list[str]) -> None:
    """A pass another backend runs only for itself (it makes nodes only that runtime executes) is refused here."""
    hosted = {p: b.name for b in BACKENDS.values() for p in b.optional_passes if p not in backend.optional_passes}
    for name in passes:
        if name in hosted:
            runs_on = sorted(b.name for b in BACKENDS.values() if name in b.optional_passes)
            raise KilnError(f"pass {name!r} makes nodes that only {', '.join(runs_on)} engines run; "
                            f"backend {backend.name!r} has no kernel for them")


for _backend in (onnxruntime.BACKEND, aoti.BACKEND, tensorrt.BACKEND):
    register_backend(_backend)

__all__ = ["Backend", "BuildRequest", "BACKENDS", "backend_named", "backend_of", "register_backend",
           "refuse_unhosted_passes"]
