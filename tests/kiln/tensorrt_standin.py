"""A stand-in for the `tensorrt` module's builder API (TensorRT cannot be installed here): it records what
kiln's builder asks of it (network flags, builder flags set and cleared, profiles, timing cache) and returns
a fake plan. Only what `kiln.tensorrt_build.build_plan` calls is there; a member TensorRT 11 removed is
absent from an 11.x stand-in, so using it fails as it would there."""
from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field


@dataclass
class BuildRecord:
    network_flags: int = 0
    flags_set: list[str] = field(default_factory=list)
    flags_cleared: list[str] = field(default_factory=list)
    profiles: list[dict] = field(default_factory=list)
    timing_cache_in: bytes = b""


def stand_in_tensorrt(monkeypatch, version: str = "10.13.0.35") -> types.ModuleType:
    """Install the stand-in as `tensorrt` for this test; `module.builds` lists a BuildRecord per build."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.builds = []
    weak_typing = ("FP16", "BF16", "INT8") if int(version.split(".")[0]) < 11 else ()
    trt.BuilderFlag = types.SimpleNamespace(**{name: name for name in weak_typing + ("TF32",)})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=5)

    class ILogger:
        ERROR, INTERNAL_ERROR, WARNING = "error", "internal error", "warning"

        def __init__(self):
            pass

    class TimingCache:
        def __init__(self, data: bytes):
            self.data = data

        def serialize(self):
            return self.data + b"+timings"

    class Config:
        def __init__(self, record: BuildRecord):
            self.record = record
            self.cache = None

        def set_flag(self, flag):
            self.record.flags_set.append(flag)

        def clear_flag(self, flag):
            self.record.flags_cleared.append(flag)

        def add_optimization_profile(self, profile):
            self.record.profiles.append(profile.shapes)

        def create_timing_cache(self, data: bytes):
            self.record.timing_cache_in = data
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch: bool):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, low, opt, high):
            self.shapes[name] = (tuple(low), tuple(opt), tuple(high))

    class Builder:
        def __init__(self, logger):
            self.record = BuildRecord()
            trt.builds.append(self.record)

        def create_network(self, flags: int = 0):
            self.record.network_flags = flags
            return object()

        def create_builder_config(self):
            return Config(self.record)

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            return b"stand-in plan"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse(self, data: bytes, path: str = "") -> bool:
            return True

    trt.ILogger, trt.Builder, trt.OnnxParser = ILogger, Builder, OnnxParser
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt
