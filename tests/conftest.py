import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random checkpoint written by dgemma itself (with tokenizer and chat template)."""
    from dgemma.checkpoint.random_init import InitScale, write_random_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_random_checkpoint(path, "tiny", seed=0, scale=InitScale(embed_std=1.0, perturb=0.1))
    return path


def cuda_only():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
