"""Load OpenBLAS before any test module imports mlx.core, and build compiled kernels for this CPU, as
train.py does (see blas.py, jit.py): the tests check the code as it trains."""

import blas
import jit

blas.load_optimized_blas()
jit.use_native_kernels()
