"""Process-wide torch settings that a command changes only for as long as it runs."""
from __future__ import annotations

from contextlib import contextmanager


@contextmanager
def torch_threads(n: int):
    """``torch.set_num_threads(n)`` inside the block (n <= 0: leave it), the previous count restored
    after it, so an in-process caller (a test, a script calling ``mode_ros.cli.main``) keeps its own
    thread count and with it its numerics (CPU reductions split by thread)."""
    import torch

    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
