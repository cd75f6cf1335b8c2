"""blas.py: OpenBLAS only helps when loaded before mlx.core, and the BLAS line must say so."""

import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def blas_line(code):
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(platform.system() != "Linux", reason="OpenBLAS is loaded only on Linux (macOS uses Accelerate)")
def test_loading_after_mlx_core_reports_the_reference_blas():
    late = blas_line("import mlx.core, blas; print(blas.load_optimized_blas())")
    assert late.startswith("reference BLAS") and "imported before blas.py" in late, late


@pytest.mark.skipif(platform.system() != "Linux", reason="OpenBLAS is loaded only on Linux (macOS uses Accelerate)")
def test_loading_first_names_the_blas_and_is_idempotent():
    lines = blas_line("import blas; print(blas.load_optimized_blas()); import mlx.core; print(blas.load_optimized_blas())")
    first, second = lines.splitlines()
    assert first == second and (first.startswith("OpenBLAS") or first.startswith("reference BLAS (slow")), lines
