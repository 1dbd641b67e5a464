"""The ONNX Runtime backend: `model.onnx` captured by torch.onnx, optimized by the target's recipe, run by
an InferenceSession with the target's execution providers and the options the manifest records for them."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from kiln.backends.record import Backend, BuildRequest
from kiln.errors import KilnError

# What execution providers are told, as data. TF32 (on by default on NVIDIA GPUs since Ampere) rounds fp32
# matmul inputs to 10 mantissa bits, beyond the fp32 tolerance: fp32 engines turn it off.
TF32_OFF = {"CUDAExecutionProvider": {"use_tf32": "0"}}
# Providers that build for explicit shape ranges: --profile becomes these options (min, opt, max).
PROFILE_OPTIONS = {
    "TensorrtExecutionProvider": ("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes"),
}
# Providers that keep what they build between sessions; runtimes puts the folders in the user's cache. Without
# them TensorRT rebuilds its engine in every new session.
CACHE_SWITCHES = {"TensorrtExecutionProvider": {"trt_engine_cache_enable": "1", "trt_timing_cache_enable": "1"}}
# Providers that compile a program per distinct input shape (onnxruntime's MIGraphX provider re-parses and
# recompiles, seconds each, whenever a shape changes): the decode loop pads to bucketed shapes for them.
COMPILES_PER_SHAPE = ("MIGraphXExecutionProvider",)


def capture_onnx(loaded, workdir: Path, request: BuildRequest) -> dict:
    from exporter.capture import capture

    if request.external_data_threshold is None:
        return capture(loaded, workdir)
    return capture(loaded, workdir, request.external_data_threshold)


def recipe(target, precision: str) -> list[str]:
    """The target's recipe row, or cleanup alone where the runtime fuses by itself (TensorRT provider)."""
    from optimizers import recipe_for

    return recipe_for(target.recipe, precision) if target.recipe else ["cleanup"]


def pass_defaults(target) -> dict:
    # Shape buckets pad rows on the left; GroupQueryAttention's engines need right-padded ones (cache layout "slot").
    return {"fusion": {"gqa": False}} if any(p in COMPILES_PER_SHAPE for p in target.providers) else {}


def missing_providers(target) -> str | None:
    import onnxruntime

    available = onnxruntime.get_available_providers()
    absent = [p for p in target.providers if p not in available]
    if absent:
        return f"ONNX Runtime here lacks {', '.join(absent)} (available: {', '.join(available)})"
    return None


def provider_fields(request: BuildRequest, graphs: dict, loaded) -> dict:
    """The manifest's `providers`, `provider_options` (provider -> option -> text), `profile` (dim ranges)
    where a provider takes --profile, `tf32` on NVIDIA targets, `shape_buckets` where a provider compiles
    per input shape."""
    from kiln.tensorrt_profile import parse_profile, profile_shapes

    target = request.target
    fields: dict = {"providers": list(target.providers)}
    profiled = [p for p in target.providers if p in PROFILE_OPTIONS]
    if request.profile and not profiled:
        raise KilnError(f"--profile sets shape ranges for TensorRT; target {target.name!r} "
                        f"({', '.join(target.providers)}) takes none")
    options: dict[str, dict[str, str]] = {}
    for provider in target.providers:
        chosen = dict(CACHE_SWITCHES.get(provider, {}))
        if request.precision == "fp32":
            chosen.update(TF32_OFF.get(provider, {}))
        if provider in PROFILE_OPTIONS:
            ranges = parse_profile(request.profile, loaded.family.max_positions_of(loaded.config))
            shapes = {name: shape for g in graphs.values() for name, shape in profile_shapes(g.signature, ranges).items()}
            chosen.update(zip(PROFILE_OPTIONS[provider], profile_option_texts(shapes)))
            fields["profile"] = ranges.to_json()
        if chosen:
            options[provider] = chosen
    if options:
        fields["provider_options"] = options
    if target.gpu == "nvidia":
        fields["tf32"] = request.precision != "fp32"
    if any(p in COMPILES_PER_SHAPE for p in target.providers):
        fields["shape_buckets"] = True
    return fields


def profile_option_texts(shapes: dict) -> tuple[str, str, str]:
    """`{"input_ids": ((1, 1), (1, 1), (8, 512))}` -> ("input_ids:1x1", "input_ids:1x1", "input_ids:8x512"),
    the form of ONNX Runtime's trt_profile_*_shapes options."""
    return tuple(",".join(f"{name}:{'x'.join(map(str, ranges[i]))}" for name, ranges in shapes.items())
                 for i in range(3))


def op_histogram(path: Path) -> Counter:
    """Op types of an ONNX graph (domain-prefixed outside the standard domain); its weights are not read."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return Counter(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}" for node in graph.node)


def bytes_read_per_token(onnx_path: Path) -> int:
    """Initializer bytes a decode step reads: every weight except tables only gathered from (embeddings, fp32
    or in GatherBlockQuantized blocks)."""
    import onnx_ir as ir

    total = 0
    for value in ir.load(str(onnx_path)).graph.initializers.values():
        users = {use.node.op_type for use in value.uses()}
        if value.const_value is not None and users and not users <= {"Gather", "GatherBlockQuantized"}:
            total += value.const_value.nbytes
    return total


def open_graph(path: Path, target):
    from runtimes.onnxruntime_adapter import OnnxRuntimePredictor

    return OnnxRuntimePredictor(path, target.providers, huge_pages=False)  # run once to compare, then closed


BACKEND = Backend(
    name="onnxruntime",
    adapter="runtimes.onnxruntime_adapter:OnnxRuntimePredictor",
    capture=capture_onnx,
    recipe=recipe,
    pass_defaults=pass_defaults,
    missing_on_host=missing_providers,
    manifest_fields=provider_fields,
    # Measured as users load it: idle pools spin between runs (ONNX Runtime's default; 20 % faster decode steps
    # here than with sleeping pools). `run_bench` lets one engine's pool settle before the next is timed.
    bench_options=lambda threads: {"threads": threads},
    # Verification runs a few checks and closes the session: collapsing its weights into huge pages would cost
    # more load time than the checks gain.
    verify_options={"huge_pages": False},
    weight_bytes=bytes_read_per_token,
    op_histogram=op_histogram,
    open_graph=open_graph,
)
