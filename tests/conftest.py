import os

import torch

# Without a GPU, the Triton kernels run in Triton's interpreter. It must be chosen before triton is
# first imported anywhere in this process (triton.language's own helpers are decorated at import), and
# collecting some test modules imports triton; so it is set here, before any test module is imported.
# The op tests give the (slow) interpreted backend small sizes only (tests/utils.py: backend_table).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
