"""llama.cpp's C++ ``llama-server``, built once from the llama.cpp that ``llama-cpp-python`` vendors: the bench's
reference LLM server.

``build_llama_server()`` returns the path of a ``llama-server`` binary built from ``vendor/llama.cpp`` inside the
``llama-cpp-python`` sdist (:data:`LLAMA_CPP_PYTHON_VERSION`, from PyPI, its sha256 checked against
:data:`SDIST_SHA256`) with cmake, Release, and exactly :data:`CMAKE_FLAGS`: the flags the Python binding is
built with (AVX2 + FMA + F16C, no AVX-512, no AMX, not ``-march=native``: a native build crashed on its first
completion on these VMs), so the C++ server and the binding run the same kernels. Only the ``llama-server``
target is built (``-j 2``: 44 minutes measured on two cores shared at a load average of 12 to 16; less on
idle cores). ``python -m infra.llama_server`` (``make
llama-server``) does the same from a shell and prints the binary's path.

Layout: ``.cache/llama-server/<version>/`` at the repository root (git-ignored) holds ``downloads/`` (the
sdist), ``src/`` (the extracted ``vendor/llama.cpp``), ``build/`` (cmake's tree; ``build/bin/llama-server``
and the shared libraries it loads through its build RPATH), ``build.log`` (the last build's output) and
``.complete`` (a JSON marker: version, sha256, flags, binary), written last.

Guarantees:
- Idempotent: a call that finds the marker, the same flags and an executable binary returns at once; nothing
  is downloaded or compiled twice. The sdist is kept once its sha256 matched and is checked again before use.
- A binary is returned only after a build that exited 0; concurrent callers serialise on a lock file.
- A download whose sha256 differs is deleted and never extracted; extraction refuses links and paths that
  leave ``src/`` (``tarfile``'s ``data`` filter).

What can go wrong (each an :class:`~infra.errors.InfraError` with a message for a person at a terminal):
no ``cmake``, C/C++ compiler or ``make`` (:class:`~infra.errors.ToolMissing` naming the apt packages), no route
to PyPI (retriable), a checksum mismatch, a cmake configure or build failure (the last lines of its output,
the full log in ``build.log``), a build that runs past :data:`BUILD_TIMEOUT_S`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from infra.errors import InfraError, ToolMissing

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
# What PyPI publishes for the sdist (https://pypi.org/simple/llama-cpp-python/, 76,589,250 bytes).
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    + SDIST_NAME
)
VENDOR_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
# Exactly the flags the Python binding is built with (same kernels on both sides of the comparison).
CMAKE_FLAGS = (
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
    "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
)  # fmt: skip
TARGET = "llama-server"
BUILD_JOBS = 2
BUILD_TIMEOUT_S = 3600.0
DOWNLOAD_TIMEOUT_S = 600.0
MARKER = ".complete"
CACHE_ROOT = Path(__file__).resolve().parents[1] / ".cache" / "llama-server"

CMAKE_HINT = "apt-get install cmake (Debian/Ubuntu), brew install cmake (macOS)"
COMPILER_HINT = "apt-get install build-essential (gcc, g++, make) (Debian/Ubuntu), xcode-select --install (macOS)"

__all__ = [
    "CMAKE_FLAGS",
    "LLAMA_CPP_PYTHON_VERSION",
    "SDIST_SHA256",
    "BuildPaths",
    "build_llama_server",
    "build_paths",
    "cached_binary",
    "check_build_tools",
    "sha256_file",
]


@dataclass(frozen=True)
class BuildPaths:
    """Where one version's download, sources, build tree, log and marker live."""

    home: Path

    @property
    def sdist(self) -> Path:
        return self.home / "downloads" / SDIST_NAME

    @property
    def src(self) -> Path:
        return self.home / "src"

    @property
    def build(self) -> Path:
        return self.home / "build"

    @property
    def binary(self) -> Path:
        return self.build / "bin" / TARGET

    @property
    def log(self) -> Path:
        return self.home / "build.log"

    @property
    def marker(self) -> Path:
        return self.home / MARKER


def build_paths(cache_dir: str | Path | None = None, version: str = LLAMA_CPP_PYTHON_VERSION) -> BuildPaths:
    """``<cache_dir>/<version>`` (``cache_dir`` defaults to ``.cache/llama-server`` at the repository root)."""
    return BuildPaths(Path(cache_dir if cache_dir is not None else CACHE_ROOT).expanduser() / version)


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def cached_binary(paths: BuildPaths) -> Path | None:
    """The binary when a finished build with today's flags is in the cache, else None."""
    try:
        marker = json.loads(paths.marker.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("sha256") != SDIST_SHA256:
        return None
    if marker.get("flags") != list(CMAKE_FLAGS):
        return None
    binary = paths.binary
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def check_build_tools() -> dict[str, str]:
    """The paths of cmake, a C and a C++ compiler and make.

    Raises:
        ToolMissing: one is not on PATH (the message names the apt packages to install).
    """
    found: dict[str, str] = {}
    wanted = (
        ("cmake", ("cmake",), CMAKE_HINT),
        ("C compiler", (os.environ.get("CC", ""), "cc", "gcc", "clang"), COMPILER_HINT),
        ("C++ compiler", (os.environ.get("CXX", ""), "c++", "g++", "clang++"), COMPILER_HINT),
        ("make", ("make", "gmake"), COMPILER_HINT),
    )
    for tool, names, hint in wanted:
        path = next((p for name in names if name and (p := shutil.which(name)) is not None), None)
        if path is None:
            raise ToolMissing(f"{tool} (to build llama.cpp's llama-server)", hint)
        found[tool] = path
    return found


def _download(paths: BuildPaths) -> Path:
    sdist = paths.sdist
    if sdist.is_file():
        if sha256_file(sdist) == SDIST_SHA256:
            return sdist
        log.warning("%s has the wrong sha256; downloading it again", sdist)
        sdist.unlink()
    sdist.parent.mkdir(parents=True, exist_ok=True)
    part = sdist.with_name(sdist.name + f".part-{os.getpid()}")
    log.info("downloading %s from PyPI", SDIST_NAME)
    try:
        with urllib.request.urlopen(SDIST_URL, timeout=DOWNLOAD_TIMEOUT_S) as resp, part.open("wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise InfraError(
            f"downloading {SDIST_URL} failed ({exc}): llama-server needs PyPI once", retriable=True
        ) from exc
    got = sha256_file(part)
    if got != SDIST_SHA256:
        part.unlink(missing_ok=True)
        raise InfraError(f"{SDIST_NAME} from PyPI has sha256 {got}, expected {SDIST_SHA256}: not using it")
    part.replace(sdist)
    return sdist


def _extract(sdist: Path, dest: Path) -> None:
    """``vendor/llama.cpp`` of the sdist into ``dest`` (replaced), prefix stripped; links and escapes refused."""
    shutil.rmtree(dest, ignore_errors=True)
    staging = dest.with_name(dest.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for member in tar.getmembers():
            if not member.name.startswith(VENDOR_PREFIX) or member.name == VENDOR_PREFIX:
                continue
            member.name = member.name[len(VENDOR_PREFIX) :]
            members.append(member)
        if not any(m.name == "CMakeLists.txt" for m in members):
            raise InfraError(f"{sdist} has no {VENDOR_PREFIX}CMakeLists.txt: not the llama-cpp-python sdist expected")
        tar.extractall(staging, members=members, filter="data")
    staging.rename(dest)


def _run_logged(cmd: list[str], cwd: Path, log_file: Path, what: str, timeout: float) -> None:
    with log_file.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        try:
            done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise InfraError(f"{what} ran past {timeout:.0f} s (log: {log_file})", retriable=True) from exc
    if done.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-40:])
        raise InfraError(f"{what} failed (exit {done.returncode}); full log: {log_file}\n{tail}")


def build_llama_server(cache_dir: str | Path | None = None) -> Path:
    """The path of a built ``llama-server``; downloads and builds it the first time (tens of minutes on 2 cores).

    Raises:
        ToolMissing: no cmake, compiler or make (only checked when a build is needed).
        InfraError: the download, its checksum, cmake's configure or build failed.
    """
    paths = build_paths(cache_dir)
    binary = cached_binary(paths)
    if binary is not None:
        return binary
    paths.home.mkdir(parents=True, exist_ok=True)
    with (paths.home / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        binary = cached_binary(paths)  # another process may have built it while we waited
        if binary is not None:
            return binary
        return _build_locked(paths)


def _build_locked(paths: BuildPaths) -> Path:
    check_build_tools()
    paths.marker.unlink(missing_ok=True)
    sdist = _download(paths)
    started = time.monotonic()
    _extract(sdist, paths.src)
    paths.log.write_text(f"llama-server from {SDIST_NAME} (sha256 {SDIST_SHA256})\n")
    configure = ["cmake", "-S", str(paths.src), "-B", str(paths.build), "-DCMAKE_BUILD_TYPE=Release", *CMAKE_FLAGS]
    log.info("configuring llama.cpp (%s)", " ".join(CMAKE_FLAGS))
    _run_logged(configure, paths.home, paths.log, "cmake configure of llama.cpp", BUILD_TIMEOUT_S)
    build = ["cmake", "--build", str(paths.build), "--config", "Release", "--target", TARGET, "-j", str(BUILD_JOBS)]
    log.info("building %s (tens of minutes on two cores; log: %s)", TARGET, paths.log)
    _run_logged(build, paths.home, paths.log, f"cmake --build --target {TARGET}", BUILD_TIMEOUT_S)
    if not (paths.binary.is_file() and os.access(paths.binary, os.X_OK)):
        raise InfraError(f"the build exited 0 but {paths.binary} is missing; see {paths.log}")
    seconds = time.monotonic() - started
    marker = {
        "version": LLAMA_CPP_PYTHON_VERSION,
        "sha256": SDIST_SHA256,
        "flags": list(CMAKE_FLAGS),
        "binary": str(paths.binary),
        "build_s": round(seconds, 1),
    }
    tmp = paths.marker.with_name(MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1))
    tmp.replace(paths.marker)
    log.info("built %s in %.0f s", paths.binary, seconds)
    return paths.binary


def main() -> int:
    """``python -m infra.llama_server``: build (or find) the binary and print its path; 1 with the reason."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        binary = build_llama_server()
    except InfraError as exc:
        sys.stderr.write(f"llama-server: {exc}\n")
        return 1
    sys.stdout.write(f"{binary}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
