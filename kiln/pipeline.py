"""`convert`: model spec -> captured graph -> engine directory -> verified against PyTorch.

The engine is built in a temporary sibling folder and renamed into place only when every step
passed: a failed or interrupted convert leaves nothing at the output path.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kiln.errors import KilnError, VerificationFailed
from kiln.manifest import write_json, write_manifest
from kiln.reference import reference_predictor
from kiln.targets import Target, missing_on_host, target_named
from kiln.verify import VerificationInputs, compare

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "generation_config.json")
_TEMP_MARK = ".kiln-tmp-"
# Write failures that are the machine's state, not a bug: a full disk, a quota, a read-only or forbidden folder.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

# Called with (step name, None) when a step starts and (step name, seconds) when it ends.
StepCallback = Callable[[str, "float | None"], None]


@dataclass
class ConvertResult:
    engine_dir: Path
    manifest: dict
    steps: list[dict] = field(default_factory=list)


def default_output(spec: str, target: str, precision: str) -> Path:
    name = re.sub(r"[^\w.-]+", "-", Path(spec.split(":")[-1]).name or "model").strip("-")
    return Path("build") / f"{name}-{target}-{precision}"


def convert(
    spec: str,
    target: str = "cpu",
    precision: str = "fp32",
    output: str | os.PathLike | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    trust_remote_code: bool = False,
    external_data_threshold: int | None = None,
    passes: list[str] | None = None,
    profile: str | None = None,
    on_step: StepCallback | None = None,
) -> ConvertResult:
    """Build a verified engine directory for `spec` and return its path and manifest.

    `passes` overrides the optimization recipe of (target, precision); `profile` is the TensorRT
    shape ranges, `batch=1:1:8,sequence=1:1:512,past=0:512:1536`.

    Raises VerificationFailed (exit 3) when the engine differs from PyTorch beyond the tolerance of
    `precision`, and other KilnErrors (exit 2) for bad input.
    """
    target_spec = target_named(target, precision)
    missing = missing_on_host(target_spec)
    if missing:
        raise KilnError(f"target {target!r} cannot be built on this machine: {missing}")
    output = Path(output) if output is not None else default_output(spec, target, precision)
    refuse_existing(output, force)
    output.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output)
    workdir = output.parent / f".{output.name}{_TEMP_MARK}{os.getpid()}"
    steps: list[dict] = []

    @contextlib.contextmanager
    def step(name: str):
        if on_step:
            on_step(name, None)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        steps.append({"name": name, "seconds": round(seconds, 3)})
        if on_step:
            on_step(name, seconds)

    try:
        workdir.mkdir()
        with step("load"):
            from exporter import load_model

            loaded = load_model(spec, trust_remote_code=trust_remote_code)
        with step("export"):
            graph = _capture(loaded, workdir, target_spec, external_data_threshold, passes)
            tokenizer = _copy_tokenizer(loaded.tokenizer_dir, workdir)
        pass_reports = []
        if graph.path.suffix == ".onnx":
            with step("optimize"):
                pass_reports = _optimize(graph.path, loaded, target_spec, precision, passes)
        engine_fields = {}
        if target_spec.backend == "tensorrt":
            with step("build"):
                engine_fields = _build_tensorrt(graph.path, workdir, loaded, precision, profile)
        fields = {
            "source": {
                "spec": spec,
                "kind": loaded.kind,
                "family": loaded.family.name,
                "config": json.loads(loaded.config.to_json_string(use_diff=False)),
                "weights_sha256": loaded.weights_sha256,
            },
            "target": target,
            "precision": precision,
            "backend": target_spec.backend,
            "providers": list(target_spec.providers),
            "model_file": graph.path.name,
            "external_data": graph.path.with_name(graph.path.name + ".data").exists(),
            "opset": graph.opset,
            "tokenizer": tokenizer,
            "passes": [r.to_json() for r in pass_reports] + _captured_pass_reports(graph),
        }
        if graph.torch_ops:
            fields["torch_ops"] = sorted(graph.torch_ops)  # to be loaded before the package (plugins.load_torch_op)
        from exporter.capture import contract_signature

        fields["signature"] = contract_signature(loaded.facts)
        fields.update(engine_fields)
        write_manifest(workdir, dict(fields, steps=steps, verification={"skipped": True}))
        import runtimes

        with runtimes.load(workdir, device=target_spec.device) as engine:
            fields["signature"] = engine.signature.to_json()
            if verify:
                with step("verify"):
                    reference = reference_predictor(loaded, engine.signature)
                    report = compare(engine, reference, loaded.facts.vocab_size, precision, VerificationInputs())
            else:
                report = {"skipped": True, "passed": None}
        if report.get("passed") is False:
            message = f"verification failed for {spec} ({target}, {precision}): " + "; ".join(report["failures"])
            if pass_reports and target_spec.backend == "onnxruntime":
                report["error_by_pass"] = _error_by_pass(loaded, workdir / "blame", target_spec, precision,
                                                         [r.name for r in pass_reports], engine.signature)
                worst = max(report["error_by_pass"], key=lambda e: e["growth"])
                message += f"; the error grew most in pass {worst['after']!r} (x{worst['growth']:.3g})"
            raise VerificationFailed(message, report)
        write_json(workdir / "report.json", {"verification": report})
        manifest = write_manifest(workdir, dict(fields, steps=steps, verification=report))
        move_into_place(workdir, output)
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        raise KilnError(f"{output}: cannot write the engine ({error.strerror}); nothing was left there") from error
    finally:
        # Also on KeyboardInterrupt and SystemExit (SIGINT, SIGTERM): never leave a half-built engine.
        shutil.rmtree(workdir, ignore_errors=True)
    return ConvertResult(output, manifest, steps)


def _capture(loaded, workdir: Path, target: Target, external_data_threshold: int | None, passes: list[str] | None):
    if target.backend == "aoti":
        from exporter.aoti import capture_aoti

        return capture_aoti(loaded, workdir, device=target.device, kiln_attention=_aoti_kiln_attention(loaded, target, passes))
    from exporter.capture import EXTERNAL_DATA_THRESHOLD, capture

    threshold = EXTERNAL_DATA_THRESHOLD if external_data_threshold is None else external_data_threshold
    return capture(loaded, workdir, external_data_threshold=threshold)


def _captured_pass_reports(graph) -> list[dict]:
    """kiln_attention on an AOTInductor package, in the shape of an ONNX pass's report."""
    if not graph.torch_ops:
        return []
    from optimizers import PassReport

    calls = {op.replace(".default", ""): count for op, count in graph.torch_ops.items()}
    return [PassReport("kiln_attention", changed=True, fused=calls,
                       details={"via": "transformers' AttentionInterface, at capture"}).to_json()]


def _aoti_kiln_attention(loaded, target: Target, passes: list[str] | None) -> bool:
    """AOTInductor packages take one pass, kiln_attention, applied while the model is captured."""
    from exporter.kiln_attention import FAMILIES

    if not passes:
        return False
    if set(passes) != {"kiln_attention"}:
        raise KilnError(f"target {target.name!r} builds no ONNX graph: its only pass is kiln_attention (got {', '.join(passes)})")
    if loaded.family.name not in FAMILIES:
        raise KilnError(
            f"kiln_attention on {target.name!r} routes transformers' attention registry to the plugin op, which "
            f"{', '.join(FAMILIES)} layers use; {loaded.family.name} computes its attention inline"
        )
    return True


def _optimize(model_path: Path, loaded, target: Target, precision: str, passes: list[str] | None) -> list:
    """Run the recipe of (target, precision), or `passes`, over model.onnx in place; returns the reports."""
    from optimizers import PassContext, run_recipe

    if passes is None:
        passes = None if target.recipe else ["cleanup"]
    context = PassContext(target=target.recipe or target.name, precision=precision, facts=loaded.facts,
                          family=loaded.family.name)
    model, reports = run_recipe(model_path, context, passes=passes, output=model_path)
    # An onnx_ir graph is a web of cycles (nodes <-> graph): without a collection its weights would stay in
    # memory through verification, the peak of a conversion.
    del model
    gc.collect()
    return reports


def _error_by_pass(loaded, scratch: Path, target: Target, precision: str, passes: list[str], signature) -> list[dict]:
    """Export again and verify the model after each pass, to say which pass made the error grow."""
    from exporter.capture import capture
    from optimizers import PassContext, run_recipe, save
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    scratch.mkdir()
    reference = reference_predictor(loaded, signature)
    graph = capture(loaded, scratch)
    figures = [{"after": "export", **_logits_error(OnnxRuntimePredictor(graph.path, target.providers), reference,
                                                   loaded, precision)}]

    def measure(report, model) -> None:
        path = scratch / f"after-{report.name}.onnx"
        save(model, path)
        figures.append({"after": report.name, **_logits_error(OnnxRuntimePredictor(path, target.providers), reference,
                                                              loaded, precision)})

    context = PassContext(target=target.recipe or target.name, precision=precision, facts=loaded.facts,
                          family=loaded.family.name)
    run_recipe(graph.path, context, passes=passes, after_pass=measure)
    for before, after in zip(figures, figures[1:]):
        after["growth"] = after["max_abs"] / max(before["max_abs"], 1e-12)
    figures[0]["growth"] = 1.0
    return figures


def _logits_error(engine, reference, loaded, precision: str) -> dict:
    logits = compare(engine, reference, loaded.facts.vocab_size, precision, VerificationInputs())["logits"]
    return {k: logits[k] for k in ("max_abs", "relative", "top1_agreement", "kl_mean")}


def _build_tensorrt(onnx_path: Path, workdir: Path, loaded, precision: str, profile: str | None) -> dict:
    """engine.plan from the optimized ONNX; the ONNX files are then dropped: the plan is the engine."""
    from kiln.tensorrt_build import build_engine_files

    max_positions = getattr(loaded.config, "max_position_embeddings", None) or getattr(loaded.config, "n_positions", None)
    fields = build_engine_files(onnx_path, workdir, precision, profile=profile, max_positions=max_positions)
    for path in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        path.unlink(missing_ok=True)
    return fields


def refuse_existing(output: Path, force: bool) -> None:
    if output.exists() and not force:
        raise KilnError(f"{output}: already exists (pass --force to replace it)")
    if output.exists() and not output.is_dir():
        raise KilnError(f"{output}: exists and is not a directory")


def remove_stale_temporaries(output: Path) -> None:
    """Delete temporary folders of earlier converts to `output` whose process is gone (e.g. SIGKILL)."""
    for path in output.parent.glob(f".{output.name}{_TEMP_MARK}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def move_into_place(workdir: Path, output: Path) -> None:
    """Rename the finished engine to `output`; an old engine there (--force) is swapped out first."""
    if output.exists():
        old = output.parent / f".{output.name}{_TEMP_MARK}old-{os.getpid()}"
        os.rename(output, old)
        os.rename(workdir, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(workdir, output)


def _copy_tokenizer(source: Path | None, workdir: Path) -> str | None:
    """Carry the source folder's tokenizer files into `tokenizer/`, so generate can take text."""
    if source is None:
        return None
    files = [source / name for name in _TOKENIZER_FILES if (source / name).is_file()]
    if not files:
        return None
    (workdir / "tokenizer").mkdir()
    for path in files:
        shutil.copy2(path, workdir / "tokenizer" / path.name)
    return "tokenizer"
