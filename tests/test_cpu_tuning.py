"""cpu_tuning.py: nothing happens on import; enable() binds OpenBLAS and builds kernels for this CPU
in a cache of their own that round exactly as MLX's own; off, or for a GPU, it changes nothing."""

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

import cpu_tuning

REPO = Path(__file__).parents[1]
MODULES = [
    "adagrad",
    "adagrad_da",
    "checkpoint",
    "interrupts",
    "runlog",
    "cpu_tuning",
    "reproduce",
    "tasks",
    "train",
    "data",
    "data.download",
    "data.mnist",
    "data.text",
    "models.cnn",
    "models.conv",
    "models.cpu_ops",
    "models.dense",
    "models.mlp",
    "models.transformer",
]
linux_gxx = pytest.mark.skipif(
    platform.system() != "Linux" or shutil.which("g++") is None,
    reason="cpu_tuning.py builds kernels only on Linux with g++",
)
HAS_OPENBLAS = ctypes.util.find_library("openblas") is not None


def python(code, cache=None, **env):
    """Run `code` in a fresh process (its kernel cache in `cache`); return its stdout lines."""
    prelude = "import cpu_tuning\n" + (
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
        "print('mlx.core' not in sys.modules or not any('/libopenblas' in l for l in open('/proc/self/maps')))"
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


@pytest.mark.skipif(platform.system() != "Linux", reason="OpenBLAS is loaded only on Linux (macOS uses Accelerate)")
def test_openblas_is_bound_before_mlx_or_after_a_restart(tmp_path):
    """Loaded first, or with mlx.core already imported (the process restarts itself once with OpenBLAS
    preloaded), MLX's matmuls run on OpenBLAS where it is installed; else the report says how to get it."""
    check = (
        "print(any('/libopenblas' in l for l in open('/proc/self/maps')), 'LD_PRELOAD' in os.environ, "
        "'_MLX_ADAGRAD_PRELOADED' in os.environ)"
    )
    first = python(f"import os; b = cpu_tuning.enable()['blas']; import mlx.core; print(b); {check}", tmp_path)
    restarted = python(f"import os, mlx.core; print(cpu_tuning.enable()['blas']); {check}", tmp_path)
    kept = python("import mlx.core; print(cpu_tuning.enable(restart=False)['blas'])", tmp_path)
    if HAS_OPENBLAS:
        assert first[0].startswith("OpenBLAS") and first[1] == "True False False", first
        assert restarted == first, restarted  # the same BLAS, and nothing of the restart left in the environment
        assert kept[0].startswith("reference BLAS (mlx.core was imported before"), kept
    else:
        assert first[0].startswith("reference BLAS (slow") and "apt-get install libopenblas" in first[0], first
        assert restarted[0] == first[0] and kept[0] == first[0]


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
