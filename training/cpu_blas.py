"""A fast BLAS for MLX's Linux CPU build, found or built once per machine (cpu_tuning.enable uses it).

MLX's Linux wheel links the reference BLAS. libmlx calls cblas_sgemm for every float32 matmul and
convolution (cblas_dgemm, cblas_cgemm and LAPACK for float64, complex and mx.linalg). Two ways to
put OpenBLAS behind those names, in this order:

1. The pip wheel requirements.txt installs: scipy-openblas32, NumPy's own OpenBLAS build (kernels
   chosen at run time for any x86-64 or aarch64 CPU, no other library needed). It exports every
   function with a `scipy_` prefix, so `forwarding_library` builds, with the C compiler that
   mx.compile already needs, a small library whose every symbol (FORWARDED) is one jump to
   `scipy_<name>`: any signature passes through unchanged. It is built once per machine into the
   kernel cache.
2. A system OpenBLAS (libopenblas.so.0, e.g. apt's libopenblas0-pthread), with the names as they are.

Either is preloaded before libmlx (LD_PRELOAD), so the dynamic loader binds libmlx's calls to it.
"""

import ctypes
import hashlib
import importlib.util
import os
import platform
import subprocess
from pathlib import Path

WHEEL = "scipy_openblas32"
SYSTEM = ["libopenblas.so.0", "libopenblas.so"]
INSTALL_HINT = "pip install -r requirements.txt (scipy-openblas32; needs gcc), or apt-get install libopenblas0-pthread"
# Every BLAS and LAPACK function libmlx 0.32 imports (nm -D --undefined-only libmlx.so; tested).
FORWARDED = """cblas_sgemm cblas_dgemm cblas_cgemm sgetrf_ dgetrf_ sgetri_ dgetri_ spotrf_ dpotrf_ strtri_ dtrtri_
sgeqrf_ dgeqrf_ sorgqr_ dorgqr_ sgesdd_ dgesdd_ cgesdd_ ssyevd_ dsyevd_ cheevd_ sgeev_ dgeev_ cgeev_""".split()
_JUMP = {
    "x86_64": '".text\\n.globl " #f "\\n.type " #f ", @function\\n" #f ":\\n\\tjmp scipy_" #f "@PLT\\n"',
    "aarch64": '".text\\n.globl " #f "\\n.type " #f ", %function\\n" #f ":\\n\\tb scipy_" #f "\\n"',
}


class Blas:
    """A loaded OpenBLAS: `preload` is what LD_PRELOAD needs, `library` the OpenBLAS itself, whose
    own functions are named `prefix` + their OpenBLAS names."""

    def __init__(self, preload: str, library: str, prefix: str, origin: str):
        self.preload, self.library, self.prefix, self.origin = preload, library, prefix, origin
        self._handle = None

    def load(self):
        """Load it into this process (RTLD_GLOBAL); before libmlx, its calls then bind to it."""
        ctypes.CDLL(self.preload, mode=ctypes.RTLD_GLOBAL)
        self._handle = ctypes.CDLL(self.library, mode=ctypes.RTLD_GLOBAL)
        self._function("openblas_get_config").restype = ctypes.c_char_p
        self._function("openblas_get_corename").restype = ctypes.c_char_p
        return self

    def _function(self, name):
        return getattr(self._handle, self.prefix + name)

    def set_threads(self, threads: int):
        self._function("openblas_set_num_threads")(threads)

    def threads(self) -> int:
        return self._function("openblas_get_num_threads")()

    def short(self) -> str:
        """'OpenBLAS 0.3.30 (scipy-openblas32)'."""
        return f"OpenBLAS {self._function('openblas_get_config')().decode().split()[1]} ({self.origin.split(',')[0]})"

    def describe(self) -> str:
        """'OpenBLAS 0.3.30 Haswell kernels (scipy-openblas32)'."""
        version = " ".join(self._function("openblas_get_config")().decode().split()[:2])
        return f"{version} {self._function('openblas_get_corename')().decode()} kernels ({self.origin})"


def find(cache: Path, compiler: str | None):
    """(Blas or None, why not): the wheel's OpenBLAS through a forwarding library built into
    `cache` with `compiler`, else a system OpenBLAS, else None and the reason."""
    wheel_library = _wheel_library()
    reasons = []
    if wheel_library is None:
        reasons.append(f"{WHEEL} is not installed")
    elif platform.machine() not in _JUMP:
        reasons.append(f"no forwarding library for {platform.machine()}")
    elif compiler is None:
        reasons.append("no C compiler to build its forwarding library")
    else:
        try:
            preload = forwarding_library(cache, compiler, wheel_library)
            return Blas(str(preload), str(wheel_library), "scipy_", "scipy-openblas32, pip"), None
        except OSError as e:
            reasons.append(f"its forwarding library did not build ({e.strerror})")
    for name in SYSTEM:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return Blas(name, name, "", name), None
    return None, "; ".join(reasons + ["no system OpenBLAS"])


def _wheel_library():
    """The path of scipy-openblas32's libscipy_openblas.so, found without importing anything."""
    spec = importlib.util.find_spec(WHEEL)
    if spec is None or not spec.submodule_search_locations:
        return None
    libraries = sorted((Path(spec.submodule_search_locations[0]) / "lib").glob("libscipy_openblas*.so"))
    return libraries[0] if libraries else None


def forwarding_source(machine: str) -> str:
    """C source of a library whose every FORWARDED function jumps to scipy_<name>."""
    lines = [
        "/* Built by mlx-adagrad's training/cpu_blas.py: each function jumps to scipy-openblas32's own. */",
        f"#define FORWARD(f) __asm__({_JUMP[machine]});",
    ]
    return "\n".join(lines + [f"FORWARD({name})" for name in FORWARDED]) + "\n"


def forwarding_library(cache: Path, compiler: str, library: Path) -> Path:
    """Build (once: the name is a hash of its inputs) the forwarding library for `library` into `cache`.
    Raises OSError when it cannot be built."""
    source = forwarding_source(platform.machine())
    stat = library.stat()
    key = "\n".join([source, compiler, str(library.resolve()), str(stat.st_size), str(stat.st_mtime_ns)])
    target = cache / f"libmlx_adagrad_blas_{hashlib.sha256(key.encode()).hexdigest()[:12]}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = cache / f".{target.name}.{os.getpid()}.tmp"
    command = [compiler, "-x", "c", "-", "-shared", "-fPIC", "-o", str(partial)]
    command += [f"-L{library.parent}", f"-l:{library.name}", f"-Wl,-rpath,{library.parent}"]
    try:
        built = subprocess.run(command, input=source, capture_output=True, text=True)
    except OSError as e:
        raise OSError(e.errno, f"{compiler}: {e.strerror}") from None
    if built.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OSError(0, f"{compiler}: {(built.stderr.strip().splitlines() or ['failed'])[-1]}")
    os.replace(partial, target)
    return target
