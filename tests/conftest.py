import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Each test chooses its wandb mode in its config (tracking.wandb.mode); WANDB_MODE from the shell would
# override that choice (it takes precedence, as for users), turning wandb on where a test disabled it.
os.environ.pop("WANDB_MODE", None)

# Under xdist each worker shares the machine's cores with the others: torch's default (a thread per core
# in every worker, and in every process a test starts) oversubscribes them, and OpenMP threads that wait
# for a core cost more than they compute. One thread per process, unless the shell chose a number.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or "1"  # an empty value counts as unset
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def data_root() -> str:
    """Where MNIST's safetensors cache and the cached classifiers live (built once, reused by every test)."""
    root = os.environ.get("ICM_DIST_TEST_DATA", str(REPO / "data"))
    Path(root).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def mnist(data_root):
    """MNIST as the protocol takes it (an ImageData); loading it builds the safetensors cache once."""
    from icm_dist.config import DataConfig
    from icm_dist.data.images import load_images

    return load_images(DataConfig(root=data_root))
