"""Which scaled-dot-product-attention kernels training may use, chosen on purpose.

PyTorch picks an SDPA backend per call. On Hopper it prefers cuDNN's attention, which builds a new
execution plan for every shape it has not seen: 4–13 ms of host time per new shape, measured at
1.9 s over 3 training steps whose padded length changed every step. Flash attention (and the
memory-efficient kernel where flash cannot run, e.g. fp32) needs no plan, supports the causal
no-mask form training uses (batch.py) and grouped-query heads, and keeps only the output and
the log-sum-exp for backward. So training allows flash, then memory-efficient, then the math
fallback, and never cuDNN. The benchmark gives peft the same choice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch.nn.attention import SDPBackend, sdpa_kernel

TRAINING_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@contextlib.contextmanager
def training_attention() -> Iterator[None]:
    """SDPA inside the block uses flash, memory-efficient or math attention, never cuDNN."""
    with sdpa_kernel(list(TRAINING_BACKENDS)):
        yield
