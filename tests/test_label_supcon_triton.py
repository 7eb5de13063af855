"""The Triton backend's own mechanisms for label_supcon: launch configurations, the atomic kernels, the
fixed shift and its online-max fallback, the run-time D loop, TF32, and the GPU-only large cases.

The op's behaviour on every backend (Triton included, in small sizes) is tests/test_label_supcon.py.
Without a GPU the kernels run in the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1), whose tiles shrink to 16 (mlcontrast.ops.utils): the sizes below cross tile
boundaries (N = 33, 45, 70; D = 40) and leave partial tiles. Its bf16 tl.dot is wrong: bf16 is GPU-only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm, assert_matches, backend_table, make_labels, make_targets, record_launches

import mlcontrast
from mlcontrast import reference
from mlcontrast.ops import registry

TRITON = backend_table()["triton"]
if TRITON.reason is not None:
    pytest.skip(f"the Triton backend cannot run here: {TRITON.reason}", allow_module_level=True)

from mlcontrast.ops import label_supcon as triton_label_supcon  # noqa: E402
from mlcontrast.ops.utils import is_interpreted  # noqa: E402

DEVICE = TRITON.device
INTERPRETED = is_interpreted(triton_label_supcon._label_supcon_fwd_kernel)
DTYPES = [torch.float32, torch.float16]  # bf16 only on a GPU (the interpreter's bf16 tl.dot is wrong)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(params=["deterministic", "atomic"])
def mode(request, monkeypatch):
    """Runs a test with each pair (forward, backward) of label_supcon kernels."""
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", request.param == "atomic")
    return request.param


def _rand(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape) * scale).to(device=DEVICE, dtype=dtype)


def _to_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n,anchors", [(70, (20, 45)), (70, (0, 16)), (40, (33, 40)), (33, (9, 9)), (70, (3, 67)), (70, (5, 60))]
)
def test_label_supcon_anchor_rows(n, anchors, dtype, mode):
    # A process group's rows: only the anchors get a loss, against all rows. Row blocks of 16 that
    # overlap the anchors visit every column tile, the others only the anchors' tiles. The atomic
    # forward pairs the anchor blocks: 1, 2, 4 (even: the half-way pairs) and 4 blocks with a partial one.
    start, stop = anchors
    z = _rand(n, 12, dtype=dtype, scale=12**-0.5)
    (y,) = _to_device(make_labels(n, 5, ignore_fraction=0.2, singleton=True))
    upstream = torch.randn(n, dtype=torch.float64, device=DEVICE)
    out, (grad,) = assert_matches(
        lambda x: registry.op("label_supcon", "triton")(x, y, 0.1, 0.07, start, stop)[0],
        lambda x: torch.nn.functional.pad(
            reference.label_supcon_anchor_rows(x, y, 0.1, 0.07, False, start, stop), (start, n - stop)
        ),
        [z],
        upstream,
        names=["features"],
    )
    assert not out[:start].any() and not out[stop:].any()


def test_label_supcon_config_overrides_reach_the_kernels(monkeypatch, mode):
    # benchmarks.tune_triton installs candidate configurations through CONFIG_OVERRIDES.
    from mlcontrast.ops import utils as ops_utils

    launched = []
    real_launch = triton_label_supcon.launch

    def recording_launch(kernel, grid):
        run = real_launch(kernel, grid)
        return lambda *args, **kwargs: (launched.append((kernel.__name__, kwargs)), run(*args, **kwargs))

    monkeypatch.setattr(triton_label_supcon, "launch", recording_launch)
    suffix = "-atomic" if mode == "atomic" else ""
    overrides = {"fwd": {"BLOCK_M": 32, "BLOCK_N": 16}, "bwd": {"BLOCK_M": 32, "BLOCK_D": 32}}
    for phase, override in overrides.items():
        monkeypatch.setitem(ops_utils.CONFIG_OVERRIDES, f"label_supcon.{phase}{suffix}", override)
    z = _rand(45, 40, scale=40**-0.5)
    (y,) = _to_device(make_labels(45, 4, ignore_fraction=0.1, singleton=True))
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1),
        [z],
    )

    def expected(phase: str, keys: tuple[str, ...]) -> tuple[int, ...]:
        # The defaults (the interpreter's or a GPU's) with the override on top.
        config = {**triton_label_supcon._default_config(40, torch.float32, phase + suffix), **overrides[phase]}
        return tuple(config[k] for k in keys)

    kernels = dict(launched)
    fwd, bwd = kernels["_label_supcon_fwd" + suffix.replace("-", "_") + "_kernel"], launched[-1][1]
    if mode == "atomic":
        assert (fwd["BLOCK"], fwd["BLOCK_D"]) == expected("fwd", ("BLOCK_M", "BLOCK_D"))
        assert (bwd["BLOCK"], bwd["BLOCK_D"]) == expected("bwd", ("BLOCK_M", "BLOCK_D"))
    else:
        assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["BLOCK_D"]) == expected("fwd", ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
        assert (bwd["BLOCK_M"], bwd["BLOCK_N"], bwd["BLOCK_D"]) == expected("bwd", ("BLOCK_M", "BLOCK_N", "BLOCK_D"))
    # The rows that need the online max use the deterministic forward's configuration.
    lse_block = triton_label_supcon._config(40, torch.float32, "fwd")["BLOCK_M"]  # overridden in deterministic mode
    assert kernels["_label_supcon_lse_kernel"]["BLOCK_M"] == lse_block


def test_label_supcon_config_override_for_one_dtype(monkeypatch):
    # A tuned configuration is keyed by the dtype it was tuned in; the plain key is for every dtype.
    from mlcontrast.ops import utils as ops_utils

    monkeypatch.setitem(ops_utils.CONFIG_OVERRIDES, "label_supcon.fwd", {"BLOCK_M": 32})
    monkeypatch.setitem(ops_utils.CONFIG_OVERRIDES, "label_supcon.fwd:float16", {"BLOCK_M": 128, "num_warps": 2})
    assert triton_label_supcon._config(64, torch.float16, "fwd")["BLOCK_M"] == 128
    assert triton_label_supcon._config(64, torch.float16, "fwd")["options"]["num_warps"] == 2
    assert triton_label_supcon._config(64, torch.float32, "fwd")["BLOCK_M"] == 32
    assert triton_label_supcon._config(64, torch.float16, "bwd") == triton_label_supcon._default_config(
        64, torch.float16, "bwd"
    )


def test_label_supcon_normalize_keeps_16_bit_rows_for_the_kernels(monkeypatch):
    # normalize=True normalises in fp32 but hands the kernels rows in the caller's dtype (tensor-core rate).
    # Spied on where the Triton op launches its forward kernel, whatever path mlcontrast.functional takes
    # to the op (the registry's torch.ops.mlcontrast_triton.label_supcon).
    seen, real_launch = [], triton_label_supcon.launch

    def recording_launch(kernel, grid):
        run = real_launch(kernel, grid)
        if not kernel.__name__.startswith("_label_supcon_fwd"):
            return run
        return lambda **kwargs: (seen.append(kwargs["Z"].dtype), run(**kwargs))[1]

    monkeypatch.setattr(triton_label_supcon, "launch", recording_launch)
    z = _rand(21, 9, dtype=torch.float16)
    (y,) = _to_device(make_labels(21, 4))
    mlcontrast.label_supcon_loss(z, y, 0.2, normalize=True, backend="triton")
    mlcontrast.multilabel_supcon_loss(_rand(5, 3, 8, dtype=torch.float16), _to_device(make_targets(5, 3))[0],
                                      backend="triton")  # fmt: skip
    assert seen == [torch.float16, torch.float16]

@pytest.mark.parametrize(
    "labels",
    [
        [-1, -1, -1, -1, -1],  # every row ignored
        [0, 1, 2, 3, 4],  # no row has a positive
        [7, -1, -1, -1, -1],  # a single valid row
        [3, 3, -1, 5, -1],  # one positive pair, one singleton
    ],
    ids=["all-ignored", "no-positives", "single-row", "one-pair"],
)
def test_label_supcon_edge_cases(labels, mode):
    # Expected gradients of exactly 0 (a pair-only row's, in exact arithmetic): the CPU kernels' come out
    # ~1e-6 by rounding, at the fp32 absolute tolerance, so these cases are Triton's; CPU's edge cases
    # (no positives, every row ignored, a single valid row) are in tests/test_label_supcon.py.
    z = _rand(5, 6)
    y = torch.tensor(labels, device=DEVICE)
    out, (grad,) = assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, reduction="none", backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, reduction="none"),
        [z],
        torch.ones(5, dtype=torch.float64, device=DEVICE),
    )
    has_positive = torch.tensor([(y == y[i]).sum() > 1 and y[i] >= 0 for i in range(5)], device=DEVICE)
    assert torch.all(out[~has_positive] == 0)
    assert torch.isfinite(grad).all()
    if not has_positive.any():
        assert torch.all(grad == 0)


def test_label_supcon_d_chunks_looped_at_run_time(monkeypatch, mode):
    # Past the shared memory that buffering all of D takes, the kernels loop over the D chunks at run
    # time (NUM_D_CHUNKS = 0) instead of unrolling them: the same results. D = 40 spans 3 chunks.
    monkeypatch.setattr(triton_label_supcon, "STATIC_D_SHARED_BYTES", 0)
    chunks, real_launch = [], triton_label_supcon.launch

    def recording_launch(kernel, grid):
        run = real_launch(kernel, grid)
        return lambda **kwargs: (chunks.append(kwargs["NUM_D_CHUNKS"]), run(**kwargs))[1]

    monkeypatch.setattr(triton_label_supcon, "launch", recording_launch)
    y = _to_device(make_labels(33, 4, ignore_fraction=0.1, singleton=True))[0]
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, reduction="none", backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, reduction="none"),
        [_rand(33, 40, scale=40**-0.5)],
        torch.randn(33, dtype=torch.float64, device=DEVICE),
    )
    assert chunks == [0, 0, 0]  # forward, online-max LSE, backward


def test_label_supcon_deterministic_mode_is_bitwise_reproducible(monkeypatch):
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", False)
    z = _rand(40, 20)
    (y,) = _to_device(make_labels(40, 5, ignore_fraction=0.1))
    runs = []
    for _ in range(2):
        x = z.clone().requires_grad_()
        loss = mlcontrast.label_supcon_loss(x, y, 0.1, normalize=True, backend="triton")
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_label_supcon_atomic_flag_from_environment(monkeypatch):
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", None)
    monkeypatch.setenv("MLCONTRAST_TRITON_ATOMIC", "1")
    assert triton_label_supcon._use_atomics()
    monkeypatch.setenv("MLCONTRAST_TRITON_ATOMIC", "0")
    assert not triton_label_supcon._use_atomics()
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", True)
    assert triton_label_supcon._use_atomics()


def test_label_supcon_atomic_and_deterministic_agree(monkeypatch):
    z = _rand(37, 18)
    (y,) = _to_device(make_labels(37, 4, ignore_fraction=0.2, singleton=True))
    upstream = torch.rand(37, device=DEVICE)
    results = {}
    for atomic in (False, True):
        monkeypatch.setattr(triton_label_supcon, "ATOMIC", atomic)
        x = z.clone().requires_grad_()
        rows = registry.op("label_supcon", "triton")(x, y, 0.1, 0.1)[0]
        (rows * upstream).sum().backward()
        results[atomic] = (rows.detach(), x.grad)
    assert_close_by_norm(results[True][0], results[False][0], torch.float32, "atomic vs deterministic loss")
    assert_close_by_norm(results[True][1], results[False][1], torch.float32, "atomic vs deterministic grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_label_supcon_rows_far_below_the_fixed_shift(dtype, mode):
    # One row 30x longer than the others sets the shift c = R^2 / t: every other row's logits sit far
    # below it, their fixed-shift sums underflow, and the online-max kernel recomputes them.
    z = _rand(45, 16, dtype=dtype, scale=16**-0.5)
    z[7] *= 30
    (y,) = _to_device(make_labels(45, 4, ignore_fraction=0.2, singleton=True))
    y[7] = y[8]
    upstream = torch.randn(45, dtype=torch.float64, device=DEVICE)
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, reduction="none", backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, reduction="none"),
        [z],
        upstream,
    )
    _, lse, _ = triton_label_supcon.label_supcon(z, y, 0.1, 0.1)
    scale_shift = triton_label_supcon._scale_and_shift(z, y, 0.1, torch.float32)
    assert (triton_label_supcon.SHIFTED_SUM_FLOOR > torch.exp2(lse / math.log(2) - scale_shift[1]))[y >= 0].sum() > 30


def test_label_supcon_every_row_through_the_online_max(monkeypatch, mode):
    # A floor of +inf sends every valid anchor row to the online-max kernel: it alone gives the LSE.
    monkeypatch.setattr(triton_label_supcon, "SHIFTED_SUM_FLOOR", float("inf"))
    z = _rand(50, 20, scale=20**-0.5)
    (y,) = _to_device(make_labels(50, 5, ignore_fraction=0.2, singleton=True))
    assert_matches(
        lambda x: registry.op("label_supcon", "triton")(x, y, 0.05, 0.07, 10, 44)[0],
        lambda x: torch.nn.functional.pad(
            reference.label_supcon_anchor_rows(x, y, 0.05, 0.07, False, 10, 44), (10, 50 - 44)
        ),
        [z],
        torch.randn(50, dtype=torch.float64, device=DEVICE),
    )


@pytest.mark.parametrize(
    "roles,fwd,bwd,symmetric",
    [
        ((0, 20, 0, 20), "_label_supcon_fwd_atomic_kernel", "_label_supcon_bwd_atomic_kernel", True),  # detached queue
        ((0, 20, 0, None), "_label_supcon_fwd_atomic_kernel", "_label_supcon_bwd_atomic_kernel", True),
        ((0, 20, 20, 0), "_label_supcon_fwd_kernel", "_label_supcon_bwd_kernel", False),  # a batch against a memory
        ((5, 40, 12, 30), "_label_supcon_fwd_kernel", "_label_supcon_bwd_kernel", False),
    ],
)
def test_label_supcon_roles_pick_their_kernels(monkeypatch, roles, fwd, bwd, symmetric):
    # With every anchor a contrast row below grad_stop, G stays symmetric: the atomic kernels run, told
    # grad_stop; otherwise the deterministic ones, the backward gated by the roles (ROLES), and the columns
    # start at contrast_start. Both against the dense definition.
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", True)
    launched = record_launches(triton_label_supcon, monkeypatch)
    start, stop, contrast_start, grad_stop = roles
    z = _rand(57, 24, scale=24**-0.5)
    (y,) = _to_device(make_labels(57, 4, ignore_fraction=0.2))
    assert_matches(
        lambda x: registry.op("label_supcon", "triton")(x, y, 0.1, 0.1, *roles)[0][start:stop],
        lambda x: reference.label_supcon_anchor_rows(x, y, 0.1, 0.1, False, *roles),
        [z],
        torch.randn(stop - start, dtype=torch.float64, device=DEVICE),
    )
    kernels = {name: kwargs for name, _, kwargs in launched}
    assert fwd in kernels and bwd in kernels, list(kernels)
    assert kernels[fwd]["CONTRAST_START"] == contrast_start
    assert kernels[bwd]["GRAD_STOP"] == (57 if grad_stop is None else grad_stop)
    if not symmetric:
        assert kernels[bwd]["ROLES"] is True


def test_dot_precision_follows_allow_tf32():
    from mlcontrast.ops.utils import dot_precision

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dot_precision(torch.float32) == "tf32" and dot_precision(torch.float16) == "ieee"
        z = _rand(20, 17)
        (y,) = _to_device(make_labels(20, 3))
        loss = mlcontrast.label_supcon_loss(z, y, 0.5, normalize=True, backend="triton")
        expected = reference.label_supcon_loss(z.double(), y, 0.5, normalize=True)
        # The interpreter ignores the precision (fp32 tolerance); TF32 has fp16's 10-bit mantissa.
        assert_close_by_norm(loss, expected, torch.float32 if INTERPRETED else torch.float16, "loss with TF32")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert dot_precision(torch.float32) == "tf32x3" and dot_precision(torch.float64) == "ieee"
        loss = mlcontrast.label_supcon_loss(z, y, 0.5, normalize=True, backend="triton")
        assert_close_by_norm(loss, expected, torch.float32, "loss with 3xTF32")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ----------------------------------------------------------------------------------------------
# GPU only: bf16, large N, determinism at scale
# ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n,d", [(1031, 128), (4099, 257)])
def test_gpu_label_supcon_large(n, d, dtype, mode):
    z = torch.randn(n, d, device="cuda").to(dtype)
    y = make_labels(n, max(1, n // 16), ignore_fraction=0.1, singleton=True).cuda()
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, normalize=True, backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, normalize=True),
        [z],
    )


@gpu
@needs_cuda
def test_gpu_label_supcon_deterministic_at_scale(monkeypatch):
    monkeypatch.setattr(triton_label_supcon, "ATOMIC", False)
    z = torch.randn(8192, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, 80, (8192,), device="cuda")
    runs = []
    for _ in range(3):
        x = z.clone().requires_grad_()
        loss = mlcontrast.label_supcon_loss(x, y, 0.1, normalize=True, backend="triton")
        loss.backward()
        runs.append((loss.detach(), x.grad))
    assert all(torch.equal(runs[0][0], r[0]) and torch.equal(runs[0][1], r[1]) for r in runs[1:])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_label_supcon_rows_far_below_the_fixed_shift(dtype, mode):
    # A few long rows set the shift; the others' fixed-shift sums underflow and are redone with an online max.
    z = F.normalize(torch.randn(3001, 128, device="cuda"), dim=1)
    z[::500] *= 20
    z = z.to(dtype)
    y = make_labels(3001, 40, ignore_fraction=0.1).cuda()
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1),
        [z],
    )

