"""Compile the attention kernel for a target (cuda, rocm, cpu) and cache the outputs by source hash.

    python -m plugins.build cuda                 # sm_80 and sm_90 cubin, compute_80 PTX (nvcc)
    python -m plugins.build rocm --arch gfx90a   # HIP code object (hipcc)
    python -m plugins.build cpu                  # CPU reference as a plain shared library (c++)

Outputs land in plugins/<target>-<hash>/ of the user's cache folder (plugins.cache; KILN_CACHE_DIR
overrides), where the hash covers the sources, the compiler command and the compiler's version: a
rebuild happens exactly when one of them changes.
"""

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from plugins.cache import user_cache_dir
from plugins.errors import PluginBuildError

SOURCE_DIR = Path(__file__).resolve().parent / "attention"
KERNEL_SOURCE = SOURCE_DIR / "causal_attention.cu"
KERNEL_SOURCES = (KERNEL_SOURCE, SOURCE_DIR / "compat.h")
CPU_SOURCES = (SOURCE_DIR / "attention_cpu.cpp", SOURCE_DIR / "attention_cpu.h")

TARGETS = ("cuda", "rocm", "cpu")
DEFAULT_ARCHS = {"cuda": ("sm_80", "sm_90", "compute_80"), "rocm": ("gfx90a",), "cpu": (platform.machine(),)}
INSTALL_HINTS = {
    "nvcc": "install the CUDA toolkit so that nvcc is on PATH",
    "hipcc": "install it with `apt-get install hipcc libamdhip64-dev` (Debian) or from ROCm",
    "c++": "install a C++ compiler (g++ or clang++) or point CXX at one",
}


@dataclass(frozen=True)
class BuiltLibrary:
    """One compiled plugin binary, as the engine manifest lists it."""

    path: Path
    target: str  # "cuda" | "rocm" | "cpu"
    arch: str  # "sm_90", "compute_80" (PTX), "gfx90a", or the CPU machine ("x86_64")
    sha256: str


def default_build_dir() -> Path:
    """plugins/ in the user's cache folder."""
    return user_cache_dir() / "plugins"


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_hash(paths, *extra: str) -> str:
    """A short hash of the files' names and contents plus any extra strings (flags, versions)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()[:16]


def build(target: str, archs=None, build_dir=None) -> list[BuiltLibrary]:
    """Compile the attention plugin for `target` and each of `archs` (defaults: DEFAULT_ARCHS[target]).

    Returns one BuiltLibrary per arch; cached outputs are returned without running a compiler.
    Raises PluginBuildError when the compiler is missing or fails.
    """
    if target not in TARGETS:
        raise PluginBuildError(f"unknown plugin target {target!r}: expected one of {', '.join(TARGETS)}")
    build_dir = Path(build_dir) if build_dir else default_build_dir()
    return [_build_one(target, arch, build_dir) for arch in (archs or DEFAULT_ARCHS[target])]


def _compile_plan(target: str, arch: str):
    """(compiler, flags, sources, output file name, extra environment) for one target and arch."""
    if target == "cuda":
        match = re.fullmatch(r"(sm|compute)_(\d+[af]?)", arch)
        if not match:
            raise PluginBuildError(f"nvcc arch {arch!r} for {KERNEL_SOURCE.name}: expected sm_XX (cubin) or compute_XX (PTX)")
        kind = "-cubin" if match.group(1) == "sm" else "-ptx"
        suffix = "cubin" if kind == "-cubin" else "ptx"
        return "nvcc", [kind, f"-arch={arch}", "-O3"], KERNEL_SOURCES, f"causal_attention.{arch}.{suffix}", {}
    if target == "rocm":
        if not re.fullmatch(r"gfx[0-9a-f]+", arch):
            raise PluginBuildError(f"hipcc arch {arch!r} for {KERNEL_SOURCE.name}: expected a gfx name such as gfx90a")
        # Debian's hipcc picks the NVIDIA platform when nvcc is installed, and needs an explicit arch.
        flags = ["--genco", f"--offload-arch={arch}", "-O3"]
        return "hipcc", flags, KERNEL_SOURCES, f"causal_attention.{arch}.hsaco", {"HIP_PLATFORM": "amd"}
    if arch != platform.machine():
        raise PluginBuildError(f"the cpu target builds for this machine ({platform.machine()}), not {arch!r}")
    compiler = os.environ.get("CXX", "c++")
    return compiler, ["-O2", "-std=c++17", "-shared", "-fPIC"], CPU_SOURCES, "libkiln_attention_cpu.so", {}


def _build_one(target: str, arch: str, build_dir: Path) -> BuiltLibrary:
    compiler, flags, sources, output_name, extra_env = _compile_plan(target, arch)
    main_source = sources[0]
    if shutil.which(compiler) is None:
        hint = INSTALL_HINTS.get(Path(compiler).name, "install it or fix PATH")
        raise PluginBuildError(
            f"{compiler} not found on PATH: it is needed to build {main_source.name} for {target} ({arch}); {hint}"
        )
    env = {**os.environ, **extra_env}
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, env=env).stdout
    out_dir = build_dir / f"{target}-{source_hash(sources, compiler, *flags, version)}"
    output = out_dir / output_name
    if not output.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        # Compile to a temporary name and rename: an interrupted build never looks like a cached one.
        partial = out_dir / f".{output_name}.{os.getpid()}.partial"
        command = [compiler, *flags, "-o", str(partial), str(main_source)]
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0 or not partial.exists():
            partial.unlink(missing_ok=True)
            log = (result.stderr or result.stdout).strip()[-4000:]
            raise PluginBuildError(
                f"{compiler} failed (exit {result.returncode}) building {main_source} for {target} ({arch}); "
                f"expected {output_name}.\ncommand: {' '.join(command)}\n{log}"
            )
        os.replace(partial, output)
    return BuiltLibrary(path=output, target=target, arch=arch, sha256=file_sha256(output))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugins.build", description="Build the kiln attention plugin.")
    parser.add_argument("target", choices=TARGETS)
    parser.add_argument("--arch", action="append", help="arch to build (repeatable); default: %(default)s per target")
    parser.add_argument("--build-dir", type=Path, default=None, help="cache folder (default: plugins/ in the user cache)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        libraries = build(args.target, args.arch, args.build_dir)
    except PluginBuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for library in libraries:
        print(f"{library.target:5} {library.arch:11} sha256:{library.sha256[:16]}  {library.path}")
    print(f"{len(libraries)} plugin binaries ready in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
