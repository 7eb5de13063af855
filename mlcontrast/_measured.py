"""The fastest fused backend on CUDA per op, dtype and shape, as measured: generated, do not edit.

Written by ``python -m benchmarks.report --write-measured`` from the committed GPU results
(``benchmarks/results/*_cuda.json``); ``"auto"`` on CUDA tensors takes, among the available backends,
the one that ran fastest (fwd+bwd) at the measured shape nearest to the call's (see
:func:`mlcontrast._backends.resolve`). Empty until GPU results are committed: ``"auto"`` then follows
the order of ``available_backends``.
"""

# The GPU the figures were measured on (None: no GPU results yet).
DEVICE = None

# (op, dtype) -> ((rows, feature dim, fastest backend), ...)
FASTEST: dict[tuple[str, str], tuple[tuple[int, int, str], ...]] = {}
