"""Optional compiled CPU kernels for the scSE block with max-out aggregation.

PyTorch has no fused form of the scSE block, and on CPU its elementwise ops make one pass over the full-size map
per op. ``scse_monai/csrc/scse_cpu.cpp`` computes the block's statistics in one pass, the max-out in one pass,
and its backward in one pass plus an in-cache revisit (see the file's header). The blocks use these kernels when
they are built; otherwise they take their pure-PyTorch path, with the same results up to rounding.

The kernels are compiled on this machine by ``torch.utils.cpp_extension`` (a C++ compiler is needed), once per
source and torch version, into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by default
``~/.cache/torch_extensions``), like MONAI's own optional extensions. Nothing is compiled behind the user's back:
the environment variable ``SCSE_MONAI_CPU_KERNELS`` chooses

- ``auto`` (default): use the kernels if they are already built, else the PyTorch path;
- ``build``: as ``auto``, but build them on first use if they are missing (takes about 20 s);
- ``off`` (or ``0``): never use them.

Command line::

    python -m scse_monai.cpu_kernels build    # compile (if needed), check against the PyTorch path
    python -m scse_monai.cpu_kernels status   # mode, library path, built or not

``make setup`` runs ``build``; if no compiler is found it says so and the package works without the kernels.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["ENV_VAR", "available", "build", "library_path", "mode", "self_check"]

ENV_VAR = "SCSE_MONAI_CPU_KERNELS"
MODES = ("auto", "build", "off")
SOURCE = Path(__file__).resolve().parent / "csrc" / "scse_cpu.cpp"
#: -fopenmp: at::parallel_for is inline OpenMP code; without it the kernels run on one thread (libgomp is not
#: linked here: the one torch loaded serves the symbols). -fno-trapping-math lets GCC vectorise the backward's
#: branch test (a float comparison); the kernels do not use floating-point exceptions.
CFLAGS = ("-O3", "-fopenmp", "-fno-trapping-math")
#: dtypes the kernels take; others (bfloat16, half) use the PyTorch path
DTYPES = (torch.float32, torch.float64)

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def mode() -> str:
    """The mode chosen by ``SCSE_MONAI_CPU_KERNELS`` (``"auto"`` when unset); raises ``ValueError`` on a typo."""
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    value = "off" if value == "0" else value
    if value not in MODES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r}: expected one of {MODES} (or 0 for off).")
    return value


@functools.lru_cache(maxsize=1)
def _library_name() -> str:
    """One name per (source, compiler flags, torch version): a stale build is never loaded into another torch."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    digest.update(torch.__version__.encode())
    return f"scse_monai_cpu_{digest.hexdigest()[:12]}"


def library_path() -> Path:
    """Where the compiled library is (or would be) cached."""
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"{_library_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compiles the kernels (if not built yet), loads them into this process and returns the library path.

    The build runs in a temporary folder; only a complete library is moved to :func:`library_path`.

    Raises:
        RuntimeError: no C++ compiler, or the compilation failed (the compiler's message is included).
    """
    global _loaded
    with _lock:
        target = library_path()
        if _loaded:
            return target
        if target.is_file():
            torch.ops.load_library(str(target))
            _loaded = True
            return target
        compiler = os.environ.get("CXX", "c++")
        if shutil.which(compiler) is None:
            raise RuntimeError(f"cannot build the scSE CPU kernels: C++ compiler {compiler!r} not found (set CXX).")
        from torch.utils.cpp_extension import load

        target.parent.mkdir(parents=True, exist_ok=True)
        name = target.stem
        # torch looks for ninja on PATH: the one installed with this package sits next to this Python, which is
        # not on PATH when the environment is not activated (e.g. `.venv/bin/python -m ...` from make)
        path = os.environ.get("PATH", "")
        os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
        with tempfile.TemporaryDirectory(prefix=f"{name}.", dir=target.parent) as tmp:
            try:
                # loads the library into this process too (its ops are registered once per process)
                load(
                    name,
                    [str(SOURCE)],
                    extra_cflags=list(CFLAGS),
                    build_directory=tmp,
                    is_python_module=False,
                    verbose=verbose,
                )
            except Exception as err:  # compiler errors come as RuntimeError / CalledProcessError with the log
                raise RuntimeError(f"building the scSE CPU kernels from {SOURCE.name} failed: {err}") from err
            finally:
                os.environ["PATH"] = path
            os.replace(Path(tmp) / f"{name}.so", target)
        _loaded = True
        return target


def available() -> bool:
    """Whether the kernels are loaded (or loadable under the current mode); the first call may load or build them.

    Never raises for a missing or failed build: the blocks then take the PyTorch path (a failed build in
    ``build`` mode is reported once as a warning).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    chosen = mode()
    if chosen == "off":
        return False
    if chosen == "auto" and not library_path().is_file():
        _loaded = False  # asked once per process (every block call asks); build() in this process still loads them
        return False
    try:
        build()
    except (RuntimeError, OSError) as err:
        warnings.warn(f"scSE CPU kernels unavailable, using the PyTorch path: {err}", RuntimeWarning, stacklevel=2)
        _loaded = False
    return bool(_loaded)


def self_check(seed: int = 0) -> float:
    """Compares a kernel forward and backward of an scSE block with the PyTorch path.

    Returns the largest difference over the output and every gradient, relative to ``1 + max |PyTorch value|``.

    Raises:
        RuntimeError: the kernels are not loaded, or they disagree with the PyTorch path (beyond 1e-5).
    """
    from scse_monai.blocks import ChannelSpatialSELayer

    if not available():
        raise RuntimeError(f"the scSE CPU kernels are not loaded ({ENV_VAR}={mode()}, library {library_path()}).")
    results = []
    for use_kernels in (True, False):
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        block = ChannelSpatialSELayer(3, 8, reduction_ratio=2, aggregation="max")
        block.use_cpu_kernels = use_kernels
        # several position blocks per batch item; channel means away from 0 so that the cSE's ReLU passes gradients
        shift = torch.linspace(-1, 1, 8).view(1, 8, 1, 1, 1)
        x = (torch.randn(2, 8, 5, 7, 1100, generator=gen) + shift).requires_grad_()
        out = block(x)
        out.backward(torch.randn(out.shape, generator=gen))
        results.append([out.detach(), x.grad, *(p.grad for p in block.parameters())])
    worst = max(float((a - b).abs().max() / (1 + b.abs().max())) for a, b in zip(*results, strict=True))
    if worst > 1e-5:
        raise RuntimeError(f"the scSE CPU kernels disagree with the PyTorch path: relative difference {worst:.3g}.")
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scse_monai.cpu_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "status"), help="build (and check) the kernels, or show status")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    args = parser.parse_args(argv)
    try:
        chosen = mode()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "status":
        path = library_path()
        print(f"mode: {chosen} ({ENV_VAR})\nlibrary: {path}\nbuilt: {'yes' if path.is_file() else 'no'}")
        return 0
    try:
        path = build(verbose=args.verbose)
        worst = self_check()
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"scSE CPU kernels ready: {path} (largest relative difference from the PyTorch path {worst:.2g})")
    if chosen == "off":
        print(f"note: {ENV_VAR}=off, so the blocks will not use them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
