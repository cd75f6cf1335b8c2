"""Load OpenBLAS before any test module imports mlx.core, as train.py does (see blas.py)."""

import blas

blas.load_optimized_blas()
