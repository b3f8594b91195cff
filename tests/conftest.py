import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when pytest-xdist runs two workers.
torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
