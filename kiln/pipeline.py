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

from kiln.backends import BuildRequest, backend_of, refuse_unhosted_passes
from kiln.calibration import read_calibration
from kiln.errors import KilnError, VerificationFailed
from kiln.interop import WRITERS as INTEROP_WRITERS
from kiln.kinds import kind_checks, refuse_ungated_precision
from kiln.manifest import write_json, write_manifest
from kiln.onnxscript_fixes import add_complex_unsqueeze, make_no_op_rules_exact
from kiln.reference import reference_predictor
from kiln.targets import missing_on_host, target_named
from kiln.verify import compare, verification_inputs

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model")
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
    pass_options: dict | list[str] | None = None,
    calibration: str | os.PathLike | None = None,
    profile: str | None = None,
    on_step: StepCallback | None = None,
) -> ConvertResult:
    """Build a verified engine directory for `spec` and return its path and manifest.

    `passes` overrides the optimization recipe of (target, precision); `pass_options` sets the passes'
    declared options (`{"int4": {"block_size": 64}}` or `["int4.block_size=64"]`); `calibration` is a text
    file (tokenized with the model's tokenizer) or an `.npz` of token ids for int8-static; `profile` is the
    TensorRT shape ranges, `batch=1:1:8,sequence=1:1:512,past=0:512:1536`.

    Raises VerificationFailed (exit 3) when the engine differs from PyTorch beyond the tolerance of
    `precision`, and other KilnErrors (exit 2) for bad input.
    """
    from optimizers import parse_pass_options, passes_named

    make_no_op_rules_exact()
    add_complex_unsqueeze()
    target_spec = target_named(target, precision)
    backend = backend_of(target_spec)
    if passes:
        passes_named(passes)  # unknown names are refused before any work
        refuse_unhosted_passes(backend, passes)
    if isinstance(pass_options, (list, tuple)):
        pass_options = parse_pass_options(list(pass_options))
    request = BuildRequest(target_spec, precision, passes, dict(pass_options or {}), profile=profile,
                           external_data_threshold=external_data_threshold)
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
            checks = kind_checks(loaded.kind)
            refuse_ungated_precision(checks, precision, spec)
            if calibration is not None:
                request.calibration = read_calibration(Path(calibration), loaded)
        with step("export"):
            graphs = _capture(backend, loaded, workdir, request)
            tokenizer = _copy_tokenizer(loaded.tokenizer_dir, workdir)
        recorded = None
        if checks.record is not None:  # the kind verifies from recorded steps: the source can go now
            if verify:
                with step("reference"):
                    recorded = checks.record(loaded, _signatures(graphs), None)
            if loaded.origin != "factory":  # a factory's model may be its caller's own, still in use
                _release_weights(loaded)
        pass_reports = []
        if backend.recipe is not None:
            with step("optimize"):
                pass_reports = _optimize(graphs, loaded, request, backend.recipe(target_spec, precision))
        fields = {
            "kind": loaded.kind,
            "source": {
                "spec": spec,
                "origin": loaded.origin,
                "family": loaded.family.name,
                "family_tested": loaded.family.tested,
                "max_positions": loaded.family.max_positions_of(loaded.config),
                "config": loaded.config if isinstance(loaded.config, dict) else json.loads(loaded.config.to_json_string(use_diff=False)),
                "weights_sha256": loaded.weights_sha256,
            },
            "target": target,
            "precision": precision,
            "backend": backend.name,
            "device": target_spec.device,
            "graphs": {role: {"file": g.path.relative_to(workdir).as_posix(), "signature": g.signature.to_json(),
                              # layers cloned from an exported one, not traced (exporter.layer_stamping)
                              **({"stamped_layers": g.stamped_layers} if g.stamped_layers else {})}
                       for role, g in graphs.items()},
            "opset": max(g.opset for g in graphs.values()),
            "tokenizer": tokenizer,
            "passes": [r.to_json() for r in pass_reports] + _captured_pass_reports(graphs),
            **backend.manifest_fields(request, graphs, loaded),
            **_kind_fields(loaded),
            **_pass_manifest_fields(pass_reports),
        }
        torch_ops = sorted({op for g in graphs.values() for op in g.torch_ops})
        if torch_ops:
            fields["torch_ops"] = torch_ops  # to be loaded before the package (plugins.load_torch_op)
        if backend.build is not None:
            with step("build"):
                fields.update(backend.build(graphs, workdir, loaded, request))
        if loaded.kind in INTEROP_WRITERS:  # after the build, whose files are the engine's graphs
            fields["interop"] = INTEROP_WRITERS[loaded.kind](loaded, workdir, target_spec, fields["graphs"])
        write_manifest(workdir, dict(fields, steps=steps, verification={"skipped": True}))
        import runtimes

        if recorded is not None and not recorded.fits(loaded, fields.get("profile")):
            # The build's shape ranges leave out the inputs recorded: the source is loaded again for them.
            with step("reference"):
                recorded = checks.record(_with_weights(loaded, spec, trust_remote_code), _signatures(graphs),
                                         fields.get("profile"))
            gc.collect()
        with runtimes.load(workdir, trust_native_code=True, **backend.verify_options) as engine:  # built just now
            for role, graph in engine.graphs.items():
                fields["graphs"][role]["signature"] = graph.signature.to_json()
            if verify:
                with step("verify"):
                    report = checks.verify(engine, loaded, precision, profile=fields.get("profile"), recorded=recorded)
            else:
                report = {"skipped": True, "passed": None}
        if report.get("passed") is False:
            message = f"verification failed for {spec} ({target}, {precision}): " + "; ".join(report["failures"])
            if pass_reports and backend.open_graph is not None and checks.blame_passes:
                source = _with_weights(loaded, spec, trust_remote_code)  # blaming a pass exports the source again
                report["error_by_pass"] = _error_by_pass(source, workdir / "blame", backend, request,
                                                         [r.name for r in pass_reports], engine.signature)
                message += "; " + _blame(report["error_by_pass"])
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


def _release_weights(loaded) -> None:
    """Free the source's weights after the export, keeping its structure and configs (the generation config that
    interop files copy): holding them through optimization and beside the engine was a conversion's memory peak."""
    loaded.module.to("meta")
    gc.collect()


def _with_weights(loaded, spec: str, trust_remote_code: bool):
    """`loaded`, or the source loaded again when `_release_weights` let its weights go."""
    from exporter import load_model

    if any(parameter.is_meta for parameter in loaded.module.parameters()):
        return load_model(spec, trust_remote_code=trust_remote_code)
    return loaded


def _signatures(graphs: dict) -> dict:
    return {role: graph.signature for role, graph in graphs.items()}


def _capture(backend, loaded, workdir: Path, request: BuildRequest) -> dict:
    from exporter import ExportError

    try:
        return backend.capture(loaded, workdir, request)
    except ExportError as error:
        if loaded.family.tested:
            raise
        raise ExportError(f"{error} (family {loaded.family.name!r} is untested: `kiln families` lists those known "
                          "to convert)") from error


def _kind_fields(loaded) -> dict:
    """What the manifest records of the model's kind beyond its graphs (a diffusion pipeline's facts, say)."""
    from exporter.graphs import export_kind

    return export_kind(loaded.kind, loaded.spec).load().manifest_fields(loaded)


def _pass_manifest_fields(pass_reports: list) -> dict:
    """What passes ask the manifest to record for the runtime (fusion's `cache_layout`, `logits_to_keep`)."""
    fields: dict = {}
    for report in pass_reports:
        fields.update(report.details.get("manifest", {}))
    return fields


def _captured_pass_reports(graphs: dict) -> list[dict]:
    """kiln_attention on an AOTInductor package, in the shape of an ONNX pass's report."""
    from optimizers import PassReport

    calls = {op.replace(".default", ""): count for g in graphs.values() for op, count in g.torch_ops.items()}
    if not calls:
        return []
    return [PassReport("kiln_attention", changed=True, fused=calls,
                       details={"via": "transformers' AttentionInterface, at capture"}).to_json()]


def pass_context(loaded, request: BuildRequest):
    """What the passes may read: target, precision, the model's sizes and family record, options, calibration."""
    from optimizers import PassContext
    from runtimes.decoder_lm import ModelFacts

    calibration = request.calibration
    # Passes read a decoder's sizes (fusion counts its layers); another kind's facts mean nothing to them.
    facts = loaded.facts if isinstance(loaded.facts, ModelFacts) else None
    defaults = backend_of(request.target).pass_defaults(request.target)
    options = {name: {**defaults.get(name, {}), **request.pass_options.get(name, {})}
               for name in {*defaults, *request.pass_options}}
    return PassContext(
        target=request.target.name, recipe=request.target.recipe, precision=request.precision, facts=facts,
        family=loaded.family, options=options,
        calibration=calibration.feeds if calibration else None,
        calibration_source=calibration.source if calibration else None,
    )


def _optimize(graphs: dict, loaded, request: BuildRequest, recipe: list[str]) -> list:
    """Run `request.passes` (else `recipe`) over each captured ONNX graph in place; returns the reports."""
    from optimizers import run_recipe

    reports = []
    for graph in graphs.values():
        model, graph_reports = run_recipe(graph.path, pass_context(loaded, request), passes=request.passes or recipe,
                                          output=graph.path)
        reports += graph_reports
        # An onnx_ir graph is a web of cycles (nodes <-> graph): without a collection its weights would stay in
        # memory through verification, the peak of a conversion.
        del model
        gc.collect()
    return reports


def _error_by_pass(loaded, scratch: Path, backend, request: BuildRequest, passes: list[str], signature) -> list[dict]:
    """Export again and verify the model after each pass, to say which pass made the error grow."""
    from optimizers import run_recipe, save

    scratch.mkdir()
    graph = backend.capture(loaded, scratch, request)["model"]
    reference = reference_predictor(loaded, {"model": signature})
    target, precision = request.target, request.precision
    figures = [{"after": "export", **_logits_error(backend.open_graph(graph.path, target), reference, loaded, precision)}]

    def measure(report, model) -> None:
        path = scratch / f"after-{report.name}.onnx"
        save(model, path)
        figures.append({"after": report.name, **_logits_error(backend.open_graph(path, target), reference, loaded, precision)})

    run_recipe(graph.path, pass_context(loaded, request), passes=passes, after_pass=measure)
    for before, after in zip(figures, figures[1:]):
        after["growth"] = after["max_abs"] / max(before["max_abs"], 1e-12)
    figures[0]["growth"] = 1.0
    return figures


def _blame(figures: list[dict]) -> str:
    """Which step made the error: the export itself when most of it is there before any pass."""
    exported, final = figures[0]["max_abs"], figures[-1]["max_abs"]
    if exported >= 0.5 * final:
        return f"the exported graph already differs (max abs error {exported:.3g}), before any pass"
    worst = max(figures[1:], key=lambda e: e["growth"])
    return f"the error grew most in pass {worst['after']!r} (x{worst['growth']:.3g})"


def _logits_error(engine, reference, loaded, precision: str) -> dict:
    logits = compare(engine, reference, loaded.facts.vocab_size, precision, verification_inputs(loaded))["logits"]
    return {k: logits[k] for k in ("max_abs", "relative", "top1_agreement", "kl_mean")}


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
    """Carry the source folder's tokenizer files beside the graph (where transformers, Optimum and
    onnxruntime-genai look for them), so generate can take text."""
    if source is None:
        return None
    files = [source / name for name in _TOKENIZER_FILES if (source / name).is_file()]
    if not files:
        return None
    for path in files:
        shutil.copy2(path, workdir / path.name)
    return "."
