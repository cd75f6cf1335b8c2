"""The tests check the code as train.py runs it: with training/cpu_tuning.py's speed-ups on a Linux CPU
(unless MLX_ADAGRAD_CPU_TUNING=off), enabled here before any test module imports mlx.core. Real data
sets are found where train.py looks for them: $MLX_ADAGRAD_DATA, else the download folder."""

import pytest

from training import cpu_tuning

cpu_tuning.enable(cpu_tuning.default_on())


@pytest.fixture
def real_data():
    """real_data(dataset) -> the data folder train.py uses, if it holds `dataset`; else the test is
    skipped, saying where the data set was looked for."""

    from training import options  # after cpu_tuning.enable, since it imports mlx.core

    def folder(dataset):
        root = options.complete({}).data_dir
        if not (root / dataset).is_dir():
            pytest.skip(
                f"real {dataset} not found in {root} (train.py's data folder: set MLX_ADAGRAD_DATA, or run "
                f"train.py once to download it there)"
            )
        return root

    return folder
