"""The TensorRT target's builder: ONNX -> serialized plan, with optimization profiles and caches.

The backend record (kiln/backends/tensorrt.py) calls `build_engine_files`; profiles are parsed in
kiln/tensorrt_profile.py. Everything but `build_plan` and `host_facts` is plain arithmetic on names,
shapes and digests, tested where TensorRT is absent; those two import tensorrt (and torch, for the GPU's
name) when called.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Sequence

from kiln.errors import KilnError
from kiln.tensorrt_profile import ShapeRange, parse_profile, profile_shapes
from plugins.cache import user_cache_dir
from plugins.onnx_node import tag_plugin_nodes
from runtimes.signature import Signature, TensorSpec

PLAN_FILE = "engine.plan"
NOT_INSTALLED = "TensorRT is not installed: pip install tensorrt on a machine with an NVIDIA GPU"

def onnx_signature(onnx_path: Path) -> Signature:
    """Names, dtypes and symbolic shapes of the graph's inputs and outputs (weights are not read)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor.shape.dim)
        return TensorSpec(value.name, tensor_dtype_to_np_dtype(tensor.elem_type).name, shape)

    return Signature(tuple(spec(v) for v in graph.input), tuple(spec(v) for v in graph.output))


@dataclass(frozen=True)
class PrecisionFlags:
    builder_flags: tuple[str, ...]  # names of trt.BuilderFlag members to set
    strongly_typed: bool  # the network keeps the ONNX graph's types; precision is in the graph
    cleared_flags: tuple[str, ...] = ()  # names of trt.BuilderFlag members to clear (TF32 is on by default)

    @property
    def tf32(self) -> bool:
        """Whether fp32 matmuls may round their inputs to TF32 (10 mantissa bits): recorded in the manifest."""
        return "TF32" not in self.cleared_flags


PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# The ONNX element type a strongly typed graph must carry for each reduced precision (onnx.TensorProto values).
GRAPH_TYPES = {"fp16": 10, "bf16": 16}  # FLOAT16, BFLOAT16


def precision_flags(precision: str, tensorrt_version: str) -> PrecisionFlags:
    """Builder flags for `precision` on this TensorRT.

    TensorRT 10 lowers an fp32 graph by flags; int8 also allows fp16 for the layers left unquantized
    (as `trtexec --int8 --fp16`). TensorRT 11 removed those flags: every network is strongly typed,
    so the ONNX must already carry fp16 types (the tensorrt recipe's fp16 pass) or Q/DQ nodes; no pass
    writes bf16 yet, so bf16 is refused there. TF32, on by default, is cleared for fp32: it rounds fp32
    matmul inputs to 10 mantissa bits, beyond the fp32 tolerance.
    """
    if precision not in PRECISIONS:
        raise KilnError(f"TensorRT precision {precision!r} is unknown (expected one of {', '.join(PRECISIONS)})")
    cleared = ("TF32",) if precision == "fp32" else ()
    if _major(tensorrt_version) >= 11:
        if precision == "bf16":
            raise KilnError(
                f"precision 'bf16' on TensorRT {tensorrt_version}: networks are strongly typed, so the graph must "
                "compute in bf16, and no torchkiln pass casts to bf16 yet; use --precision fp16 or TensorRT 10"
            )
        return PrecisionFlags((), strongly_typed=True, cleared_flags=cleared)
    flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}[precision]
    return PrecisionFlags(flags, strongly_typed=False, cleared_flags=cleared)


def check_graph_precision(model, precision: str, flags: PrecisionFlags) -> None:
    """A strongly typed build computes in the graph's own types: refuse a `precision` the graph does not carry,
    so the manifest never labels an fp32 plan fp16."""
    wanted = GRAPH_TYPES.get(precision)
    if wanted is None or not flags.strongly_typed:
        return
    graph = model.graph
    typed = [t.name for t in graph.initializer if t.data_type == wanted]
    casts = [n.name for n in graph.node if n.op_type == "Cast"
             and any(a.name == "to" and a.i == wanted for a in n.attribute)]
    if not typed and not casts:
        raise KilnError(
            f"precision {precision!r} on a strongly typed TensorRT build: the graph must compute in {precision}, "
            f"and this one has no {precision} weights or casts (run the {precision} pass: it is in the tensorrt "
            "recipe, or add it to --passes)"
        )


def _major(version: str) -> int:
    head = version.split(".")[0]
    if not head.isdigit():
        raise KilnError(f"TensorRT version: expected 'major.minor.patch', got {version!r}")
    return int(head)


def onnx_sha256(onnx_path: Path) -> str:
    """sha256 of the graph file and its external weights (`model.onnx.data`), when it has them."""
    onnx_path = Path(onnx_path)
    digest = hashlib.sha256()
    for path in (onnx_path, onnx_path.with_name(onnx_path.name + ".data")):
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class HostFacts:
    """What a plan is tied to: it runs only on this TensorRT version and this compute capability."""

    gpu_name: str
    compute_capability: str  # "9.0"
    tensorrt_version: str


def engine_cache_key(
    onnx_digest: str,
    precision: str,
    profiles: Sequence[Mapping[str, ShapeRange]],
    host: HostFacts,
    plugin_digest: str | None = None,
) -> str:
    """sha256 naming a plan: same graph, precision, profiles, GPU and TensorRT -> same key."""
    flags = precision_flags(precision, host.tensorrt_version)
    document = {
        "onnx": onnx_digest,
        "precision": precision,
        "flags": list(flags.builder_flags),
        "cleared_flags": list(flags.cleared_flags),
        "strongly_typed": flags.strongly_typed,
        "profiles": [{name: [list(s) for s in shapes] for name, shapes in sorted(p.items())} for p in profiles],
        "host": asdict(host),
        "plugin": plugin_digest,
    }
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def check_int8_graph(model) -> None:
    """int8 on TensorRT means explicit quantization: without Q/DQ nodes nothing would be int8."""
    ops = {node.op_type for node in model.graph.node}
    if not {"QuantizeLinear", "DequantizeLinear"} <= ops:
        raise KilnError(
            "precision 'int8' for TensorRT: expected a graph with QuantizeLinear/DequantizeLinear nodes "
            "(explicit quantization), got a graph without them"
        )


@dataclass(frozen=True)
class ParserProblem:
    node: str
    operator: str
    description: str


def parser_failure(onnx_path: Path, problems: Sequence[ParserProblem]) -> str:
    """One message listing every node the ONNX parser refused, by name and operator."""
    lines = [f"  node {p.node or '?'!r} ({p.operator or '?'}): {p.description}" for p in problems]
    return f"{onnx_path}: TensorRT's ONNX parser refused {len(problems)} node(s):\n" + "\n".join(lines)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise KilnError(NOT_INSTALLED) from None
    return tensorrt


def host_facts() -> HostFacts:
    """This machine's GPU and TensorRT; KilnError naming what is missing."""
    trt = import_tensorrt()
    try:
        import torch
    except ImportError:
        raise KilnError("building a TensorRT engine needs torch to find the GPU: pip install torch") from None
    if not torch.cuda.is_available():
        raise KilnError("TensorRT needs an NVIDIA GPU: torch.cuda sees none on this machine")
    major, minor = torch.cuda.get_device_capability()
    return HostFacts(torch.cuda.get_device_name(), f"{major}.{minor}", trt.__version__)


@dataclass
class BuildReport:
    plan: Path
    cache_key: str
    cache_hit: bool
    seconds: float
    host: HostFacts
    plugin_nodes: int
    tf32: bool

    def to_json(self) -> dict:
        """The manifest's `tensorrt` record: what the plan is tied to and how it was made."""
        return {"cache_key": self.cache_key, "cache_hit": self.cache_hit, "seconds": round(self.seconds, 3),
                "plugin_nodes": self.plugin_nodes, "tf32": self.tf32, **asdict(self.host)}


def timing_cache_name(host: HostFacts, flags: PrecisionFlags) -> str:
    """The timing cache file for this GPU, TensorRT and TF32 setting: its timings hold only for those."""
    gpu = "sm" + host.compute_capability.replace(".", "")
    return f"timing-{gpu}-trt{host.tensorrt_version}-{'tf32' if flags.tf32 else 'notf32'}.cache"


def plugin_ptx_for(model, plugin_ptx: bytes | None) -> bytes | None:
    """The PTX a build embeds: `plugin_ptx`, else the kernel compiled now when the graph has plugin nodes.

    Resolved before the cache key is computed, so an edited kernel makes a new key instead of reusing a plan.
    """
    if plugin_ptx is not None or not count_plugin_nodes(model):
        return plugin_ptx
    from plugins.tensorrt_plugin import default_ptx

    return default_ptx()


def count_plugin_nodes(model) -> int:
    from plugins.onnx_node import DOMAIN, OP_TYPE

    return sum(node.domain == DOMAIN and node.op_type == OP_TYPE for node in model.graph.node)


def build_plan(
    onnx_path: Path,
    out_path: Path,
    profiles: Sequence[Mapping[str, ShapeRange]],
    precision: str,
    timing_cache_path: Path | None,
    plugin_ptx: bytes | None = None,
) -> int:
    """Parse `onnx_path`, build a plan for `profiles` (one dict of input shapes each) and write it.

    The timing cache is read from and written back to `timing_cache_path`, so later builds on this GPU
    skip kernel timing. Returns the number of kiln attention nodes mapped to the plugin.
    """
    import onnx

    trt = import_tensorrt()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    flags = precision_flags(precision, trt.__version__)
    if precision == "int8":
        check_int8_graph(model)
    check_graph_precision(model, precision, flags)
    plugin_nodes = tag_plugin_nodes(model)
    if plugin_nodes or plugin_ptx is not None:
        # The parser looks the plugin up in the registry as it meets the node: register it first.
        # Registering needs the kernel's PTX (nvcc) only when the graph uses it.
        from plugins.tensorrt_plugin import register

        register(plugin_ptx)
    logger = _collecting_logger(trt)
    builder = trt.Builder(logger)
    network_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if flags.strongly_typed else 0
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    # `path` lets the parser find external weights next to the graph file.
    if not parser.parse(model.SerializeToString(), path=str(onnx_path)):
        problems = [_problem(parser.get_error(i)) for i in range(parser.num_errors)]
        raise KilnError(parser_failure(onnx_path, problems))
    config = builder.create_builder_config()
    for name in flags.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in flags.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    cache_bytes = Path(timing_cache_path).read_bytes() if timing_cache_path and Path(timing_cache_path).is_file() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    # A cache from another GPU or TensorRT is ignored rather than trusted.
    config.set_timing_cache(timing_cache, False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise KilnError(f"{onnx_path}: TensorRT could not build an engine: {logger.summary()}")
    _write_atomically(out_path, bytes(memoryview(plan)))
    if timing_cache_path:
        _write_atomically(Path(timing_cache_path), bytes(memoryview(config.get_timing_cache().serialize())))
    return plugin_nodes


def build_or_reuse_plan(
    onnx_path: Path,
    out_path: Path,
    profiles: Sequence[Mapping[str, ShapeRange]],
    precision: str,
    cache_dir: Path | None = None,
    plugin_ptx: bytes | None = None,
) -> BuildReport:
    """`build_plan` through the engine cache: a plan of the same key is copied instead of rebuilt.

    The key covers the PTX the plan embeds (the kernel is compiled first when `plugin_ptx` is None and the
    graph has plugin nodes); the timing cache is one file per GPU, TensorRT version and TF32 setting.
    """
    import onnx

    start = time.perf_counter()
    host = host_facts()
    flags = precision_flags(precision, host.tensorrt_version)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    model = onnx.load(str(onnx_path), load_external_data=False)
    plugin_ptx = plugin_ptx_for(model, plugin_ptx)
    plugin_digest = hashlib.sha256(plugin_ptx).hexdigest() if plugin_ptx is not None else None
    key = engine_cache_key(onnx_sha256(onnx_path), precision, profiles, host, plugin_digest)
    cached = cache_dir / f"{key}.plan"
    hit = cached.is_file()
    if not hit:
        cache_dir.mkdir(parents=True, exist_ok=True)
        build_plan(onnx_path, cached, profiles, precision, cache_dir / timing_cache_name(host, flags), plugin_ptx)
    shutil.copyfile(cached, out_path)
    seconds = time.perf_counter() - start
    return BuildReport(Path(out_path), key, hit, seconds, host, count_plugin_nodes(model), flags.tf32)


def default_cache_dir() -> Path:
    """tensorrt/ in the user's cache folder (KILN_CACHE_DIR overrides)."""
    return user_cache_dir() / "tensorrt"


def _problem(error) -> ParserProblem:
    # node_name / node_operator came with TensorRT 10; the node index is all older parsers give.
    node = error.node_name() if hasattr(error, "node_name") else f"#{error.node()}"
    operator = error.node_operator() if hasattr(error, "node_operator") else ""
    return ParserProblem(node, operator, error.desc())


def _collecting_logger(trt):
    """A trt.ILogger that keeps errors, so a failed build can say why instead of "returned None"."""

    class CollectingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, message):
            if severity in (trt.ILogger.ERROR, trt.ILogger.INTERNAL_ERROR):
                self.errors.append(message)

        def summary(self) -> str:
            return "; ".join(self.errors[-3:]) or "no error was logged"

    return CollectingLogger()


def _write_atomically(path: Path, data: bytes) -> None:
    # An interrupted write never looks like a finished plan (the cache trusts whatever is there).
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def build_engine_files(
    onnx_path: Path,
    engine_dir: Path,
    precision: str,
    profile: str | None = None,
    max_positions: int | None = None,
    cache_dir: Path | None = None,
    plugin_ptx: bytes | None = None,
) -> dict:
    """The tensorrt target's build step: `engine_dir/engine.plan` from the captured (optimized) ONNX.

    `profile` is the CLI's `batch=..,sequence=..,past=..` text. Returns the manifest fields to merge:
    the graph's entry (the plan, and the ONNX's dim names, which a plan forgets), `tensorrt` (what the
    plan is tied to and its cache key) and `profile` (each dim's [min, opt, max], which verification's
    inputs keep inside). The ONNX files are left for the caller to remove.
    """
    signature = onnx_signature(onnx_path)
    ranges = parse_profile(profile, max_positions)
    shapes = profile_shapes(signature, ranges)
    report = build_or_reuse_plan(onnx_path, Path(engine_dir) / PLAN_FILE, [shapes], precision, cache_dir, plugin_ptx)
    return {
        "graph": {"file": PLAN_FILE, "signature": signature.to_json()},
        "tensorrt": report.to_json(),
        "profile": ranges.to_json(),
    }
