"""The one training entry: the same arguments under python, torchrun and accelerate launch.

    python launch/train.py --config configs/quick.yaml [key.path=value ...]
    torchrun --nproc_per_node=4 launch/train.py --config configs/paper.yaml
    accelerate launch --multi_gpu --num_processes 2 launch/train.py --config configs/tiny.yaml
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from icm_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
