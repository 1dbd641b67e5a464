"""TensorRT adapter: a serialized plan behind the Predictor interface.

tensorrt and torch (whose CUDA tensors hold the device buffers and whose stream runs the engine) are
imported when an engine is opened, never by `import runtimes`. The binding plan, which says what shape
every tensor has for a given feed, is plain data and tested where neither is installed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from runtimes.decoder_lm import DERIVED_DIMS
from runtimes.errors import EngineError, FeedError
from runtimes.predictor import Predictor
from runtimes.signature import Dim, Signature, TensorSpec

# trt.DataType member name -> numpy dtype name; bf16 and fp8 IO have no numpy type to hand back.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64", "INT8": "int8",
              "UINT8": "uint8", "BOOL": "bool"}


@dataclass(frozen=True)
class EngineTensor:
    """One IO tensor as the engine reports it; -1 marks a dynamic axis."""

    name: str
    is_input: bool
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]
    profile_min: tuple[int, ...] | None = None  # inputs: the range of optimization profile 0
    profile_max: tuple[int, ...] | None = None


@dataclass(frozen=True)
class BindingPlan:
    """Shapes to bind for one call: inputs as fed, outputs resolved (-1 where only TensorRT knows)."""

    inputs: dict[str, tuple[int, ...]]
    outputs: dict[str, tuple[int, ...]]


def engine_signature(tensors: Sequence[EngineTensor], recorded: Signature | None) -> Signature:
    """The Predictor's signature: names and dtypes from the engine, dim names from the manifest.

    A plan forgets the ONNX dim names (its dynamic axes are -1), so `recorded` (the manifest's
    signature, from the ONNX graph) names them; axes neither knows get a name of their own.
    """
    specs = {t.name: t for t in tensors}
    named = {s.name: s for s in (recorded.inputs + recorded.outputs)} if recorded else {}
    if named and set(named) != set(specs):
        only_engine = sorted(set(specs) - set(named))
        only_manifest = sorted(set(named) - set(specs))
        raise EngineError(
            f"the plan's IO tensors differ from the manifest's signature (only in the plan: "
            f"{', '.join(only_engine) or 'none'}; only in the manifest: {', '.join(only_manifest) or 'none'})"
        )

    def spec(tensor: EngineTensor) -> TensorSpec:
        recorded_shape = named[tensor.name].shape if tensor.name in named else ()
        shape: list[Dim] = []
        for axis, size in enumerate(tensor.shape):
            if size >= 0:
                shape.append(size)
            elif axis < len(recorded_shape) and isinstance(recorded_shape[axis], str):
                shape.append(recorded_shape[axis])
            else:
                # Unique per axis: Signature.validate treats equal names as one shared dim.
                shape.append(f"{tensor.name}.{axis}")
        return TensorSpec(tensor.name, tensor.dtype, tuple(shape))

    return Signature(tuple(spec(t) for t in tensors if t.is_input), tuple(spec(t) for t in tensors if not t.is_input))


def plan_bindings(
    tensors: Sequence[EngineTensor], signature: Signature, feed_shapes: Mapping[str, tuple[int, ...]]
) -> BindingPlan:
    """Input shapes from the feeds, checked against the profile; output shapes from the symbolic dims.

    e.g. `past_key_values.0.key (2, 4, 7, 16)` and `input_ids (2, 1)` bind batch=2, past_sequence=7,
    sequence=1, so `present.0.key [batch, 4, total_sequence, 16]` is (2, 4, 8, 16).
    """
    bound: dict[str, int] = {}
    inputs = {}
    for tensor in tensors:
        if not tensor.is_input:
            continue
        if tensor.name not in feed_shapes:
            raise FeedError(f"missing input {tensor.name!r}")
        shape = tuple(int(s) for s in feed_shapes[tensor.name])
        _check_profile(tensor, shape)
        for dim, size in zip(signature.input(tensor.name).shape, shape):
            if isinstance(dim, str):
                bound.setdefault(dim, size)
        inputs[tensor.name] = shape
    for derived, (first, second) in DERIVED_DIMS.items():
        if derived not in bound and first in bound and second in bound:
            bound[derived] = bound[first] + bound[second]
    recorded = {spec.name: spec.shape for spec in signature.outputs}
    outputs = {}
    for tensor in tensors:
        if tensor.is_input:
            continue
        dims = recorded.get(tensor.name, ())
        outputs[tensor.name] = tuple(
            size if size >= 0 else bound.get(dims[axis], -1) if axis < len(dims) else -1
            for axis, size in enumerate(tensor.shape)
        )
    return BindingPlan(inputs, outputs)


def _check_profile(tensor: EngineTensor, shape: tuple[int, ...]) -> None:
    if len(shape) != len(tensor.shape):
        raise FeedError(f"input {tensor.name!r}: expected rank {len(tensor.shape)}, got rank {len(shape)} {list(shape)}")
    if tensor.profile_min is None or tensor.profile_max is None:
        return
    for axis, (size, low, high) in enumerate(zip(shape, tensor.profile_min, tensor.profile_max)):
        if not low <= size <= high:
            raise FeedError(
                f"input {tensor.name!r}: axis {axis} is {size}, outside the engine's optimization profile "
                f"{low}..{high} (rebuild with a wider --profile)"
            )


def check_host(built_on: Mapping | None, gpu_name: str, compute_capability: str, tensorrt_version: str) -> None:
    """A plan runs only with the TensorRT it was built by and on a GPU of the same compute capability."""
    if not built_on:
        return
    if built_on.get("tensorrt_version") not in (None, tensorrt_version):
        raise EngineError(
            f"the plan was built by TensorRT {built_on['tensorrt_version']}, this machine has {tensorrt_version}; "
            "rebuild the engine here"
        )
    if built_on.get("compute_capability") not in (None, compute_capability):
        raise EngineError(
            f"the plan was built for compute capability {built_on['compute_capability']} "
            f"({built_on.get('gpu_name', '?')}), this GPU ({gpu_name}) is {compute_capability}; rebuild the engine here"
        )


def _import_backends():
    """tensorrt and a CUDA-enabled torch, or EngineError naming what is missing."""
    try:
        import tensorrt
    except ImportError:
        raise EngineError("TensorRT engines need TensorRT: pip install tensorrt (it is not installed)") from None
    try:
        import torch
    except ImportError:
        raise EngineError("TensorRT engines use torch for CUDA memory and streams: pip install torch (not installed)") from None
    if not torch.cuda.is_available():
        raise EngineError("TensorRT engines need an NVIDIA GPU with CUDA: torch.cuda sees none on this machine")
    return tensorrt, torch


class DeviceBuffers:
    """One device allocation per IO tensor, grown when a call needs more and reused after.

    Preallocate, don't reallocate per step: the KV caches grow by one position each decode step.
    """

    def __init__(self, torch, device):
        self._torch = torch
        self._device = device
        self._bytes: dict[str, object] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: str):
        torch = self._torch
        torch_dtype = getattr(torch, dtype)
        nbytes = prod(shape) * torch_dtype.itemsize
        buffer = self._bytes.get(name)
        if buffer is None or buffer.numel() < nbytes:
            # Doubling keeps reallocations to log(steps); a non-empty buffer keeps empty tensors' address non-null.
            size = max(nbytes, 2 * (buffer.numel() if buffer is not None else 0), 256)
            buffer = self._bytes[name] = torch.empty(size, dtype=torch.uint8, device=self._device)
        return buffer[:nbytes].view(torch_dtype).view(shape)


class TensorRTPredictor(Predictor):
    native_code = "a TensorRT plan (deserialized kernels and plugins)"

    def __init__(self, plan_path: Path, recorded_signature: Signature | None = None, device: str = "cuda",
                 built_on: Mapping | None = None):
        if not str(device).startswith("cuda"):
            raise EngineError(f"TensorRT engines run on an NVIDIA GPU: expected device 'cuda' or 'cuda:N', got {device!r}")
        trt, torch = _import_backends()
        self._torch = torch
        self._device = torch.device(device)
        major, minor = torch.cuda.get_device_capability(self._device)
        check_host(built_on, torch.cuda.get_device_name(self._device), f"{major}.{minor}", trt.__version__)
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(self._device):
            self._engine = trt.Runtime(self._logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
            if self._engine is None:
                raise EngineError(f"{plan_path}: TensorRT could not deserialize the plan (see its log above)")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(self._device)
        self._tensors = [_engine_tensor(trt, self._engine, i) for i in range(self._engine.num_io_tensors)]
        self.signature = engine_signature(self._tensors, recorded_signature)
        self._buffers = DeviceBuffers(torch, self._device)
        # One execution context and one set of buffers: calls from several threads take turns.
        self._lock = threading.Lock()

    @classmethod
    def from_engine_dir(cls, engine_dir: Path, manifest: dict, graph: dict, device: str = "cuda",
                        **options) -> TensorRTPredictor:
        if options:
            raise EngineError(f"TensorRT engines take no load options; got {', '.join(sorted(options))}")
        recorded = Signature.from_json(graph["signature"]) if graph.get("signature") else None
        try:
            return cls(engine_dir / graph["file"], recorded, device, manifest.get("tensorrt"))
        except EngineError as e:
            raise EngineError(f"{engine_dir}: engine target {manifest['target']!r}: {e}") from None

    def forward(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        plan = plan_bindings(self._tensors, self.signature, {n: a.shape for n, a in feeds.items()})
        dtypes = {t.name: t.dtype for t in self._tensors}
        with self._lock, torch.cuda.device(self._device), torch.cuda.stream(self._stream):
            for name, shape in plan.inputs.items():
                buffer = self._buffers.view(name, shape, dtypes[name])
                buffer.copy_(torch.from_numpy(np.ascontiguousarray(feeds[name])))
                if not self._context.set_input_shape(name, shape):
                    raise FeedError(f"input {name!r}: TensorRT refused shape {list(shape)} (see its log above)")
                self._context.set_tensor_address(name, buffer.data_ptr())
            outputs = {}
            for name, planned in plan.outputs.items():
                shape = tuple(self._context.get_tensor_shape(name))
                if any(p not in (-1, s) for p, s in zip(planned, shape)):
                    raise EngineError(f"output {name!r}: TensorRT says shape {list(shape)}, the signature {list(planned)}")
                outputs[name] = self._buffers.view(name, shape, dtypes[name])
                self._context.set_tensor_address(name, outputs[name].data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT failed to enqueue the engine (see its log above)")
            self._stream.synchronize()
            # .cpu() copies: the device buffers are reused by the next call.
            return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def close(self) -> None:
        self._context = self._engine = self._buffers = None


def _engine_tensor(trt, engine, index: int) -> EngineTensor:
    name = engine.get_tensor_name(index)
    is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
    dtype_name = engine.get_tensor_dtype(name).name
    if dtype_name not in TRT_DTYPES:
        raise EngineError(f"IO tensor {name!r} is {dtype_name}, which numpy cannot hold (expected one of {', '.join(TRT_DTYPES)})")
    low = high = None
    if is_input:
        low, _, high = (tuple(s) for s in engine.get_tensor_profile_shape(name, 0))
    return EngineTensor(name, is_input, TRT_DTYPES[dtype_name], tuple(engine.get_tensor_shape(name)), low, high)
