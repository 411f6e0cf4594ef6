"""The one training entry: the same arguments under python, torchrun and accelerate launch.

    python launch/train.py --config configs/quick.yaml [key.path=value ...]
    torchrun --nproc_per_node=4 launch/train.py --config configs/paper.yaml
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config configs/tiny.yaml
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from torch.distributed.elastic.multiprocessing.errors import record  # noqa: E402

from icm_dist.commands.cli import main  # noqa: E402


# @record: under torchrun, an exception in a worker is written to the error file torchrun reads, so
# its failure summary shows the exception and traceback of every rank that raised one instead of
# "traceback: To enable traceback see ...". Without torchrun it only turns on faulthandler.
@record
def _train_main() -> int:
    return main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(_train_main())
