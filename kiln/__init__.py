"""torchkiln's public API: `convert` a model into a verified engine, `load` an engine as a Predictor.

Importing `kiln` is cheap: the export stack (torch, transformers) is imported by `convert` only.
"""
from __future__ import annotations


def convert(spec: str, target: str = "cpu", precision: str = "fp32", output=None, **options):
    """Build a verified engine directory; see `kiln.pipeline.convert`."""
    from kiln.pipeline import convert as run_convert

    return run_convert(spec, target, precision, output, **options)


def load(engine_dir, device: str | None = None, **options):
    """Open an engine directory as a Predictor, on the engine's own device unless `device` says; `expect_digest`,
    `public_key` and `trust_native_code` say which engines to trust. See `runtimes.load`."""
    import runtimes

    return runtimes.load(engine_dir, device=device, **options)


def load_reference(engine_dir, **options):
    """The engine's source model in PyTorch eager, as a Predictor; see `kiln.reference.load_reference`."""
    from kiln.reference import load_reference as load_torch_reference

    return load_torch_reference(engine_dir, **options)


__all__ = ["convert", "load", "load_reference"]
