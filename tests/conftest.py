"""The tests check the code as train.py runs it: with cpu_tuning.py's speed-ups on a Linux CPU (unless
MLX_ADAGRAD_CPU_TUNING=off), enabled here before any test module imports mlx.core."""

import cpu_tuning

cpu_tuning.enable(cpu_tuning.default_on())
