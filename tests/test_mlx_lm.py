"""adagrad.py under mlx-lm's trainer (examples/mlx_lm_finetune.py): mlx-lm is a test dependency, which
.ci/run installs at the version the example names; without it these tests are skipped, saying so."""

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("mlx_lm") is None:
    pytest.skip("mlx-lm is not installed (pip install mlx-lm==0.32.2)", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
import mlx_lm_finetune as example  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def rows():
    return example.compare(STEPS, lr=0.01, eps=1e-8)


def row(rows, mode, dtype, optimizer):
    return next(r for r in rows if (r["mode"], r["dtype"], r["optimizer"]) == (mode, dtype, optimizer))


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_in_float32_adagrad_py_gives_mlx_adagrads_losses_and_weights_bit_for_bit(rows, mode):
    assert len(row(rows, mode, "float32", "adagrad.py")["losses"]) == STEPS
    assert example.float32_equal(rows, mode)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_in_float16_mlx_adagrad_loses_every_weight_and_adagrad_py_none(rows, mode):
    """MLX's v is float16, where eps = 1e-8 rounds to 0: a gradient of 0 gives 0 / 0. adagrad.py keeps v in
    float32 (state_dtype) and casts only the new weight back."""
    mlx, ours = row(rows, mode, "float16", "mlx.optimizers.Adagrad"), row(rows, mode, "float16", "adagrad.py")
    assert mlx["not_finite"] == mlx["trained"] > 0
    assert ours["not_finite"] == 0 and all(loss == loss for loss in ours["losses"])


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_in_bfloat16_both_stay_finite(rows, mode):
    """bfloat16 has float32's exponent range: eps = 1e-8 does not round to 0 there."""
    for optimizer in example.OPTIMIZERS:
        assert row(rows, mode, "bfloat16", optimizer)["not_finite"] == 0


def test_adapters_and_optimizer_state_saved_halfway_resume_bit_for_bit():
    assert example.resume_matches(STEPS // 2, lr=0.01)
