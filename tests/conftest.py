import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test starts with empty Dynamo caches and no grad."""
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()
