"""Shared fixtures: tiny engines built once per session; hardware markers skipped with the reason."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from exporter.presets import PRESETS

# One random-weight tiny decoder preset per family: what every family's conversion test runs on.
TINY_PRESETS = [name for name, preset in PRESETS.items()
                if name.startswith("tiny-") and not preset.trained and preset.kind == "decoder-lm"]


def _missing_hardware() -> dict[str, str | None]:
    """Marker -> why its tests cannot run here (None when they can)."""
    has_nvidia = shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()
    return {
        "gpu": None if has_nvidia else "needs an NVIDIA GPU (no nvidia-smi / /dev/nvidiactl on this machine)",
        "tensorrt": None if importlib.util.find_spec("tensorrt") else "needs TensorRT (the `tensorrt` package is not installed)",
        "rocm": None if Path("/dev/kfd").exists() else "needs an AMD GPU with ROCm (no /dev/kfd on this machine)",
    }


def pytest_collection_modifyitems(config, items):
    missing = _missing_hardware()
    for item in items:
        for marker, reason in missing.items():
            if reason and item.get_closest_marker(marker):
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory, worker_id) -> Path:
    """A folder every pytest-xdist worker of this run shares (the run's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if worker_id != "master" else base


def build_once(path: Path, build) -> Path:
    """`build(staging)` fills a folder that is then renamed to `path`, once for all workers of the run."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            staging = path.with_name(path.name + ".staging")
            shutil.rmtree(staging, ignore_errors=True)
            build(staging)
            staging.rename(path)
    return path


@pytest.fixture(scope="session")
def engine_dir(shared_dir):
    """`engine_dir(preset)` -> a verified cpu/fp32 engine of that preset, converted once per run."""
    import kiln

    return lambda preset: build_once(shared_dir / "engines" / preset, lambda out: kiln.convert(preset, output=out))


@pytest.fixture(scope="session")
def sd_engine(shared_dir):
    """A verified cpu/fp32 engine of the tiny-sd diffusion pipeline, converted once per run (about 40 s of CPU)."""
    import kiln

    return build_once(shared_dir / "engines" / "tiny-sd", lambda out: kiln.convert("tiny-sd", output=out))


@pytest.fixture(scope="session")
def sd_source():
    """The tiny-sd diffusers pipeline the engine was built from (the reference), loaded once."""
    from exporter import load_model

    return load_model("tiny-sd")


@pytest.fixture(scope="session")
def aoti_engine(shared_dir):
    """A verified aoti-cpu engine of tiny-gpt2, converted once per run."""
    import kiln

    return build_once(shared_dir / "aoti" / "tiny-gpt2", lambda out: kiln.convert("tiny-gpt2", target="aoti-cpu", output=out))


@pytest.fixture(scope="session")
def reference():
    """`reference(engine)` -> the PyTorch eager Predictor of that engine's source, loaded once."""
    import kiln

    loaded = {}

    def get(engine: Path):
        if engine not in loaded:
            loaded[engine] = kiln.load_reference(engine)
        return loaded[engine]

    return get


@pytest.fixture(scope="session")
def torch_op():
    """kiln::causal_attention, built once per session (cached across sessions in the user cache folder)."""
    from plugins import load_torch_op

    return load_torch_op()
