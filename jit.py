"""Let mx.compile's CPU kernels use this CPU's vector instructions. Call before the first compiled call.

mx.compile fuses elementwise ops into C++ kernels that MLX builds at run time with the first
`g++` on PATH (`g++ -std=c++17 -O3 -fPIC -shared`) and caches in $TMPDIR/mlx/<version>/cpu.
The Linux wheel adds no -march, so the kernels target baseline x86-64 (SSE2, no FMA): the
`std::fma` in MLX's exp polynomial becomes six calls into libm an element, and since `sqrt` must
set errno on negative input, g++ keeps it scalar. Measured here, 1M elements:
exp(x - m) 12.3 -> 0.47 ms, Adagrad's update of a 512 x 784 weight 1.06 -> 0.23 ms.

use_native_kernels() puts a `g++` first on PATH that adds

    -march=native         this CPU's vector units and FMA
    -fno-math-errno       no errno from sqrt: it vectorises
    -fno-trapping-math    no floating-point traps to keep, so the selects in exp become blends
    -finline-limit=10000  exp inlined into the loop instead of called: the loop vectorises
    -ffp-contract=off     no multiply-adds the source did not write, so every kernel rounds as
                          before: compiled still equals eager bit for bit

and moves MLX's kernel cache (via TMPDIR) to a folder of its own per CPU model, compiler and flags,
so kernels built another way, or for another CPU, are never loaded. Opt out with MLX_ADAGRAD_NATIVE_KERNELS=0.
"""

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

FLAGS = "-march=native -fno-math-errno -fno-trapping-math -ffp-contract=off -finline-limit=10000"
_line = None


def _build_id(compiler: str) -> str:
    """A short hash of the CPU's model and features (-march=native builds for exactly these), the compiler
    and FLAGS: kernels built any other way live in another folder."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = platform.processor()
    lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    return hashlib.sha256("\n".join([*lines, compiler, FLAGS]).encode()).hexdigest()[:12]


def _install_wrapper(folder: Path, compiler: str):
    """Write folder/g++, a script that runs `compiler` with FLAGS, atomically; make folder/tmp.

    Raises OSError if `compiler` rejects FLAGS (then MLX keeps its own)."""
    (folder / "tmp").mkdir(parents=True, exist_ok=True)
    wrapper = folder / "g++"
    script = f'#!/bin/sh\nexec "{compiler}" {FLAGS} "$@"\n'
    if wrapper.exists() and wrapper.read_text() == script:
        return
    check = subprocess.run([compiler, *FLAGS.split(), "-x", "c++", "-fsyntax-only", "-"], input="int main() {}\n",
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise OSError(0, f"{compiler} rejects {FLAGS}: {(check.stderr.strip().splitlines() or ['no message'])[-1]}")
    partial = folder / f".g++.{os.getpid()}.tmp"
    partial.write_text(script)
    partial.chmod(0o755)
    os.replace(partial, wrapper)


def use_native_kernels(cache_root: Path = Path.home() / ".cache" / "mlx-adagrad-kernels") -> str:
    """Build mx.compile's kernels with FLAGS for this CPU; return a line saying how they are built."""
    global _line
    if _line is not None:
        return _line
    # The real g++, not a wrapper of ours that a parent process (mlx.launch, a test) put on PATH.
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep) if not d.startswith(str(cache_root)))
    compiler = shutil.which("g++", path=path)
    if platform.system() != "Linux":
        _line = f"MLX's own ({platform.system()})"
    elif os.environ.get("MLX_ADAGRAD_NATIVE_KERNELS", "1") == "0":
        _line = "MLX's default flags (MLX_ADAGRAD_NATIVE_KERNELS=0)"
    elif compiler is None:
        _line = "none: g++ not found, so mx.compile cannot build kernels (apt-get install g++)"
    else:
        folder = cache_root / _build_id(compiler)
        try:
            _install_wrapper(folder, compiler)
        except OSError as e:
            _line = f"MLX's default flags ({e.strerror}, in {folder})"
        else:
            os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"
            os.environ["TMPDIR"] = str(folder / "tmp")
            _line = f"g++ {FLAGS} (cache {folder})"
    return _line
