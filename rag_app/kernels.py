"""Native kernels of the fast CPU decoder, compiled on first use for this machine.

`rag_app/csrc/fast_decoder.cpp` runs one decoding step through every layer of a Llama
network, with single-query attention over a float16 key/value cache (AVX-512). It is
built with PyTorch's own extension builder (`torch.utils.cpp_extension`, ninja and the
system's C++ compiler, `-march=native`) into `llm.cache_dir`, once per source, torch
version and CPU; later starts only load the built library (well under a second). The
first build takes a few seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "fast_decoder.cpp"
LIBRARY = "rag_app_fast_decoder"
MAX_GROUP = 8  # query heads per key/value head the kernel is built for


class KernelUnavailable(RuntimeError):
    """The native kernel cannot be built or run here; the message says why."""


def _loaded() -> Any | None:
    """`torch.ops.rag_app` once this process has loaded the library."""
    try:
        torch.ops.rag_app.decode_layers  # noqa: B018 -- raises until registered
    except (AttributeError, RuntimeError):
        return None
    return torch.ops.rag_app


def _ninja_on_path() -> None:
    """torch's builder runs `ninja`; the `ninja` package puts it beside the interpreter, which
    is not on PATH when the venv is not activated."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        bin_dir = os.path.dirname(sys.executable)
    if shutil.which("ninja") is None:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def native_ops(cache_dir: Path) -> Any:
    """`torch.ops.rag_app` (`decode_layers`, `decode_attention`, `prefill_attention`), built
    into `cache_dir` if needed.

    Raises KernelUnavailable when this CPU lacks AVX-512 or nothing can compile it."""
    op = _loaded()
    if op is not None:
        return op
    if platform.machine() not in ("x86_64", "AMD64") or \
            torch.backends.cpu.get_cpu_capability() != "AVX512":
        raise KernelUnavailable(
            f"the native decoder kernels need an x86-64 CPU with AVX-512 (this one: "
            f"{platform.machine()}, {torch.backends.cpu.get_cpu_capability()})")
    build = build_folder(cache_dir)
    try:
        build.mkdir(parents=True, exist_ok=True)
        with _build_lock(build):
            _load_or_build(build)
    except (OSError, RuntimeError, ImportError, subprocess.SubprocessError) as e:
        # no compiler or ninja, a compiler that fails, a build error, a read-only cache
        raise KernelUnavailable(f"the native decoder kernels did not build in {build}: "
                                f"{_first_error(str(e))}") from e
    op = _loaded()
    if op is None:
        raise KernelUnavailable(f"the library built in {build} did not register its kernels")
    return op


def build_folder(cache_dir: Path) -> Path:
    """One folder per source, torch install, environment, compiler and CPU (-march=native)."""
    parts = [torch.__version__, str(Path(torch.__file__).parent), sys.prefix,
             os.environ.get("CXX", "c++"), _cpu_model()]
    key = hashlib.sha256(SOURCE.read_bytes() + "\0".join(parts).encode())
    return Path(cache_dir) / "kernels" / key.hexdigest()[:16]


@contextmanager
def _build_lock(build: Path) -> Iterator[None]:
    """One builder at a time per folder, with a lock the OS drops if its holder dies (torch's
    own lock file would stay behind a killed build and make every later start wait)."""
    lock = None
    try:
        import fcntl

        lock = (build / ".lock").open("a")
        fcntl.flock(lock, fcntl.LOCK_EX)
    except (ImportError, OSError):  # no flock here, or a read-only folder: nobody builds
        pass
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


def _load_or_build(build: Path) -> None:
    library = build / f"{LIBRARY}.so"
    if library.is_file():
        try:
            torch.ops.load_library(str(library))  # built before: no compiler, no ninja
            return
        except OSError:  # cut short by a killed build: build it again
            library.unlink()
    (build / "lock").unlink(missing_ok=True)  # torch's lock, left by a killed build
    log.info("building the fast decoder's native kernels into %s (once, a few seconds)", build)
    _ninja_on_path()
    from torch.utils import cpp_extension

    cpp_extension.load(name=LIBRARY, sources=[str(SOURCE)],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(build),
                       is_python_module=False, verbose=False)


def _first_error(output: str) -> str:
    """The compiler's first error line, else the last line of what the builder said."""
    lines = [line.strip() for line in output.splitlines() if line.strip()] or ["unknown error"]
    return next((line for line in lines if "error:" in line), lines[-1])


def _cpu_model() -> str:
    """Built with -march=native: a cache folder shared between machines must not mix CPUs."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(line for line in lines if line.startswith(("model name", "flags")))
