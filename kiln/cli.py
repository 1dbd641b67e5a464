"""The `kiln` command line. Progress goes to stderr; `--json` puts one JSON document on stdout."""
from __future__ import annotations

import json
import signal
import sys
from collections import Counter
from pathlib import Path

import click

from kiln.errors import EXIT_INTERNAL, VerificationFailed, exit_code_of

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  internal error (a bug: rerun with --debug and report the traceback)
  2  user error: bad spec, bad folder or config, existing output, bad engine or feeds
  3  verification failed: the engine differs from PyTorch beyond the tolerance"""


class KilnGroup(click.Group):
    """Turns user errors into one line and an exit code; `--debug` shows the traceback instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except Exception as error:
            state = ctx.ensure_object(dict)
            if state.get("debug"):
                raise
            code = exit_code_of(error)
            message = str(error) if code != EXIT_INTERNAL else f"internal error: {type(error).__name__}: {error}"
            if state.get("json"):
                document = {"ok": False, "exit_code": code, "error": message}
                if isinstance(error, VerificationFailed):
                    document["verification"] = error.report
                click.echo(json.dumps(document, indent=2))
            click.echo(f"error: {message}" + (" (rerun with --debug for the traceback)" if code == EXIT_INTERNAL else ""), err=True)
            ctx.exit(code)


@click.group(cls=KilnGroup, epilog=EXIT_CODES_HELP)
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """torchkiln: convert PyTorch generative models into verified engines."""
    ctx.ensure_object(dict)["debug"] = debug


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so convert's cleanup runs and nothing half-written is left.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cli(prog_name="kiln")


def _json_mode(ctx: click.Context, as_json: bool) -> None:
    ctx.ensure_object(dict)["json"] = as_json


def _trust_options(command):
    """--expect-digest, --public-key, --trust-native-code, handed to runtimes.load as `trust`."""
    import functools

    @click.option("--expect-digest", metavar="SHA256", help="Refuse any engine but the one with this digest "
                  "(`kiln convert --json` reports it).")
    @click.option("--public-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                  help="Refuse the engine unless kiln.sig is a valid signature by this key's private half (PEM).")
    @click.option("--trust-native-code", is_flag=True, help="Load an engine that carries native code (AOTInductor, "
                  "TensorRT, torch ops) without a pinned digest or signature.")
    @functools.wraps(command)
    def with_trust(*args, expect_digest, public_key, trust_native_code, **kwargs):
        trust = {"expect_digest": expect_digest, "public_key": public_key, "trust_native_code": trust_native_code}
        return command(*args, trust=trust, **kwargs)

    return with_trust


def _device_option(command):
    return click.option("--device", help="Run on this device instead of the engine's own (its manifest's), "
                        "e.g. cuda:1 for the second GPU.")(command)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("spec")
@click.option("--target", default="cpu", show_default=True, help="Where the engine runs (see kiln.targets).")
@click.option("--precision", default="fp32", show_default=True, help="Numeric precision of the engine.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Engine directory [default: build/NAME-TARGET-PRECISION].")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--no-verify", "skip_verify", is_flag=True, help="Skip verification against PyTorch (recorded in the manifest).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a model folder's own Python code to run.")
@click.option("--passes", help="Comma-separated optimization passes instead of the recipe; `--passes list` shows the recipe.")
@click.option("--pass-option", "pass_options", multiple=True, metavar="PASS.OPTION=VALUE",
              help="Set a pass's option, e.g. int4.block_size=64 (repeatable; `--passes list` shows each pass's options).")
@click.option("--calibration", type=click.Path(path_type=Path),
              help="int8-static: calibrate on this text file (tokenized with the model's tokenizer) or .npz of token ids.")
@click.option("--profile", help="TensorRT shape ranges, e.g. batch=1:1:8,sequence=1:1:512,past=0:512:1536.")
@click.option("--auto", is_flag=True, help="Build every precision up to --budget (int8 also as weight-only blocks, int4 also "
              "in blocks of 128), keep the fastest that passes verification.")
@click.option("--budget", default="int4", show_default=True, help="With --auto: the most lossy precision allowed.")
@click.option("--shape", default="batch=1,prompt=128,new=64", show_default=True, help="With --auto: the request to be fast on.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def convert(ctx, spec, target, precision, output, force, skip_verify, trust_remote_code, passes, pass_options,
            calibration, profile, auto, budget, shape, as_json):
    """Convert SPEC into a verified engine directory.

    SPEC is a preset name (see `kiln presets`), a local Hugging Face model folder, or
    `package.module:factory` returning a transformers causal LM (this runs that code: trust it).
    """
    from kiln.pipeline import convert as run_convert
    from kiln.progress import StepPrinter

    _json_mode(ctx, as_json)
    if passes == "list":
        _print_recipe(target, precision, as_json)
        return
    with StepPrinter() as printer:
        if auto:
            from kiln.auto import convert_auto

            result = convert_auto(spec, target, output, budget=budget, shape=shape, force=force,
                                  trust_remote_code=trust_remote_code, pass_options=list(pass_options),
                                  calibration=calibration, on_step=printer.on_step)
        else:
            result = run_convert(
                spec, target, precision, output, force=force, verify=not skip_verify,
                trust_remote_code=trust_remote_code, passes=passes.split(",") if passes else None,
                pass_options=list(pass_options), calibration=calibration, profile=profile, on_step=printer.on_step,
            )
    manifest = result.manifest
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "engine_dir": str(result.engine_dir), **_summary(manifest)}, indent=2))
        return
    click.echo(f"engine: {result.engine_dir} ({_summary(manifest)['digest']})")
    if not manifest["source"].get("family_tested", True):
        click.echo(f"note: family {manifest['source']['family']!r} is not in the tested matrix (`kiln families`); "
                   "it converted and verified as shown below", err=True)
    for candidate in manifest.get("auto", {}).get("candidates", []):
        if "request_seconds" in candidate:
            click.echo(f"candidate {candidate['candidate']:<16} {candidate['request_seconds']:.3f} s per request, "
                       f"{candidate['decode_tok_s']:.1f} tok/s, top-1 {candidate['top1_agreement']:.2%}"
                       + (f"  ({candidate['rejected']})" if "rejected" in candidate else "  <- chosen"))
        else:
            click.echo(f"candidate {candidate['candidate']:<16} rejected: {candidate['rejected']}")
    verification = manifest["verification"]
    if verification.get("skipped"):
        click.echo("verification: skipped (--no-verify)")
    else:
        click.echo("verification: " + _verification_line(manifest))
        if verification.get("logits", {}).get("decisive_positions") == 0:
            click.echo("note: every position was a near-tie (flat logits, e.g. random weights): top-1 agreement says "
                       "nothing here; see tiny-trained for a model with confident predictions", err=True)


def _verification_line(manifest: dict, report: dict | None = None) -> str:
    """The engine's verification report (or `report`) in one line, as its model kind reads it."""
    from kiln.kinds import kind_checks
    from runtimes.engine_dir import engine_kind

    return kind_checks(engine_kind(manifest)).summary(report or manifest["verification"])


def _print_recipe(target: str, precision: str, as_json: bool) -> None:
    """The passes convert would run for (target, precision), one per line with what it does and its options."""
    from kiln.backends import backend_of
    from kiln.targets import target_named
    from optimizers import PASSES, describe_options

    spec = target_named(target, precision)
    backend = backend_of(spec)
    names = backend.recipe(spec, precision) if backend.recipe else []
    optional = [p for p in backend.optional_passes if p not in names]
    if as_json:
        click.echo(json.dumps({"target": target, "precision": precision, "passes": names, "optional": optional,
                               "options": {n: describe_options(PASSES[n]) for n in names + optional}}))
        return
    for name in names + optional:
        how = f"optional (--passes {','.join(names + [name])}): " if name in optional else ""
        click.echo(f"{name:<24} {how}{PASSES[name].description}")
        for line in describe_options(PASSES[name]):
            click.echo(f"{'':<26}--pass-option {name}.{line}")


def _summary(manifest: dict) -> dict:
    from runtimes.engine_dir import engine_device, engine_kind
    from runtimes.trust import engine_digest

    return {
        "digest": engine_digest(manifest),  # what a service pins: `kiln.load(dir, expect_digest=...)`
        "target": manifest["target"],
        "precision": manifest["precision"],
        "backend": manifest["backend"],
        "kind": engine_kind(manifest),
        "device": engine_device(manifest),
        "source": {k: manifest["source"].get(k) for k in ("spec", "origin", "family", "weights_sha256")},
        "steps": manifest["steps"],
        "passes": manifest.get("passes", []),
        "auto": manifest.get("auto"),
        "verification": manifest["verification"],
        "files": manifest["files"],
    }


@cli.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--report", "report_path", type=click.Path(path_type=Path),
              help="Write a Markdown report: manifest, pass log, fidelity, files.")
@click.option("--bench", "with_bench", is_flag=True, help="With --report: measure the engine beside PyTorch and add the table and a plot.")
@click.option("--trust-native-code", is_flag=True, help="With --bench: load an engine that carries native code.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def inspect(ctx, engine_dir, report_path, with_bench, trust_native_code, as_json):
    """Summarize an engine: source, target, steps, verification, op histogram and file sizes."""
    from kiln.backends import backend_named
    from runtimes.engine_dir import graph_entries, read_manifest

    _json_mode(ctx, as_json)
    manifest = read_manifest(engine_dir)
    histogram = backend_named(manifest["backend"]).op_histogram
    ops: Counter = Counter()
    for graph in graph_entries(manifest).values():
        if histogram is not None:
            ops.update(histogram(engine_dir / graph["file"]))
    document = {"engine_dir": str(engine_dir), **_summary(manifest), "op_histogram": dict(ops.most_common())}
    if report_path:
        _write_report(engine_dir, manifest, dict(ops.most_common()), report_path, with_bench, trust_native_code)
        document["report"] = str(report_path)
    if as_json:
        click.echo(json.dumps(document, indent=2))
        return
    source = manifest["source"]
    click.echo(f"engine      {engine_dir}")
    click.echo(f"source      {source['spec']} ({document['kind']} from a {source['origin']}, family {source['family']})")
    click.echo(f"target      {manifest['target']} / {manifest['precision']} on {manifest['backend']} ({document['device']})")
    click.echo("steps       " + ", ".join(f"{s['name']} {s['seconds']:.1f}s" for s in manifest["steps"]))
    verification = manifest["verification"]
    if verification.get("skipped"):
        click.echo("verified    no (skipped)")
    else:
        click.echo("verified    " + _verification_line(manifest))
    for report in manifest.get("passes", []):
        changes = {**report["fused"], **report["quantized"]}
        click.echo(f"pass        {report['name']} {report['seconds']:.1f}s: "
                   + (", ".join(f"{op} {n}" for op, n in changes.items()) or ("changed" if report["changed"] else "no change"))
                   + f"; nodes {sum(report['ops_before'].values())} -> {sum(report['ops_after'].values())}"
                   + f"; weights {report['bytes_before'] / 1e6:.2f} -> {report['bytes_after'] / 1e6:.2f} MB")
    click.echo("ops         " + ", ".join(f"{op} {n}" for op, n in ops.most_common()))
    for name, entry in manifest["files"].items():
        click.echo(f"file        {name}  {entry['bytes']:,} bytes  sha256 {entry['sha256'][:16]}…")


def _write_report(engine_dir: Path, manifest: dict, ops: dict, report_path: Path, with_bench: bool,
                  trust_native_code: bool) -> None:
    from kiln.report import markdown_report

    import importlib

    from kiln.kinds import kind_checks
    from runtimes.engine_dir import engine_kind

    bench, plot_name, bench_lines = None, None, None
    kind = kind_checks(engine_kind(manifest))
    if with_bench and kind.bench_module is not None:
        measure = importlib.import_module(kind.bench_module)
        bench = measure.bench([engine_dir], reference=True, rounds=2, trust_native_code=trust_native_code)
        plot_name = report_path.with_suffix(".png").name
        measure.plot(bench, report_path.with_name(plot_name))
        bench_lines = measure.table(bench)
    elif with_bench:
        from kiln.bench import BenchConfig, engine_candidate, plot, reference_candidate, run_bench

        candidates = [reference_candidate(engine_dir, 2), engine_candidate(engine_dir, 2, trust_native_code=trust_native_code)]
        bench = run_bench(candidates, BenchConfig(prompt_lengths=(32,), batches=(1,), new_tokens=16, rounds=2))
        plot_name = report_path.with_suffix(".png").name
        plot(bench, report_path.with_name(plot_name))
    report_path.write_text(markdown_report(engine_dir, manifest, ops, bench, plot_name, kind.summary, bench_lines))


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def presets(as_json):
    """List the built-in model presets."""
    from exporter.presets import PRESETS

    if as_json:
        click.echo(json.dumps({name: {"model_type": p.model_type, "description": p.description} for name, p in PRESETS.items()}, indent=2))
        return
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        click.echo(f"{name:<{width}}  {preset.description}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def families(as_json):
    """List the model families known to convert (the tested matrix), with what is particular to each.

    Any other transformers causal LM with a key/value cache converts too; convert says it is untested.
    """
    from exporter.families import FAMILIES

    records = {f.name: {"model_type": f.model_type, "positions": f.positions, "notes": f.notes,
                        "attention_plugin": f.plugin_biases or f.plugin_refusal, "fusion": f.fusion_note}
               for f in FAMILIES.values() if f.tested}
    if as_json:
        click.echo(json.dumps(records, indent=2))
        return
    width = max(map(len, records))
    for name, record in records.items():
        click.echo(f"{name:<{width}}  {record['model_type']:<14} {record['positions']:<8} {record['notes']}")


@cli.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--inputs", "inputs_path", required=True, type=click.Path(path_type=Path), help=".npz with one array per input name.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the outputs [default: outputs.npz].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@_device_option
@_trust_options
@click.pass_context
def predict(ctx, engine_dir, inputs_path, output, as_json, device, trust):
    """Run one forward pass of an engine on the arrays in an .npz file; write the outputs to an .npz."""
    import numpy as np

    import runtimes
    from kiln.errors import KilnError

    _json_mode(ctx, as_json)
    try:
        with np.load(inputs_path) as archive:
            feeds = {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as e:
        raise KilnError(f"{inputs_path}: cannot read as .npz ({e})") from None
    with runtimes.load(engine_dir, device, **trust) as engine:
        outputs = engine.predict(feeds)
    output = output or Path("outputs.npz")
    np.savez(output, **outputs)
    shapes = {name: list(array.shape) for name, array in outputs.items()}
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "outputs": str(output), "shapes": shapes}, indent=2))
    else:
        for name, shape in shapes.items():
            click.echo(f"{name}  {shape}")
        click.echo(f"wrote {output}")


@cli.command()
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--prompt", help="Text prompt (the engine must carry a tokenizer).")
@click.option("--prompt-ids", help="Comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--sample", is_flag=True, help="Sample instead of greedy decoding.")
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, show_default=True, type=int, help="0 keeps every token.")
@click.option("--top-p", default=1.0, show_default=True, type=float)
@click.option("--repetition-penalty", default=1.0, show_default=True, type=float)
@click.option("--seed", type=int, help="Seed for reproducible sampling (images: of the starting noise, default 0).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Images: the PNG to write [default: image.png].")
@click.option("--negative-prompt", default="", help="Images: what guidance steers away from.")
@click.option("--steps", default=25, show_default=True, type=int, help="Images: denoising steps.")
@click.option("--guidance", default=7.5, show_default=True, type=float, help="Images: classifier-free guidance scale.")
@click.option("--height", type=int, help="Images: height in pixels [default: the UNet's size].")
@click.option("--width", type=int, help="Images: width in pixels [default: the UNet's size].")
@click.option("--scheduler", help="Images: ddim, euler, dpm++2m or pndm [default: the engine's scheduler_config.json].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout instead of streaming.")
@_device_option
@_trust_options
@click.pass_context
def generate(ctx, engine_dir, prompt, prompt_ids, max_new_tokens, sample, temperature, top_k, top_p,
             repetition_penalty, seed, output, negative_prompt, steps, guidance, height, width, scheduler, as_json, device, trust):
    """Generate from a prompt: text, printing tokens as they come; or, from a diffusion engine, a PNG image."""
    import runtimes

    _json_mode(ctx, as_json)
    with runtimes.load(engine_dir, device, **trust) as engine:
        # A text-to-image engine (the diffusion kind's Predictor) makes pictures; a decoder streams tokens.
        if hasattr(engine, "generate_image"):
            _generate_image(engine, prompt, output or Path("image.png"), as_json, negative_prompt=negative_prompt,
                            steps=steps, guidance=guidance, seed=seed or 0, height=height, width=width,
                            scheduler=scheduler)
        else:
            _generate_tokens(engine, engine_dir, prompt, prompt_ids, max_new_tokens, as_json, do_sample=sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                             seed=seed)


def _generate_image(engine, prompt: str | None, output: Path, as_json: bool, **options) -> None:
    import time

    from kiln.errors import KilnError
    from kiln.images import write_png

    if prompt is None:
        raise KilnError("give --prompt TEXT: a diffusion engine makes an image from text")
    start = time.perf_counter()
    image = engine.generate_image(prompt, **options)[0]
    seconds = time.perf_counter() - start
    write_png(output, image)
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "image": str(output), "height": image.shape[0],
                               "width": image.shape[1], "seconds": round(seconds, 4)}, indent=2))
    else:
        click.echo(f"wrote {output} ({image.shape[1]}x{image.shape[0]}) in {seconds:.2f}s")


def _generate_tokens(engine, engine_dir: Path, prompt: str | None, prompt_ids: str | None, max_new_tokens: int,
                     as_json: bool, **options) -> None:
    import time

    from kiln.errors import KilnError
    from runtimes.engine_dir import engine_facts

    if (prompt is None) == (prompt_ids is None):
        raise KilnError("give exactly one of --prompt TEXT or --prompt-ids 1,2,3")
    if prompt_ids is not None:
        try:
            prompts = [[int(t) for t in prompt_ids.split(",")]]
        except ValueError:
            raise KilnError(f"--prompt-ids: expected comma-separated integers, got {prompt_ids!r}") from None
    else:
        prompts = prompt
    eos = engine_facts(engine_dir).eos_token_ids
    text = engine.tokenizer is not None and prompt is not None
    produced: list[int] = []
    shown = ""
    start = time.perf_counter()
    for tokens in engine.stream(prompts, max_new_tokens, eos_token_id=eos, **options):
        produced.append(int(tokens[0]))
        if as_json:
            continue
        if text:  # decode everything so far: a token can complete a multi-byte character
            decoded = engine.tokenizer.decode(produced)
            click.echo(decoded[len(shown):], nl=False)
            shown = decoded
        else:
            click.echo(f"{produced[-1]} ", nl=False)
    seconds = time.perf_counter() - start
    completion = engine.tokenizer.decode(produced) if text else None
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "tokens": produced, "text": completion,
                               "seconds": round(seconds, 4)}, indent=2))
    else:
        click.echo()
        click.echo(f"{len(produced)} tokens in {seconds:.2f}s ({len(produced) / seconds:.1f} tok/s, prefill included)", err=True)


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--against", "source", metavar="SOURCE",
              help="Check a folder not built by torchkiln (an Optimum export, a genai-builder folder) against this model.")
@click.option("--precision", default="fp32", show_default=True,
              help="The tolerance --against judges by (the folder has no manifest to say): fp32, fp16, bf16, int8, int4.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@_device_option
@_trust_options
@click.pass_context
def verify(ctx, engine_dir, source, precision, as_json, device, trust):
    """Check an engine's files against its manifest, then re-run its fidelity check against PyTorch."""
    import runtimes
    from kiln.kinds import kind_checks
    from kiln.reference import load_source
    from runtimes.engine_dir import engine_kind, read_manifest
    from runtimes.foreign import is_foreign

    _json_mode(ctx, as_json)
    if source is not None or is_foreign(engine_dir):
        _verify_against(engine_dir, source, precision, as_json, dict(trust, device=device))
        return
    manifest = read_manifest(engine_dir)
    with runtimes.load(engine_dir, device, **trust) as engine:
        report = kind_checks(engine_kind(manifest)).verify(engine, load_source(engine_dir), manifest["precision"],
                                                          profile=manifest.get("profile"))
    if not report["passed"]:
        raise VerificationFailed(f"{engine_dir}: verification failed: " + "; ".join(report["failures"]), report)
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "files": "match the manifest", "verification": report}, indent=2))
        return
    click.echo(f"files: all {len(manifest['files'])} match the manifest")
    click.echo("verification: " + _verification_line(manifest, report))


def _verify_against(engine_dir: Path, source: str | None, precision: str, as_json: bool, trust: dict) -> None:
    """The fidelity check of any decoder folder against a PyTorch model (no manifest: no file check)."""
    import runtimes
    from exporter import load_model
    from kiln.reference import reference_predictor
    from kiln.errors import KilnError
    from kiln.verify import TOLERANCES, compare, verification_inputs
    from runtimes.decoder_lm import contract_signature

    if precision not in TOLERANCES:
        raise KilnError(f"--precision {precision!r}: expected one of {', '.join(TOLERANCES)}")
    if source is None:
        raise KilnError(f"{engine_dir}: no manifest.json (not built by torchkiln): pass --against SOURCE, the PyTorch "
                        "model to check it against")
    loaded = load_model(source)
    with runtimes.load(engine_dir, **trust) as engine:
        reference = reference_predictor(loaded, {"model": contract_signature(loaded.facts)})
        report = compare(engine, reference, loaded.facts.vocab_size, precision, verification_inputs(loaded))
    provenance = getattr(engine, "provenance", None)
    if not report["passed"]:
        raise VerificationFailed(f"{engine_dir}: verification against {source} failed: " + "; ".join(report["failures"]), report)
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "against": source, "provenance": provenance,
                               "verification": report}, indent=2))
        return
    logits = report["logits"]
    click.echo(f"{engine_dir}: {provenance}")
    click.echo(f"verification against {source} ({precision}): passed; logits max abs error {logits['max_abs']:.2e}, "
               f"top-1 {logits['top1_agreement']:.2%}, KL {logits['kl_mean']:.2e}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--key", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Elliptic-curve private key (PEM), e.g. `openssl ecparam -name prime256v1 -genkey -noout -out key.pem`.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def sign(ctx, engine_dir, key, as_json):
    """Sign an engine: kiln.sig over all its files (OpenSSF model signing); `--public-key` checks it at load."""
    from runtimes.engine_dir import check_files, read_manifest
    from runtimes.trust import engine_digest, sign_directory

    _json_mode(ctx, as_json)
    manifest = read_manifest(engine_dir)
    check_files(engine_dir, manifest)  # sign only an engine that is intact
    signature = sign_directory(engine_dir, key)
    if as_json:
        click.echo(json.dumps({"ok": True, "exit_code": 0, "signature": str(signature), "digest": engine_digest(manifest)}, indent=2))
    else:
        click.echo(f"signed {engine_dir} ({engine_digest(manifest)}): {signature}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.argument("engine_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(min=1), help="Sequences decoded together.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(min=0),
              help="Requests waiting beyond a full batch; more get HTTP 429.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads of the engine [default: the backend's].")
@click.option("--api-key-file", type=click.Path(path_type=Path),
              help="Require `Authorization: Bearer KEY` with a key from this file (one per line); /health stays open.")
@click.option("--open-metrics", is_flag=True, help="With --api-key-file: serve /metrics without a key.")
@click.option("--chat-template", type=click.Path(path_type=Path), help="Jinja chat template replacing the tokenizer's.")
@click.option("--model-name", help="The model id the API reports [default: the engine folder's name].")
@click.option("--ray", "on_ray", is_flag=True, help="Run as a Ray Serve deployment (RAY_ADDRESS, or a local Ray).")
@click.option("--replicas", default=1, show_default=True, type=click.IntRange(min=1), help="With --ray: replicas.")
@click.option("--autoscale", metavar="MIN,MAX", help="With --ray: autoscale between MIN and MAX replicas.")
@_trust_options
@click.pass_context
def serve(ctx, engine_dir, host, port, max_batch, max_queue, threads, api_key_file, open_metrics, chat_template,
          model_name, on_ray, replicas, autoscale, trust):
    """Serve an engine over an OpenAI-compatible HTTP API with continuous batching (SIGTERM drains)."""
    from kiln.serve import ServeOptions, build_app, load_api_keys

    options = ServeOptions(max_batch=max_batch, max_queue=max_queue, open_metrics=open_metrics,
                           api_keys=load_api_keys(api_key_file) if api_key_file else (), model_name=model_name,
                           chat_template=chat_template)
    load_options = {**trust, **({"threads": threads} if threads else {})}
    if on_ray:
        from kiln.serve.ray_deployment import parse_autoscale, run_on_ray

        bounds = parse_autoscale(autoscale) if autoscale else None
        click.echo(f"kiln serve: {engine_dir} on Ray Serve at http://{host}:{port} (Ctrl-C stops)", err=True)
        run_on_ray(engine_dir, options, load_options, host=host, port=port, replicas=replicas, autoscale=bounds)
        return
    import uvicorn

    app = build_app(engine_dir, options, **load_options)  # loaded and checked before the port opens
    click.echo(f"kiln serve: {engine_dir} at http://{host}:{port}/v1 (SIGTERM or Ctrl-C drains and stops)", err=True)
    # uvicorn handles SIGTERM (drains, then re-raises it once done): a drained server then exits 0, not 143.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@cli.command()
@click.argument("engine_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--reference", is_flag=True, help="Also measure the first engine's source model in PyTorch eager (the baseline).")
@click.option("--compiled-reference", is_flag=True, help="Also measure that model under torch.compile (compiled in the warm-up round).")
@click.option("--prompt-lengths", default="32,128,512", show_default=True, help="Prefill lengths, batch 1.")
@click.option("--batches", default="1,8", show_default=True, help="Decode batch sizes.")
@click.option("--new-tokens", default=32, show_default=True, type=int, help="Tokens generated per decode run.")
@click.option("--rounds", default=3, show_default=True, type=int, help="Measured rounds, after one warm-up round.")
@click.option("--threads", default=2, show_default=True, type=int, help="Threads per engine.")
@click.option("--size", type=int, help="Diffusion engines: square image side in pixels [default: the engine's].")
@click.option("--steps", default=10, show_default=True, type=int, help="Diffusion engines: denoising steps per image.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a PNG: decode tok/s with the bandwidth floor, prefill latency.")
@click.option("--trust-native-code", is_flag=True, help="Load engines that carry native code (AOTInductor, TensorRT, torch ops).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.pass_context
def bench(ctx, engine_dirs, reference, compiled_reference, prompt_lengths, batches, new_tokens, rounds, threads, size, steps,
          plot_path, trust_native_code, as_json):
    """Measure engines side by side, interleaved in one process: prefill latency, first token, decode tok/s
    (diffusion engines: seconds per UNet step and per image, beside diffusers with --reference)."""
    import importlib

    from rich.console import Console

    from kiln.bench import BenchConfig, engine_candidate, plot, reference_candidate, run_bench
    from kiln.kinds import kind_checks
    from runtimes.engine_dir import engine_kind, read_manifest
    from runtimes.foreign import is_foreign

    _json_mode(ctx, as_json)
    kind = None if is_foreign(engine_dirs[0]) else kind_checks(engine_kind(read_manifest(engine_dirs[0])))
    if kind is not None and kind.bench_module is not None:
        measure = importlib.import_module(kind.bench_module)
        with Console(stderr=True).status("benchmarking…") as status:
            report = measure.bench(list(engine_dirs), reference=reference, threads=threads, rounds=rounds, size=size,
                                   steps=steps, batch=_int_list(batches, "--batches")[0],
                                   trust_native_code=trust_native_code, on_progress=status.update)
        if plot_path:
            measure.plot(report, plot_path)
            report["plot"] = str(plot_path)
        click.echo(json.dumps(report, indent=2) if as_json else "\n".join(measure.table(report)))
        return
    config = BenchConfig(_int_list(prompt_lengths, "--prompt-lengths"), _int_list(batches, "--batches"),
                         new_tokens, rounds=rounds, threads=threads)
    candidates = [engine_candidate(path, threads, trust_native_code=trust_native_code) for path in engine_dirs]
    if compiled_reference:
        candidates.insert(0, reference_candidate(engine_dirs[0], threads, compiled=True))
    if reference:
        candidates.insert(0, reference_candidate(engine_dirs[0], threads))
    console = Console(stderr=True)
    with console.status("benchmarking…") as status:
        report = run_bench(candidates, config, on_progress=status.update)
    if plot_path:
        plot(report, plot_path)
        report["plot"] = str(plot_path)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"{report['date']}, {report['machine']['cpu']}, {report['machine']['cores']} cores, "
               f"{report['machine']['memory_gib']} GiB; {threads} threads, {rounds} rounds interleaved, medians; "
               f"read bandwidth {report['read_bandwidth_gb_s']:.1f} GB/s")
    lengths = [str(n) for n in config.prompt_lengths]
    header = ["engine", "MB"] + [f"prefill {n} ms" for n in lengths] + ["1st token ms"] + \
        [f"decode b{b} tok/s" for b in config.batches] + ["floor b1", "b1 / floor", "vs first (decode b1)"]
    click.echo("| " + " | ".join(header) + " |")
    click.echo("|" + " --- |" * len(header))
    for entry in report["engines"]:
        cells = [entry["label"], f"{entry['size_bytes'] / 1e6:.1f}"]
        cells += [f"{entry['prefill_ms'][n]['median']:.1f}" if n in entry["prefill_ms"] else "-" for n in lengths]
        cells += [f"{entry['first_token_ms']['median']:.1f}"]
        cells += [f"{entry['decode_tok_s'][str(b)]['median']:.1f}" for b in config.batches]
        cells += [f"{entry['floor_tok_s']:.0f}" if entry["floor_tok_s"] else "-",
                  f"{entry['floor_share_b1']:.0%}" if entry["floor_share_b1"] else "-",
                  f"{entry['vs_first'].get('decode_b1', float('nan')):.2f}x"]
        click.echo("| " + " | ".join(cells) + " |")
    if plot_path:
        click.echo(f"plot: {plot_path}")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    from kiln.errors import KilnError

    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise KilnError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise KilnError(f"{option}: expected positive integers, got {text!r}")
    return values
