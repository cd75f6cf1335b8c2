"""training/cpu_tuning.py: nothing happens on import; enable() binds OpenBLAS and builds kernels for this CPU
in a cache of their own that round exactly as MLX's own; off, or for a GPU, it changes nothing."""

import ctypes
import ctypes.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from training import cpu_tuning

REPO = Path(__file__).parents[1]
MODULES = sorted(
    ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for pattern in ("*.py", "training/*.py", "data/*.py", "models/*.py")
    for path in REPO.glob(pattern)
)
linux_gxx = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("g++") is None,
    reason="cpu_tuning.py builds kernels only on Linux with g++",
)
HAS_OPENBLAS = ctypes.util.find_library("openblas") is not None
# The libraries enable() binds MLX to (NumPy's own OpenBLAS, libscipy_openblas64_, is not one of them).
OUR_BLAS = ("libopenblas.so.0", "libscipy_openblas.so")


def python(code, cache=None, **env):
    """Run `code` in a fresh process (its kernel cache in `cache`); return its stdout lines."""
    prelude = "from training import cpu_tuning\n" + (
        f"from pathlib import Path; cpu_tuning.KERNEL_CACHE = Path({str(cache)!r})\n" if cache else ""
    )
    environment = {k: v for k, v in os.environ.items() if k != cpu_tuning.SWITCH} | env
    result = subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True, env=environment, check=True
    )
    return result.stdout.splitlines()


@pytest.mark.parametrize("module", MODULES)
def test_importing_a_module_changes_nothing_in_the_process(module):
    code = (
        f"import os, sys, tempfile; e = dict(os.environ); import {module}; "
        "assert dict(os.environ) == e, set(os.environ.items()) ^ set(e.items()); "
        "t = tempfile.gettempdir(); assert t == (os.environ.get('TMPDIR') or '/tmp').rstrip('/'), t; "
        "maps = open('/proc/self/maps').read().split(); "
        f"print('mlx.core' not in sys.modules or not any(m.endswith({OUR_BLAS}) for m in maps))"
    )
    assert python(code) == ["True"]


@linux_gxx
def test_kernels_are_built_with_the_flags_into_their_own_cache(tmp_path):
    code = (
        "import tempfile; before = tempfile.gettempdir(); print(cpu_tuning.enable()['kernels'])\n"
        "import mlx.core as mx; print(mx.compile(lambda x: mx.sqrt(x) + 1)(mx.ones(8)).tolist())\n"
        "print(tempfile.gettempdir() == before)"
    )
    line, values, same_tempdir = python(code, tmp_path)
    assert line.startswith(f"g++ {cpu_tuning.FLAGS}"), line
    assert values == str([2.0] * 8) and same_tempdir == "True"  # Python's own temporary files stay put
    wrappers = list(tmp_path.glob("*/g++"))
    assert len(wrappers) == 1 and cpu_tuning.FLAGS in wrappers[0].read_text()
    assert list(wrappers[0].parent.glob("tmp/mlx/*/cpu/*.so")), "the kernel was not built through the wrapper"


@linux_gxx
def test_a_child_process_does_not_wrap_the_wrapper(tmp_path):
    # mlx.launch's workers inherit the PATH with our g++ first; theirs must still run the real one.
    parent_path = python("cpu_tuning.enable(); import os; print(os.environ['PATH'])", tmp_path)[0]
    code = "cpu_tuning.enable(); import mlx.core as mx; print(mx.compile(lambda x: mx.exp(x - 1))(mx.ones(4)).tolist())"
    assert python(code, tmp_path, PATH=parent_path) == [str([1.0] * 4)]
    wrapper = next(tmp_path.glob("*/g++")).read_text()
    assert str(tmp_path) not in wrapper.split("exec", 1)[1].split()[0], wrapper


@linux_gxx
def test_flags_the_compiler_rejects_leave_mlx_alone(tmp_path):
    code = (
        "cpu_tuning.FLAGS = '-mno-such-flag'; print(cpu_tuning.enable()['kernels']); "
        "import os; print(os.environ['PATH'])"
    )
    line, path = python(code, tmp_path)
    assert line.startswith("MLX's default flags") and "rejects -mno-such-flag" in line, line
    assert str(tmp_path) not in path and not list(tmp_path.glob("*/g++"))


@pytest.mark.parametrize("how", ["on=False", "the switch", "a GPU step"])
def test_off_or_for_a_gpu_it_changes_nothing(tmp_path, how):
    call = {
        "on=False": "cpu_tuning.enable(on=False)",
        "the switch": "cpu_tuning.enable(cpu_tuning.default_on())",
        "a GPU step": "cpu_tuning.enable(device='gpu')",
    }[how]
    code = (
        "import os, sys; e = dict(os.environ); " + f"report = {call}; "
        "print(dict(os.environ) == e, 'mlx.core' in sys.modules, report['kernels'])"
    )
    env = {cpu_tuning.SWITCH: "off"} if how == "the switch" else {}
    same_env, loaded_mlx, kernels = python(code, tmp_path, **env)[0].split(" ", 2)
    assert (same_env, loaded_mlx) == ("True", "False") and kernels.startswith("off"), kernels
    assert not list(tmp_path.iterdir())


def expected_blas():
    """What enable() should find here: the pip wheel (with a compiler), else a system OpenBLAS, else none."""
    if cpu_tuning._wheel_library() is not None and shutil.which("g++"):
        return "OpenBLAS", "scipy-openblas32"
    if HAS_OPENBLAS:
        return "OpenBLAS", "libopenblas"
    return "reference BLAS (slow", "pip install -r requirements.txt"


@pytest.mark.skipif(platform.system() != "Linux", reason="OpenBLAS is loaded only on Linux (macOS uses Accelerate)")
def test_openblas_is_bound_before_mlx_or_after_a_restart(tmp_path):
    """Loaded first, or with mlx.core already imported (the process restarts itself once with OpenBLAS
    preloaded), MLX's matmuls run on OpenBLAS where there is one; else the report says how to get it."""
    check = (
        f"print(any(l.strip().endswith({OUR_BLAS}) for l in open('/proc/self/maps')), 'LD_PRELOAD' in os.environ, "
        "'_MLX_ADAGRAD_PRELOADED' in os.environ)"
    )
    first = python(f"import os; b = cpu_tuning.enable()['blas']; import mlx.core; print(b); {check}", tmp_path)
    restarted = python(f"import os, mlx.core; print(cpu_tuning.enable()['blas']); {check}", tmp_path)
    kept = python("import mlx.core; print(cpu_tuning.enable(restart=False)['blas'])", tmp_path)
    start, detail = expected_blas()
    assert first[0].startswith(start) and detail in first[0], first
    if start == "OpenBLAS":
        assert first[1] == "True False False", first
        assert restarted == first, restarted  # the same BLAS, and nothing of the restart left in the environment
        assert kept[0].startswith("reference BLAS (mlx.core was imported before"), kept
    else:
        assert restarted[0] == first[0] and kept[0] == first[0]


@pytest.mark.skipif(cpu_tuning._wheel_library() is None, reason="scipy-openblas32 is not installed")
def test_a_compiler_that_fails_leaves_mlx_as_it_comes_with_one_line(tmp_path):
    code = (
        "cpu_tuning._compiler = lambda: '/bin/false'; r = cpu_tuning.enable(); print(r['blas']); print(r['kernels'])\n"
        "import mlx.core as mx; print(mx.compile(lambda x: x @ x + 1)(mx.ones((2, 2))).tolist())"
    )
    blas, kernels, values = python(code, tmp_path)
    if not HAS_OPENBLAS:  # else the system's OpenBLAS is the next choice
        assert blas.startswith("reference BLAS (slow: its forwarding library did not build"), blas
    assert kernels.startswith("MLX's default flags") and values == str([[3.0, 3.0], [3.0, 3.0]])


@pytest.mark.skipif(cpu_tuning._wheel_library() is None, reason="scipy-openblas32 is not installed")
def test_every_blas_and_lapack_function_libmlx_imports_is_forwarded():
    if shutil.which("nm") is None:
        pytest.skip("nm (binutils) is needed to read the libraries' symbols")
    libmlx = next(Path(mx.__file__).parent.glob("lib/libmlx.so"))

    def symbols(library, *flags):
        result = subprocess.run(["nm", "-D", *flags, str(library)], capture_output=True, text=True, check=True)
        return {line.split()[-1] for line in result.stdout.splitlines() if line.strip()}

    provided = {name.removeprefix("scipy_") for name in symbols(cpu_tuning._wheel_library(), "--defined-only")}
    imported = symbols(libmlx, "--undefined-only") & provided
    assert "cblas_sgemm" in imported and imported == set(cpu_tuning.FORWARDED), imported ^ set(cpu_tuning.FORWARDED)


@pytest.mark.skipif(not cpu_tuning.default_on(), reason="the tests run MLX as it comes (MLX_ADAGRAD_CPU_TUNING=off)")
def test_a_matmul_gives_the_bits_of_the_openblas_it_is_bound_to():
    """MLX's float32 matmul, through the forwarding library, equals scipy-openblas32's own cblas_sgemm."""
    if cpu_tuning._blas is None or cpu_tuning._blas.prefix != "scipy_":
        pytest.skip(f"MLX's BLAS here is not scipy-openblas32: {cpu_tuning.enable()['blas']}")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((67, 300), np.float32), rng.standard_normal((300, 45), np.float32)
    ours = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
    theirs = np.zeros((67, 45), np.float32)
    sgemm = ctypes.CDLL(cpu_tuning._blas.library).scipy_cblas_sgemm
    sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    sgemm.argtypes += [ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    row_major, no_transpose = 101, 111
    sgemm(row_major, no_transpose, no_transpose, 67, 45, 300, 1.0, a.ctypes.data, 300, b.ctypes.data, 45, 0.0,
          theirs.ctypes.data, 45)  # fmt: skip
    np.testing.assert_array_equal(ours, theirs)


def test_compiled_kernels_round_as_eager_ones():
    # The tests run with cpu_tuning.enable() (conftest.py). Vector sqrt, divide and MLX's exp
    # polynomial (fma) must give the bits of MLX's own scalar kernels: -ffp-contract=off, no fast-math.
    rng = np.random.default_rng(0)
    x = mx.array(
        np.concatenate([rng.normal(0, 30, 4093), [0.0, -0.0, 88.5, -88.5, -1e30, np.inf, -np.inf, np.nan]]), mx.float32
    )
    v = mx.abs(x) + mx.array(rng.random(x.size), mx.float32)  # NaN where x is

    def ops(x, v):
        return (
            mx.exp(x - 0.5),
            x * 0.01 / (mx.sqrt(v) + 1e-8),
            x * 1.3 + v,
            x * v - 0.7,
            mx.log(v + 1) * x,
            mx.maximum(x, 0.25) * 3,
        )

    for eager, compiled in zip(ops(x, v), mx.compile(ops)(x, v)):
        assert np.array_equal(np.array(eager), np.array(compiled), equal_nan=True)
