"""jit.py: mx.compile's kernels built for this CPU, in a cache of their own, rounding exactly as before."""

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import jit

REPO = Path(__file__).parents[1]
needs_gxx = pytest.mark.skipif(platform.system() != "Linux" or shutil.which("g++") is None,
                               reason="jit.py changes how kernels are built only on Linux with g++")


def python(code, cache, flags=jit.FLAGS, **env):
    """Run `code` in a fresh process whose jit cache is `cache`; return its stdout."""
    prelude = (f"import jit; from pathlib import Path; jit.FLAGS = {flags!r}\n"
               f"print(jit.use_native_kernels(Path({str(cache)!r})))\n")
    result = subprocess.run([sys.executable, "-c", prelude + code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, **env}, check=True)
    return result.stdout.splitlines()


@needs_gxx
def test_kernels_are_built_with_the_flags_into_their_own_cache(tmp_path):
    code = "import mlx.core as mx; print(mx.compile(lambda x: mx.sqrt(x) + 1)(mx.ones(8)).tolist())"
    line, values = python(code, tmp_path)
    assert line.startswith(f"g++ {jit.FLAGS}"), line
    assert values == str([2.0] * 8)
    wrappers = list(tmp_path.glob("*/g++"))
    assert len(wrappers) == 1 and jit.FLAGS in wrappers[0].read_text()
    assert list(wrappers[0].parent.glob("tmp/mlx/*/cpu/*.so")), "the kernel was not built through the wrapper"


@needs_gxx
def test_a_child_process_does_not_wrap_the_wrapper(tmp_path):
    # mlx.launch's workers inherit the PATH with our g++ first; theirs must still run the real one.
    parent_path = python("import os; print(os.environ['PATH'])", tmp_path)[1]
    code = "import mlx.core as mx; print(mx.compile(lambda x: mx.exp(x - 1))(mx.ones(4)).tolist())"
    assert python(code, tmp_path, PATH=parent_path)[1] == str([1.0] * 4)
    wrapper = next(tmp_path.glob("*/g++")).read_text()
    assert str(tmp_path) not in wrapper.split("exec", 1)[1].split()[0], wrapper


@needs_gxx
def test_flags_the_compiler_rejects_leave_mlx_alone(tmp_path):
    line, path = python("import os; print(os.environ['PATH'])", tmp_path, flags="-mno-such-flag")
    assert line.startswith("MLX's default flags") and "rejects -mno-such-flag" in line, line
    assert str(tmp_path) not in path and not list(tmp_path.glob("*/g++"))


@needs_gxx
def test_opt_out_leaves_mlx_alone(tmp_path):
    line, path = python("import os; print(os.environ['PATH'])", tmp_path, MLX_ADAGRAD_NATIVE_KERNELS="0")
    assert "MLX_ADAGRAD_NATIVE_KERNELS=0" in line and str(tmp_path) not in path
    assert not list(tmp_path.iterdir())


def test_compiled_kernels_round_as_eager_ones():
    # The tests run with jit.use_native_kernels() (conftest.py). Vector sqrt, divide and MLX's exp
    # polynomial (fma) must give the bits of MLX's own scalar kernels: -ffp-contract=off, no fast-math.
    rng = np.random.default_rng(0)
    x = mx.array(np.concatenate([rng.normal(0, 30, 4093), [0.0, -0.0, 88.5, -88.5, -1e30, np.inf, -np.inf, np.nan]]), mx.float32)
    v = mx.abs(x) + mx.array(rng.random(x.size), mx.float32)  # NaN where x is

    def ops(x, v):
        return (mx.exp(x - 0.5), x * 0.01 / (mx.sqrt(v) + 1e-8), x * 1.3 + v, x * v - 0.7, mx.log(v + 1) * x,
                mx.maximum(x, 0.25) * 3)

    for eager, compiled in zip(ops(x, v), mx.compile(ops)(x, v)):
        assert np.array_equal(np.array(eager), np.array(compiled), equal_nan=True)
