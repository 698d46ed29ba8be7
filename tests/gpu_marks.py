"""The one mark of a test that needs a CUDA GPU: it carries the `gpu` marker, so that `python -m pytest -m gpu` on a
GPU machine runs these tests and no others, and it is skipped where torch sees no CUDA GPU."""

import pytest
import torch


def gpu_test(missing: bool = False, reason: str = "needs a CUDA GPU"):
    """A decorator: the `gpu` marker and a skip without a CUDA GPU, or when `missing` (what `reason` names)."""
    skip = pytest.mark.skipif(missing or not torch.cuda.is_available(), reason=reason)
    return lambda test: pytest.mark.gpu(skip(test))
