"""One process of a data-parallel test run: train.py, then save this rank's weights and optimizer state.

mlx.launch -n 2 --backend ring -- python tests/distributed_worker.py OUT_DIR [train.py arguments]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))

from training import cpu_tuning  # noqa: E402

cpu_tuning.enable(cpu_tuning.default_on())  # before mlx.core: train.main(argv) does not restart the process

import mlx.core as mx  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import train  # noqa: E402

out_dir, argv = Path(sys.argv[1]), sys.argv[2:]
model, optimizer = train.main(argv)
arrays = {f"model.{k}": v for k, v in tree_flatten(model.parameters())}
arrays.update({f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)})
mx.save_safetensors(str(out_dir / f"rank{mx.distributed.init().rank()}.safetensors"), arrays)
