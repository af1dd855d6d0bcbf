"""The wheelhouse an image's agent venv is installed from, offline and pinned.

Three sources, all pinned: edgefleet's own wheel, built from this checkout; llama.cpp,
compiled for a stated CPU baseline (never ``-march=native``, so an image built on one
machine runs on another) and cached by version and flags, because it takes about five
minutes on two cores; and every other package, downloaded from PyPI for the image's
Python and architecture (not the build machine's) under
``firmware-images/common/agent-constraints.txt``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Final

from fleet.errors import ImageRejected
from fleet.images.recipe import LlamaBuild, Recipe
from fleet.images.steps import StepRunner

__all__ = [
    "CONSTRAINTS",
    "LLAMA_PACKAGE",
    "build_wheelhouse",
    "llama_cmake_args",
    "llama_wheel_dir",
    "pinned_version",
    "resolved_pins",
    "target_platforms",
]

CONSTRAINTS: Final = "common/agent-constraints.txt"
LLAMA_PACKAGE: Final = "llama-cpp-python"
GLIBC: Final = "2_35"  # the oldest glibc of the bases (Ubuntu 22.04); Debian 12 has 2.36

_X86_64_V3 = "-march=x86-64-v3 -mtune=generic"
_CPU_BASELINES: Final = {
    # ggml's own switches for the same level, so its dispatch agrees with the compiler.
    LlamaBuild.X86_64_V3: (
        "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
        "-DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_LLAMAFILE=ON "
        f"-DCMAKE_C_FLAGS='{_X86_64_V3}' -DCMAKE_CXX_FLAGS='{_X86_64_V3}'"
    ),
}
_CPU_BASELINES[LlamaBuild.X86_64_V3_CUDA] = (
    _CPU_BASELINES[LlamaBuild.X86_64_V3] + " -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=75;86;89"
)


def llama_cmake_args(build: LlamaBuild) -> str:
    """The CMake arguments of llama.cpp for a build kind (SOURCE_CUDA: built on the device)."""
    if build is LlamaBuild.SOURCE_CUDA:
        # The Orin: sm_87, and its Cortex-A78AE cores (ARMv8.2 with dot products and FP16),
        # stated so that a build in a chroot or under QEMU does not tune to that machine.
        return (
            "-DGGML_NATIVE=OFF -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87 "
            "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"
        )
    return _CPU_BASELINES[build]


def pinned_version(constraints: str, package: str) -> str:
    """``package``'s version in a constraints file (name==version lines)."""
    for line in constraints.splitlines():
        name, sep, version = line.split("#", 1)[0].strip().partition("==")
        if sep and _canonical(name) == _canonical(package):
            return version.strip()
    raise ImageRejected(f"{CONSTRAINTS} does not pin {package}: add {package}==VERSION")


def target_platforms(arch: str) -> list[str]:
    """The ``pip --platform`` tags of wheels that run on the image: glibc 2.17 to 2.35.

    pip does not widen a given manylinux tag to the older ones it implies, so each is
    named, with the legacy aliases wheels still carry.
    """
    machine = {"amd64": "x86_64", "arm64": "aarch64"}[arch]
    newest = int(GLIBC.split("_")[1])
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(newest, 16, -1)]
    return [*tags, f"manylinux2014_{machine}", f"linux_{machine}"]


def llama_wheel_dir(cache: Path, version: str, build: LlamaBuild) -> Path:
    key = hashlib.sha256(f"{version}|{llama_cmake_args(build)}".encode()).hexdigest()[:12]
    return cache / "wheels" / f"{LLAMA_PACKAGE}-{version}-{build.value}-{key}"


def _llama_wheel(
    runner: StepRunner, pip: Path, cache: Path, version: str, build: LlamaBuild
) -> Path:
    """The cached llama.cpp wheel for ``build``, compiled first if there is none."""
    folder = llama_wheel_dir(cache, version, build)
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    if found:
        runner.note(f"llama.cpp {version} ({build.value}): cached {found[0].name}")
        return found[0]
    if build is LlamaBuild.X86_64_V3_CUDA and shutil.which("nvcc") is None:
        raise ImageRejected(
            f"llama.cpp for {build.value} is compiled with CUDA: put the CUDA 12.2 toolkit's "
            "nvcc on PATH (the image's 535 driver runs CUDA 12.2 code at most)"
        )
    runner.note(f"compiling llama.cpp {version} for {build.value} (about 5 minutes on 2 cores)")
    scratch = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    runner.run(
        [pip, "wheel", "--no-deps", "--no-cache-dir", "--progress-bar", "off", "-w", scratch,
         f"{LLAMA_PACKAGE}=={version}"],
        env={"CMAKE_ARGS": llama_cmake_args(build),
             "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)},
    )  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    scratch.rename(folder)
    return next(folder.glob("llama_cpp_python-*.whl"))


def build_wheelhouse(
    runner: StepRunner,
    recipe: Recipe,
    *,
    repo: Path,
    recipes: Path,
    cache: Path,
    pip: Path,
    dest: Path,
    epoch: int,
) -> str:
    """Fill ``dest`` with every wheel the agent venv needs; the requirement to install."""
    constraints_file = recipes / CONSTRAINTS
    constraints = constraints_file.read_text(encoding="utf-8")
    dest.mkdir(parents=True, exist_ok=True)
    env = {"SOURCE_DATE_EPOCH": str(epoch)}
    runner.run([pip, "wheel", "--no-deps", "--progress-bar", "off", "-w", dest, repo], env=env)
    version = pinned_version(constraints, LLAMA_PACKAGE)
    if recipe.agent.llama is LlamaBuild.SOURCE_CUDA:
        # Built on the device's own root (docs/operators.md): ship the source.
        runner.run([pip, "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "off",
                    "-d", dest, f"{LLAMA_PACKAGE}=={version}"])  # fmt: skip
    else:
        shutil.copy(_llama_wheel(runner, pip, cache, version, recipe.agent.llama), dest)
    requirement = f"edgefleet[{','.join(recipe.agent.extras)}]"
    # Resolve on this machine (same Python, pinned), then fetch each package's wheel for
    # the image's platform; pip cannot resolve for another platform with an sdist in play.
    report = dest / "resolved.json"
    runner.run(
        [pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--report", report,
         "-c", constraints_file, "--find-links", dest,
         requirement],
        env=env,
    )  # fmt: skip
    wanted = resolved_pins(report.read_text(encoding="utf-8"), skip={"edgefleet", LLAMA_PACKAGE})
    report.unlink()
    platform_args = [a for p in target_platforms(recipe.arch) for a in ("--platform", p)]
    runner.run(
        [pip, "download", "--no-deps", "--progress-bar", "off", "-d", dest,
         "--only-binary", ":all:", *platform_args, "--implementation", "cp",
         "--python-version", recipe.python, "--abi", f"cp{recipe.python.replace('.', '')}",
         "--abi", "abi3", "--abi", "none", *wanted],
    )  # fmt: skip
    return requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolved_pins(report: str, skip: set[str]) -> list[str]:
    """``name==version`` of each package in a ``pip install --report``, less ``skip``."""
    installs = json.loads(report)["install"]
    pins = {_canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installs}
    return [f"{n}=={v}" for n, v in sorted(pins.items()) if n not in {_canonical(s) for s in skip}]
