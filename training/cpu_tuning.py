"""Speed-ups for MLX on a Linux x86 CPU, switched on by one call: enable().

Importing this module changes nothing. enable() does four things, and only for a step that runs on
the CPU of a Linux machine (elsewhere, and with on=False, it does nothing and says why):

1. BLAS. MLX's Linux wheel (mlx[cpu]) links the reference BLAS. enable() binds MLX's BLAS calls
   to OpenBLAS instead (find_blas: the pip wheel requirements.txt installs, else a system
   OpenBLAS), on one thread (two threads round sums in a varying order, which breaks
   bit-exact seeds and resume). A library's symbols are bound when it is loaded, so OpenBLAS must
   be in the process before mlx.core: if mlx.core is already imported, enable() restarts the
   program once with OpenBLAS preloaded (os.execve, the same arguments).
2. Kernel flags. mx.compile builds its fused CPU kernels with the first `g++` on PATH, for baseline
   x86-64, in $TMPDIR/mlx/<version>/cpu. enable() puts first on PATH a `g++` that adds

       -march=native         this CPU's vector units and FMA
       -fno-math-errno       no errno from sqrt, so it vectorises
       -fno-trapping-math    no floating-point traps to keep: the selects in exp become blends
       -finline-limit=10000  exp inlined into the loop, so the loop vectorises
       -ffp-contract=off     no multiply-adds the source did not write: every kernel rounds as
                             before, and compiled still equals eager bit for bit

   and points MLX's kernel cache (TMPDIR) at a folder of its own per CPU, compiler and flags.
   Python's own temporary files stay where they were (tempfile.tempdir is fixed first).
3. Graph width. MLX_BFS_MAX_WIDTH=1000 (unless set): mx.eval then queues both halves of a
   --streams 2 step side by side instead of one behind the other. It changes the order of the
   work, not its results.
4. Buffer cache. mx.set_cache_limit(1 GiB): freed buffers are kept for reuse instead of going
   back to the OS and being faulted in again every step.

Switch all of it off with enable(on=False) (train.py --cpu-tuning off) or MLX_ADAGRAD_CPU_TUNING=off.
"""

import ctypes
import hashlib
import importlib.util
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from training.stops import SIGNALS

SWITCH = "MLX_ADAGRAD_CPU_TUNING"
FLAGS = "-march=native -fno-math-errno -fno-trapping-math -ffp-contract=off -finline-limit=10000"
KERNEL_CACHE = Path.home() / ".cache" / "mlx-adagrad-kernels"
GRAPH_WIDTH = "1000"
CACHE_LIMIT = 1 << 30
_PRELOADED = "_MLX_ADAGRAD_PRELOADED"  # set for the restarted process only; holds the LD_PRELOAD before it
_TYPED = "_MLX_ADAGRAD_TYPED"  # likewise: the command line as it was typed, before the restart
_blas = None
_report = None


def default_on() -> bool:
    return os.environ.get(SWITCH, "on").lower() not in ("off", "0", "false", "no")


def enable(on: bool = True, device: str = "cpu", restart: bool = True) -> dict:
    """Apply the CPU speed-ups for a step on `device` ("cpu" or "gpu"); return {what: how it is done}:
    "blas" and "kernels" in full (for a run's log), "short" in a few words, "hint" (how to get a fast
    BLAS where none is used, else "").

    With restart=False a process that imported mlx.core first keeps MLX's BLAS (and says so).
    """
    global _report
    if _report is not None:
        return _report
    if not on:
        reason = f"off ({SWITCH}=off or --cpu-tuning off)"
        blas = reason if platform.system() == "Linux" else _platform_blas()
        return {"blas": blas, "kernels": reason, "short": "MLX as it comes (--cpu-tuning off)", "hint": ""}
    if device != "cpu":
        reason = f"off: the step runs on the {device}"
        return {"blas": reason, "kernels": reason, "short": "MLX's own kernels", "hint": ""}
    if platform.system() != "Linux":
        blas = _platform_blas()
        _report = {"blas": blas, "kernels": f"MLX's own ({platform.system()})", "short": blas, "hint": ""}
        return _report
    compiler = _compiler()
    blas = _load_blas(restart, compiler)
    kernels = _native_kernels(compiler)
    os.environ.setdefault("MLX_BFS_MAX_WIDTH", GRAPH_WIDTH)
    import mlx.core as mx

    mx.set_cache_limit(CACHE_LIMIT)
    short = [_blas.short() if _blas else "reference BLAS (slow)"]
    short.append("kernels built for this CPU" if kernels.startswith("g++") else "MLX's kernels")
    hint = "" if _blas else f"MLX runs on its reference BLAS, 10-20x slower: {INSTALL_HINT}"
    _report = {"blas": blas, "kernels": kernels, "short": ", ".join(short), "hint": hint}
    return _report


def _platform_blas() -> str:
    return "Accelerate (macOS)" if platform.system() == "Darwin" else "MLX's own BLAS"


def _load_blas(restart: bool, compiler) -> str:
    global _blas
    restarted = _PRELOADED in os.environ  # this is the restarted process: OpenBLAS came first
    if restarted:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # held while it started; pending ones arrive now
        previous = os.environ.pop(_PRELOADED)
        os.environ.pop(_TYPED, None)
        os.environ.pop("LD_PRELOAD", None)
        if previous:
            os.environ["LD_PRELOAD"] = previous
    blas, why_not = find_blas(KERNEL_CACHE / "blas", compiler)
    if blas is None:
        return f"reference BLAS (slow: {why_not}; for a fast one: {INSTALL_HINT})"
    if "mlx.core" in sys.modules and not restarted:
        if not restart:
            return "reference BLAS (mlx.core was imported before OpenBLAS could be loaded)"
        sys.stdout.flush()
        sys.stderr.flush()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)  # a Ctrl-C while restarting waits for the handlers
        previous = os.environ.get("LD_PRELOAD", "")
        env = {**os.environ, _PRELOADED: previous, "LD_PRELOAD": f"{previous} {blas.preload}".strip()}
        env[_TYPED] = shlex.join(typed_command())
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    _blas = blas.load()
    set_blas_threads(1)
    return _blas.describe()


def typed_command() -> list:
    """The command line as typed, the interpreter first (sys.orig_argv of the process before a restart)."""
    return shlex.split(os.environ[_TYPED]) if _TYPED in os.environ else list(sys.orig_argv)


def set_blas_threads(threads: int):
    """OpenBLAS's thread count (no-op without OpenBLAS)."""
    if _blas is not None:
        _blas.set_threads(threads)


def blas_threads() -> int:
    return _blas.threads() if _blas is not None else 1


def _compiler():
    """The real g++ on PATH, not a wrapper of ours that a parent process (mlx.launch, a test) put there."""
    path = os.pathsep.join(
        d for d in os.environ.get("PATH", "").split(os.pathsep) if not d.startswith(str(KERNEL_CACHE))
    )
    return shutil.which("g++", path=path)


def _native_kernels(compiler) -> str:
    if compiler is None:
        return "none: g++ not found, so mx.compile cannot build kernels (apt-get install g++)"
    folder = KERNEL_CACHE / _build_id(compiler)
    try:
        _install_wrapper(folder, compiler)
    except OSError as e:
        return f"MLX's default flags ({e.strerror}, in {folder})"
    tempfile.gettempdir()  # fixes Python's temporary folder before TMPDIR changes
    os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["TMPDIR"] = str(folder / "tmp")
    return f"g++ {FLAGS} (cache {folder})"


def _proc_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"model name: {platform.processor()}"


def _cpu_info() -> list:
    """The lines of /proc/cpuinfo that name the CPU's model and features, once each."""
    return sorted({line for line in _proc_cpuinfo().splitlines() if line.startswith(("model name", "flags"))})


def cpu_model() -> str:
    """The CPU's model name and x86 family/model numbers, for run headers (cloud CPUs often report only
    'AMD EPYC' or 'Intel(R) Xeon(R) Processor'): 'Intel(R) Xeon(R) Processor (family 6, model 207)'."""
    fields = {}
    for key, _, value in (line.partition(":") for line in _proc_cpuinfo().splitlines()):
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.machine()
    return f"{name} (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else name


def _build_id(compiler: str) -> str:
    """A short hash of the CPU's model and features (-march=native builds for exactly these), the
    compiler and FLAGS: kernels built any other way live in another folder."""
    return hashlib.sha256("\n".join([*_cpu_info(), compiler, FLAGS]).encode()).hexdigest()[:12]


# The g++ that mx.compile runs. A stop signal sent to the whole process group (a terminal's Ctrl-C) does
# not kill a build halfway: the build finishes and the run's own handler stops the run. The kernel is
# written under a temporary name and renamed, so the cache never holds part of one.
WRAPPER = """#!/bin/sh
trap '' HUP INT QUIT TERM
count=$#; previous=""
for word in "$@"; do
  if [ "$previous" = "-o" ]; then output="$word"; word="$word.$$.tmp"; fi
  set -- "$@" "$word"; previous="$word"
done
shift "$count"
if [ -z "$output" ]; then exec "{compiler}" {flags} "$@"; fi
"{compiler}" {flags} "$@" && mv -f "$output.$$.tmp" "$output"
status=$?
rm -f "$output.$$.tmp"
exit $status
"""


def _install_wrapper(folder: Path, compiler: str):
    """Write folder/g++, a script that runs `compiler` with FLAGS, atomically; make folder/tmp.

    Raises OSError if `compiler` rejects FLAGS (then MLX keeps its own)."""
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    wrapper = folder / "g++"
    script = WRAPPER.format(compiler=compiler, flags=FLAGS)
    if wrapper.exists() and wrapper.read_text() == script:
        return
    check = subprocess.run(
        [compiler, *FLAGS.split(), "-x", "c++", "-fsyntax-only", "-"],
        input="int main() {}\n",
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise OSError(0, f"{compiler} rejects {FLAGS}: {(check.stderr.strip().splitlines() or ['no message'])[-1]}")
    partial = folder / f".g++.{os.getpid()}.tmp"
    partial.write_text(script)
    partial.chmod(0o755)
    os.replace(partial, wrapper)


# OpenBLAS behind MLX's BLAS calls (enable's step 1).
#
# MLX's Linux wheel links the reference BLAS. libmlx calls cblas_sgemm for every float32 matmul and
# convolution (cblas_dgemm, cblas_cgemm and LAPACK for float64, complex and mx.linalg). Two ways to
# put OpenBLAS behind those names, in this order:
#
# 1. The pip wheel requirements.txt installs: scipy-openblas32, NumPy's own OpenBLAS build (kernels
#    chosen at run time for any x86-64 or aarch64 CPU, no other library needed). It exports every
#    function with a `scipy_` prefix, so `forwarding_library` builds, with the C compiler that
#    mx.compile already needs, a small library whose every symbol (FORWARDED) is one jump to
#    `scipy_<name>`: any signature passes through unchanged. It is built once per machine into the
#    kernel cache.
# 2. A system OpenBLAS (libopenblas.so.0, e.g. apt's libopenblas0-pthread), with the names as they are.
#
# Either is preloaded before libmlx (LD_PRELOAD), so the dynamic loader binds libmlx's calls to it.

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


def find_blas(cache: Path, compiler: str | None):
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
        "/* Built by mlx-adagrad's training/cpu_tuning.py: each function jumps to scipy-openblas32's own. */",
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
