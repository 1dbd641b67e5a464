"""ONNX Runtime adapter: an InferenceSession behind the Predictor interface.

GPU providers are checked twice: listed by `get_available_providers` before the session, and active in
the session after it, since onnxruntime-gpu whose CUDA libraries fail to load only logs and runs on the CPU.
"""
from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from plugins.cache import user_cache_dir
from runtimes.errors import EngineError
from runtimes.huge_pages import anonymous_ranges, collapse_new
from runtimes.predictor import Predictor
from runtimes.signature import Signature, TensorSpec

_ORT_DTYPES = {"tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(float)": "float32",
               "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16", "tensor(bool)": "bool"}

CPU_PROVIDER = "CPUExecutionProvider"  # the fallback every provider list ends with; never checked as active
# Providers whose CUDA and cuDNN libraries onnxruntime.preload_dlls loads from the nvidia-* wheels (`make cuda`).
CUDA_LIBRARY_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
# The library each GPU provider is loaded from (onnxruntime/capi/): loading it names what it lacks.
PROVIDER_LIBRARIES = {
    "CUDAExecutionProvider": "libonnxruntime_providers_cuda.so",
    "TensorrtExecutionProvider": "libonnxruntime_providers_tensorrt.so",
    "MIGraphXExecutionProvider": "libonnxruntime_providers_migraphx.so",
}
# Cache switches in the manifest's provider options -> the option naming the folder, which is this machine's.
CACHE_FOLDER_OPTIONS = {"trt_engine_cache_enable": "trt_engine_cache_path",
                        "trt_timing_cache_enable": "trt_timing_cache_path"}
# The provider options a manifest may carry (those kiln.backends.onnxruntime records). Others are refused: some
# name libraries or folders to load from (trt_engine_decryption_lib_path), which would run code the engine's
# trust gate never saw; folders are set here, for this machine.
RECORDED_OPTIONS = frozenset({"use_tf32", "trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes",
                              "trt_engine_cache_enable", "trt_timing_cache_enable"})
# Providers with no per-session TF32 switch: NVIDIA_TF32_OVERRIDE=0 (read by the CUDA libraries) turns it off.
TF32_BY_ENVIRONMENT = ("TensorrtExecutionProvider",)

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class OnnxRuntimePredictor(Predictor):
    def __init__(
        self,
        model_path: Path,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        optimization_level: str = "all",
        allow_spinning: bool = True,
        provider_options: Mapping[str, Mapping[str, str]] | None = None,
        log_severity: int | None = None,
        huge_pages: bool = True,
    ):
        """`provider_options`: provider name -> its options (`{"CUDAExecutionProvider": {"device_id": "1"}}`).
        `huge_pages`: a CPU session's weights collapsed into huge pages after load (runtimes/huge_pages.py)."""
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise EngineError(
                f"ONNX Runtime here lacks {', '.join(missing)} (available: {', '.join(ort.get_available_providers())})"
            )
        if any(p in CUDA_LIBRARY_PROVIDERS for p in providers):
            _preload_cuda_libraries()
        options = ort.SessionOptions()
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization_level]
        if threads:
            options.intra_op_num_threads = threads
        if log_severity is not None:  # 0 verbose .. 3 errors only
            options.log_severity_level = log_severity
        if not allow_spinning:  # idle pools then sleep instead of stealing cores from other work
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        provider_options = provider_options or {}
        before = anonymous_ranges() if huge_pages and list(providers) == [CPU_PROVIDER] else None
        self.session = ort.InferenceSession(
            str(model_path), options, providers=[(p, dict(provider_options.get(p, {}))) for p in providers]
        )
        self.huge_page_bytes = collapse_new(before) if before is not None else 0
        active = self.session.get_providers()
        for provider in providers:
            if provider != CPU_PROVIDER and provider not in active:
                raise EngineError(f"ONNX Runtime did not start {provider} (the session would run on "
                                  f"{', '.join(active)}): {provider_load_problem(provider)}")
        self.signature = Signature(
            tuple(_spec(v) for v in self.session.get_inputs()), tuple(_spec(v) for v in self.session.get_outputs())
        )
        self._output_names = [t.name for t in self.signature.outputs]

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, manifest: dict, graph: dict, device: str = "cpu",
                        **options) -> OnnxRuntimePredictor:
        """`graph` is the manifest's entry for one graph: its file and signature. `device` "cuda:N" picks GPU N."""
        providers = options.pop("providers", None) or manifest.get("providers") or [CPU_PROVIDER]
        model_path = engine_dir / graph["file"]
        refuse_escaping_external_data(model_path, engine_dir)
        if manifest.get("tf32") is False and any(p in TF32_BY_ENVIRONMENT for p in providers):
            # Read when the CUDA libraries start: effective for the first GPU session of the process.
            os.environ.setdefault("NVIDIA_TF32_OVERRIDE", "0")
        if manifest.get("logits_to_keep"):
            # Its input has a default (an initializer), as intended; ONNX Runtime warns about that on every load.
            options.setdefault("log_severity", 3)
        try:
            predictor = cls(model_path, providers=providers,
                            provider_options=session_provider_options(manifest, providers, device), **options)
        except EngineError as e:
            raise EngineError(f"{engine_dir}: engine target {manifest['target']!r}: {e}") from None
        predictor.shape_buckets = bool(manifest.get("shape_buckets"))
        return predictor

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._output_names, self.session.run(self._output_names, dict(feeds))))

    def shared_cache(self, batch: int, capacity: int, keeps_logits: bool = False,
                     buffers: dict[str, np.ndarray] | None = None, mask: np.ndarray | None = None):
        """Decode steps with past and present bound to one buffer (runtimes/shared_cache.py), for graphs whose
        attention writes in place; the caller knows that (cache layout SLOT). Host buffers: CPU sessions only,
        None on the others, which then carry their caches."""
        if self.session.get_providers() != [CPU_PROVIDER]:
            return None
        from runtimes.shared_cache import SharedCache

        return SharedCache(self.session, self.signature, batch, capacity, keeps_logits, buffers, mask)


def session_provider_options(manifest: dict, providers: Sequence[str], device: str) -> dict[str, dict[str, str]]:
    """The manifest's provider options (profiles, TF32) plus this machine's: the GPU of `device` ("cuda:1")
    and cache folders, in the user's cache folder under the engine's digest (never the engine directory,
    whose files are exactly those its manifest lists)."""
    recorded = manifest.get("provider_options", {})
    _, _, index = str(device).partition(":")
    result = {}
    for provider in providers:
        options = {k: str(v) for k, v in recorded.get(provider, {}).items()}
        unknown = sorted(set(options) - RECORDED_OPTIONS)
        if unknown:
            raise EngineError(f"manifest field 'provider_options' sets {', '.join(unknown)} for {provider}: expected "
                              f"only {', '.join(sorted(RECORDED_OPTIONS))}; refusing the engine")
        if provider != CPU_PROVIDER and index:
            options["device_id"] = index
        for switch, folder_option in CACHE_FOLDER_OPTIONS.items():
            if options.get(switch) == "1":
                options[folder_option] = str(engine_cache_folder(manifest))
        result[provider] = options
    return result


def engine_cache_folder(manifest: dict) -> Path:
    """Where a provider keeps what it builds for this engine (TensorRT engines and timings), per onnxruntime
    version; the provider names its files by GPU (`..._sm90.engine`)."""
    folder = user_cache_dir() / "onnxruntime" / f"{manifest['manifest_sha256'][:16]}-ort{ort.__version__}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@functools.cache
def _preload_cuda_libraries() -> None:
    # onnxruntime-gpu finds the CUDA and cuDNN of the nvidia-* wheels (its [cuda,cudnn] extras) only when
    # told to; preload_dlls skips what a CUDA torch already loaded. Older onnxruntime has no such function.
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        preload()


def provider_load_problem(provider: str, library_dir: Path | None = None) -> str:
    """Why `provider` did not start, as far as loading its library tells (e.g. the CUDA library it needs)."""
    library = PROVIDER_LIBRARIES.get(provider)
    if library is None:
        return "see ONNX Runtime's log above"
    folder = Path(library_dir) if library_dir is not None else Path(ort.__file__).parent / "capi"
    path = folder / library
    if not path.is_file():
        return (f"its library {library} is not in this onnxruntime {ort.__version__} ({folder}): install the "
                "build of onnxruntime that has the provider (`make cuda` or `make rocm`)")
    shared = folder / "libonnxruntime_providers_shared.so"
    try:
        if shared.is_file():
            ctypes.CDLL(str(shared), mode=ctypes.RTLD_GLOBAL)  # what onnxruntime loads before any provider
        ctypes.CDLL(str(path))
    except OSError as error:
        return f"{library} does not load: {error}"
    return f"{library} loads; ONNX Runtime's log above says why the provider did not start"


def _spec(value) -> TensorSpec:
    shape = tuple(d if isinstance(d, (int, str)) else "?" for d in value.shape)
    return TensorSpec(value.name, _ORT_DTYPES.get(value.type, value.type), shape)


def refuse_escaping_external_data(model_path: Path, engine_dir: Path) -> None:
    """ONNX Runtime opens external-data paths as written: refuse any that leave the engine directory."""
    import onnx

    root = engine_dir.resolve()
    graph = onnx.load(model_path, load_external_data=False).graph
    for tensor in graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not (model_path.parent / location).resolve().is_relative_to(root):
            raise EngineError(
                f"{model_path}: tensor {tensor.name!r} reads external data from {location!r}, outside the engine directory"
            )
