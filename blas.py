"""Use an optimized BLAS for MLX on Linux. Import this before `mlx.core`.

MLX's Linux wheel (`mlx[cpu]`) links the reference BLAS, about 6 GFLOP/s on a
2-core x86 machine. Loading OpenBLAS into the process first, with its symbols
global, makes MLX's `sgemm` calls resolve to it: 150-190 GFLOP/s measured, a
15-25x faster training step, with results equal within float32 rounding.

OpenBLAS runs on one thread unless told otherwise: with two, identical runs here
differed in the last bits of the loss, which breaks bit-exact seeds and resume.
"""

import ctypes
import platform
import sys

CANDIDATES = ["libopenblas.so.0", "libopenblas.so"]
INSTALL_HINT = "apt-get install libopenblas0-pthread (Debian/Ubuntu) or dnf install openblas (Fedora)"
_openblas = None


def load_optimized_blas(threads: int = 1) -> str:
    """Load OpenBLAS if it is installed, on `threads` threads; return a line saying which BLAS MLX uses.

    The line names OpenBLAS's kernel set (chosen per CPU), since another set rounds differently.
    """
    global _openblas
    if platform.system() != "Linux":
        return "Accelerate (macOS)" if platform.system() == "Darwin" else "MLX default BLAS"
    if _openblas is None and "mlx.core" in sys.modules:
        # MLX's matmuls are already bound to the wheel's BLAS; loading OpenBLAS now changes nothing.
        return "reference BLAS (slow: mlx.core was imported before blas.py; import train or blas first)"
    for name in CANDIDATES:
        try:
            _openblas = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _openblas.openblas_get_config.restype = ctypes.c_char_p
        _openblas.openblas_get_corename.restype = ctypes.c_char_p
        set_threads(threads)
        version = " ".join(_openblas.openblas_get_config().decode().split()[:2])
        return f"{version} {_openblas.openblas_get_corename().decode()} kernels ({name})"
    return f"reference BLAS (slow: ~6 GFLOP/s; for 15-25x faster training: {INSTALL_HINT})"


def set_threads(threads: int):
    """Set OpenBLAS's thread count (no-op without OpenBLAS)."""
    if _openblas is not None:
        _openblas.openblas_set_num_threads(threads)


def threads() -> int:
    return _openblas.openblas_get_num_threads() if _openblas is not None else 1
