"""The Triton backend against reference.py: losses, gradients, edge cases, determinism, registration.

Without a GPU the kernels run in the Triton interpreter on CPU tensors. The interpreter is chosen
when a kernel is decorated, i.e. when its module (mlcontrast.ops.<op>) is first imported, so this
module sets TRITON_INTERPRET=1 before importing them. Run it alone or first if another module might
import them earlier; if that happened, the module skips itself and says why. The interpreter runs the
programs one after another, so sizes stay small; the tile sizes shrink to 16 there
(mlcontrast.ops.utils), so the sizes below still cross tile boundaries (N = 33, 70; D = 40) and
leave partial tiles (N = 5, D = 7). The interpreter's bf16 tl.dot is wrong, so bf16 is GPU-only.

Tolerances come from tests/utils.py (relative error by norm): fp32 against the reference in fp64
(1e-4), fp16 against the reference in fp32 on the same upcast values (5e-3; the gradients are
rounded to fp16), bf16 (GPU) 2e-2.
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from utils import assert_close_by_norm, assert_matches, make_labels, make_targets  # noqa: E402

import mlcontrast  # noqa: E402
from mlcontrast import reference  # noqa: E402
from mlcontrast.ops import triton_unavailable_reason  # noqa: E402

_REASON = triton_unavailable_reason()
if _REASON is not None:
    pytest.skip(f"the Triton backend cannot run here: {_REASON}", allow_module_level=True)

from mlcontrast.ops import label_supcon as triton_label_supcon  # noqa: E402
from mlcontrast.ops import prototype_ce as triton_prototype_ce  # noqa: E402
from mlcontrast.ops import prototype_nce as triton_prototype_nce  # noqa: E402
from mlcontrast.ops import update_prototypes as triton_update_prototypes  # noqa: E402
from mlcontrast.ops.utils import is_interpreted  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRETED = is_interpreted(triton_label_supcon._label_supcon_fwd_kernel)
if DEVICE.type == "cpu" and not INTERPRETED:
    pytest.skip(
        "mlcontrast's Triton kernels were imported before TRITON_INTERPRET=1 was set; run this file alone "
        "or with TRITON_INTERPRET=1 in the environment",
        allow_module_level=True,
    )

# fp16 and fp32 only under the interpreter (its bf16 tl.dot is wrong); bf16 is in the GPU tests.
DTYPES = [torch.float32, torch.float16]
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


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


def test_backend_is_available():
    assert triton_unavailable_reason() is None
    assert "triton" in mlcontrast.available_backends(DEVICE)
    modules = (triton_label_supcon, triton_prototype_ce, triton_prototype_nce, triton_update_prototypes)
    kernels = [k for m in modules for name, k in vars(m).items() if name.startswith("_") and name.endswith("_kernel")]
    assert len(kernels) == 13
    assert all(is_interpreted(k) == INTERPRETED for k in kernels)


# ----------------------------------------------------------------------------------------------
# label_supcon
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(1, 7), (5, 1), (33, 40), (70, 7)])
def test_label_supcon_matches_reference(n, d, dtype, mode):
    z = _rand(n, d, dtype=dtype, scale=d**-0.5)
    (y,) = _to_device(make_labels(n, max(1, n // 6), ignore_fraction=0.2, singleton=True))
    upstream = torch.randn(n, dtype=torch.float64, device=DEVICE)  # per-row weights: "not the last layer"
    out, (grad,) = assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, 0.07, "none", backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, 0.07, "none"),
        [z],
        upstream,
        names=["features"],
    )
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert torch.all(out[y < 0] == 0)
    assert torch.all(grad[y < 0] == 0)


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
        lambda x: triton_label_supcon.label_supcon_rows(x, y, 0.1, 0.07, start, stop),
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


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_label_supcon_reductions_and_normalize(reduction, normalize):
    z = _rand(21, 9)
    (y,) = _to_device(make_labels(21, 4, ignore_fraction=0.2))
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.2, None, reduction, normalize, backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.2, None, reduction, normalize),
        [z],
    )


def test_label_supcon_normalize_keeps_16_bit_rows_for_the_kernels(monkeypatch):
    # normalize=True normalises in fp32 but hands the kernels rows in the caller's dtype (tensor-core rate).
    seen = []
    real = triton_label_supcon.label_supcon_rows
    monkeypatch.setattr(triton_label_supcon, "label_supcon_rows", lambda z, *a: (seen.append(z.dtype), real(z, *a))[1])
    z = _rand(21, 9, dtype=torch.float16)
    (y,) = _to_device(make_labels(21, 4))
    mlcontrast.label_supcon_loss(z, y, 0.2, normalize=True, backend="triton")
    mlcontrast.multilabel_supcon_loss(_rand(5, 3, 8, dtype=torch.float16), _to_device(make_targets(5, 3))[0],
                                      backend="triton")  # fmt: skip
    assert seen == [torch.float16, torch.float16]


def test_label_supcon_non_contiguous_features():
    z = _rand(12, 20).t()  # [20, 12] with strides (1, 20)
    (y,) = _to_device(make_labels(20, 3))
    assert not z.is_contiguous()
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.5, normalize=True, backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.5, normalize=True),
        [z],
    )


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


def test_label_supcon_int64_class_ids(mode):
    # Class ids are int64 (hashed or dataset ids): 2^32 + 5 and 5 are equal modulo 2^32 but different
    # classes, 2^31 and 2^40 + 3 do not fit 32 bits (2^31 would read as a negative, ignored, id). The
    # rows cross tile boundaries (N = 37 > 16) and each class has positives.
    ids = torch.tensor([2**40 + 3, 2**32 + 5, 5, 2**31, -1, 2**63 - 1])
    y = ids[torch.arange(37) % len(ids)].to(DEVICE)
    out, _ = assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, 0.1, reduction="none", backend="triton"),
        lambda x: reference.label_supcon_loss(x, y, 0.1, reduction="none"),
        [_rand(37, 8, scale=8**-0.5)],
        torch.randn(37, dtype=torch.float64, device=DEVICE),
    )
    assert torch.isfinite(out).all() and (out[y >= 0] != 0).all()


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


def test_label_supcon_mean_of_nothing_is_zero():
    z = _rand(4, 3).requires_grad_()
    loss = mlcontrast.label_supcon_loss(z, torch.full((4,), -1, device=DEVICE), backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0)


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
        rows = triton_label_supcon.label_supcon_rows(x, y, 0.1, 0.1)
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
        lambda x: triton_label_supcon.label_supcon_rows(x, y, 0.05, 0.07, 10, 44),
        lambda x: torch.nn.functional.pad(
            reference.label_supcon_anchor_rows(x, y, 0.05, 0.07, False, 10, 44), (10, 50 - 44)
        ),
        [z],
        torch.randn(50, dtype=torch.float64, device=DEVICE),
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_supcon_empty_input(reduction):
    z = _rand(0, 5).requires_grad_()
    out = mlcontrast.label_supcon_loss(
        z, torch.zeros(0, dtype=torch.long, device=DEVICE), reduction=reduction, backend="triton"
    )
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert z.grad.shape == (0, 5)


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


def test_label_supcon_statistics():
    z = _rand(9, 4)
    y = torch.tensor([0, 0, 0, 1, 1, 2, -1, 3, 3], device=DEVICE)
    loss, lse, n_pos = triton_label_supcon.label_supcon(z, y, 0.5, 0.5)
    assert n_pos.tolist() == [2, 2, 2, 1, 1, 0, 0, 1, 1]
    valid = (y >= 0).nonzero().squeeze(1)
    s = z[valid] @ z[valid].T / 0.5
    s.fill_diagonal_(float("-inf"))
    torch.testing.assert_close(lse[valid], torch.logsumexp(s, 1))
    assert lse[6] == 0  # an ignored row: 0 by the contract, as on every backend


def test_supcon_and_multilabel_supcon_through_triton():
    z = F.normalize(_rand(6, 2, 10), dim=-1)
    (labels,) = _to_device(torch.tensor([0, 1, 0, 2, 1, 0]))
    for contrast_mode in ("all", "one"):
        assert_matches(
            lambda x: mlcontrast.supcon_loss(x, labels, contrast_mode=contrast_mode, backend="triton"),
            lambda x: reference.supcon_loss(x, labels, contrast_mode=contrast_mode),
            [z],
        )
    assert_matches(
        lambda x: mlcontrast.supcon_loss(x, None, backend="triton"), lambda x: reference.supcon_loss(x, None), [z]
    )
    features = _rand(5, 2, 4, 8)
    (targets,) = _to_device(make_targets(5, 4, p_positive=0.5))
    assert_matches(
        lambda x: mlcontrast.multilabel_supcon_loss(x, targets, backend="triton"),
        lambda x: reference.multilabel_supcon_loss(x, targets),
        [features],
    )


def test_label_supcon_gradcheck_fp64(mode):
    z = torch.randn(7, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 1, -1, 2], device=DEVICE)
    assert torch.autograd.gradcheck(lambda x: triton_label_supcon.label_supcon_rows(x, y, 0.3, 0.2), (z,))


# ----------------------------------------------------------------------------------------------
# prototype_ce
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,c,d", [(1, 1, 1), (5, 3, 7), (33, 17, 40), (70, 20, 9)])
def test_prototype_ce_matches_reference(n, c, d, dtype):
    z, p = _rand(n, d, dtype=dtype), _rand(c, d, dtype=dtype)
    (y,) = _to_device(torch.randint(0, c, (n,)))
    y[torch.rand(n, device=DEVICE) < 0.2] = -1
    assert_matches(
        lambda a, b: mlcontrast.prototype_ce_loss(a, y, b, 0.1, backend="triton"),
        lambda a, b: reference.prototype_ce_loss(a, y, b, 0.1),
        [z, p],
        names=["features", "prototypes"],
    )


def test_prototype_ce_rows_and_ignored_rows():
    z, p = _rand(10, 5), _rand(4, 5)
    y = torch.tensor([0, 1, 2, 3, -1, 0, -1, 1, 2, 3], device=DEVICE)
    rows, (grad_z, _) = assert_matches(
        lambda a, b: triton_prototype_ce.prototype_ce_rows(a, y, b, 0.2),
        lambda a, b: (
            F.cross_entropy(reference._unit(a) @ reference._unit(b).T / 0.2, y.clamp(min=0), reduction="none")
            * (y >= 0)
        ),
        [z, p],
        torch.rand(10, dtype=torch.float64, device=DEVICE),
    )
    assert torch.all(rows[y < 0] == 0) and torch.all(grad_z[y < 0] == 0)


def test_prototype_ce_all_rows_ignored():
    z, p = _rand(6, 4).requires_grad_(), _rand(3, 4).requires_grad_()
    loss = mlcontrast.prototype_ce_loss(z, torch.full((6,), -1, device=DEVICE), p, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0) and torch.all(p.grad == 0)


@pytest.mark.parametrize("d", [11, 40])  # one D chunk, or three (the scratch path of the dz kernel)
def test_prototype_ce_zero_rows_and_deterministic(d):
    z, p = _rand(40, d), _rand(6, d)
    z[3] = 0  # a zero row: its norm is clamped to eps
    (y,) = _to_device(torch.randint(0, 6, (40,)))
    grads = []
    for _ in range(2):
        a, b = z.clone().requires_grad_(), p.clone().requires_grad_()
        mlcontrast.prototype_ce_loss(a, y, b, backend="triton").backward()
        grads.append((a.grad, b.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    assert_matches(
        lambda a, b: mlcontrast.prototype_ce_loss(a, y, b, backend="triton"),
        lambda a, b: reference.prototype_ce_loss(a, y, b),
        [z, p],
    )


def test_prototype_ce_gradcheck_fp64():
    z = torch.randn(6, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    p = torch.randn(4, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.tensor([0, 3, -1, 1, 1, 2], device=DEVICE)
    assert torch.autograd.gradcheck(lambda a, b: triton_prototype_ce.prototype_ce_rows(a, y, b, 0.3), (z, p))


_TRACE_PROTOTYPE_CE_BACKWARD = textwrap.dedent(
    """
    import os, logging, operator
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # no GPU driver: the mutation analysis falls back, with a warning
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mlcontrast.ops.prototype_ce as pc

    graphs = []
    traced = aot_function(
        lambda *args: pc.prototype_ce_backward(*args, 0.1), fw_compiler=lambda gm, _: graphs.append(gm) or gm
    )
    n, c, d = 20, 7, 8  # D in one chunk: the dz kernel needs no scratch
    with FakeTensorMode():  # fake CUDA tensors: traced, never run
        f = lambda *shape, dtype=torch.float32: torch.empty(*shape, device="cuda", dtype=dtype)
        traced(f(n), f(n, d), f(n, dtype=torch.long), f(c, d), f(n), f(n))
    graph = graphs[0].graph
    for node in graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            args, cloned = node.kwargs["kwargs"], node.kwargs["tensors_to_clone"]
            tensors = [args[name] for name in cloned]
            print("aliased", len(tensors) - len(set(tensors)))
    grad_z = graph.output_node().args[0][-2]
    assert grad_z.target is operator.getitem, grad_z.format_node()
    print("grad_z from", grad_z.args[1])  # the name of the kernel argument that holds it
    """
)


def test_prototype_ce_backward_traces_without_aliased_kernel_outputs():
    # A triton_op's kernel launch is functionalised under torch.compile: each argument the kernel may
    # write is cloned separately, and the result read from its clone. Two such arguments holding one
    # tensor (DZ and DZU once did, for D in one chunk) leave the returned gradient a clone never written.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _TRACE_PROTOTYPE_CE_BACKWARD], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split() == ["aliased", "0", "aliased", "0", "grad_z", "from", "DZ"], result.stdout


_PROTOTYPE_CE_TTIR = textwrap.dedent(
    """
    import os, re
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import mlcontrast.ops.prototype_ce as pc

    launches = []  # recorded, not run
    pc.launch = lambda kernel, grid: (lambda *a, **k: launches.append((kernel, a, k)))
    z, p, y = torch.randn(40, 256), torch.randn(48, 256), torch.randint(-1, 48, (40,))  # D: several chunks
    loss, lse, norm = pc.prototype_ce(z, y, p, 0.1)
    pc.prototype_ce_backward(loss, z, y, p, lse, norm, 0.1)
    for kernel, args, kwargs in launches[1:]:  # the two backward kernels
        values = dict(zip(kernel.arg_names, args), **kwargs)
        options = {k: values.pop(k) for k in ("num_warps", "num_stages") if k in values}
        signature, constexprs = {}, {}
        for param, name in zip(kernel.params, kernel.arg_names):
            value = values[name]
            if param.is_constexpr:
                signature[name], constexprs[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + {torch.float32: "fp32", torch.int64: "i64"}[value.dtype]
            else:
                signature[name] = "i32"
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ttir"]
        lines = [line.strip() for line in ttir.splitlines()]
        loaded = {m.group(1) for line in lines for m in [re.search(r"= tt.load (%[\\w.]+)", line)] if m}
        for index, line in enumerate(lines):
            stored = re.match(r"tt.store (%[\\w.]+)", line)
            if stored and stored.group(1) in loaded:  # a read-modify-write of global memory
                print(kernel.__name__, "rmw then", lines[index + 1].split(" ")[0])
    """
)


def test_prototype_ce_backward_waits_after_each_read_modify_write():
    # The dz and dp kernels add each D chunk past the first into global memory (DZU, the partials) once
    # per class chunk / row block. Load and store of a chunk get different layouts, so the next read of
    # an element may be by another warp than the one that stored it: a barrier must follow each store.
    # Checked in the TTIR for sm_90, which triton produces without a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _PROTOTYPE_CE_TTIR], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    found = [line.split() for line in result.stdout.splitlines()]
    assert [kernel for kernel, *_ in found] == ["_prototype_ce_bwd_dz_kernel", "_prototype_ce_bwd_dp_kernel"], found
    assert all(next_op.endswith(".barrier") for *_, next_op in found), found


# ----------------------------------------------------------------------------------------------
# prototype_nce
# ----------------------------------------------------------------------------------------------


def _recording_launch(module, monkeypatch, run: bool = True) -> list:
    """Records ``(kernel name, grid, keyword arguments)`` of every launch of ``module``'s kernels."""
    launched, real_launch = [], module.launch

    def recording_launch(kernel, grid):
        launcher = real_launch(kernel, grid) if run else (lambda *args, **kwargs: None)
        return lambda *args, **kwargs: (launched.append((kernel.__name__, grid, kwargs)), launcher(*args, **kwargs))

    monkeypatch.setattr(module, "launch", recording_launch)
    return launched


@pytest.mark.parametrize("b", [64, 512])
def test_prototype_nce_backward_fills_a_gpu(b, monkeypatch):
    # The backward's programs at a typical shape (C = 80, D = 256) with a GPU's configuration: one per
    # (class block, D chunk) would be 40 for 132 SMs, each serial over B; the splits over B make more.
    from mlcontrast.ops import utils as ops_utils

    monkeypatch.setattr(triton_prototype_nce, "interpreting", lambda: False)
    monkeypatch.setattr(ops_utils, "interpreting", lambda: False)  # split_count's
    launched = _recording_launch(triton_prototype_nce, monkeypatch, run=False)
    z, p = torch.zeros(b, 80, 256), torch.ones(80, 256)
    t = torch.ones(b, 80, dtype=torch.long)
    stats, logits, norm = torch.zeros(2, 80), torch.zeros(b, 80), torch.ones(b, 80)
    triton_prototype_nce.prototype_nce_backward(torch.tensor(1.0), z, p, t, stats, logits, norm, 0.1)
    ((name, grid, kwargs),) = launched
    assert name == "_prototype_nce_bwd_kernel" and math.prod(grid) >= 4 * 132, grid
    assert grid[2] * kwargs["SAMPLES_PER_SPLIT"] >= b > (grid[2] - 1) * kwargs["SAMPLES_PER_SPLIT"]


@pytest.mark.parametrize("per_split", [1, 3, 4])  # B = 11: 11, 4 or 3 splits, the last one shorter
def test_prototype_nce_backward_splits_over_samples(per_split, monkeypatch):
    monkeypatch.setattr(
        triton_prototype_nce, "split_count", lambda blocks, *_, **__: (-(-blocks // per_split), per_split)
    )
    launched = _recording_launch(triton_prototype_nce, monkeypatch)
    z, p = _rand(11, 5, 20), _rand(5, 20)
    (t,) = _to_device(make_targets(11, 5))
    t[0, 0] = 1
    assert_matches(
        lambda a, q: mlcontrast.prototype_nce_loss(a, q, t, 0.1, backend="triton"),
        lambda a, q: reference.prototype_nce_loss(a, q, t, 0.1),
        [z, p],
        names=["features", "prototypes"],
    )
    assert launched[-1][1][2] == -(-11 // per_split)  # the backward's splits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,c,d", [(1, 1, 1), (5, 3, 7), (9, 17, 40), (20, 5, 9)])
def test_prototype_nce_matches_reference(b, c, d, dtype):
    z, p = _rand(b, c, d, dtype=dtype), _rand(c, d, dtype=dtype)
    (t,) = _to_device(make_targets(b, c))
    t[0, 0] = 1  # at least one positive
    if c > 1:
        t[:, 1] = 0  # a class with known rows but no positive
    out, _ = assert_matches(
        lambda a, q: mlcontrast.prototype_nce_loss(a, q, t, 0.07, backend="triton"),
        lambda a, q: reference.prototype_nce_loss(a, q, t, 0.07),
        [z, p],
        names=["features", "prototypes"],
    )
    assert out.dtype == torch.float32 and out.dim() == 0


@pytest.mark.parametrize("fill", [0, -1], ids=["all-negative", "all-unknown"])
def test_prototype_nce_without_positives_is_zero(fill):
    z, p = _rand(4, 3, 5).requires_grad_(), _rand(3, 5).requires_grad_()
    t = torch.full((4, 3), fill, device=DEVICE)
    loss = mlcontrast.prototype_nce_loss(z, p, t, backend="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z.grad == 0) and torch.all(p.grad == 0)


def test_prototype_nce_gradcheck_fp64():
    z = torch.randn(4, 3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    p = torch.randn(3, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    t = torch.tensor([[1, 0, -1], [0, 1, 1], [1, -1, 0], [-1, 0, 0]], device=DEVICE)
    assert torch.autograd.gradcheck(lambda a, b: triton_prototype_nce.prototype_nce(a, b, t, 0.2), (z, p))


# ----------------------------------------------------------------------------------------------
# update_prototypes_
# ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["one-hot", "atomic"])
def class_sums(request, monkeypatch):
    """Runs a test with each way of forming the class sums of update_prototypes_."""
    if request.param == "atomic":
        monkeypatch.setattr(triton_update_prototypes, "ONE_HOT_MAX_CLASSES", 0)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,c,d", [(5, 3, 7), (70, 20, 40)])  # 70 x 20 x 40: 2 splits, 2 class and 3 D blocks
def test_update_prototypes_matches_reference(n, c, d, normalize, dtype, class_sums):
    protos = F.normalize(_rand(c, d), dim=1).to(dtype)
    z = _rand(n, d, dtype=dtype)
    (y,) = _to_device(make_labels(n, c, ignore_fraction=0.2))
    y[y == 1] = 2  # class 1 absent
    expected = protos.clone()
    reference.update_prototypes_(expected, z, y, 0.9, normalize)
    actual = protos.clone()
    out = mlcontrast.update_prototypes_(actual, z, y, 0.9, normalize, backend="triton")
    assert out is actual and actual.dtype == dtype
    absent = torch.tensor([not (y == k).any() for k in range(c)], device=DEVICE)
    assert absent[1]
    assert torch.equal(actual[absent], protos[absent])  # bit for bit
    assert_close_by_norm(actual, expected, dtype, "prototypes")


def test_update_prototypes_one_hot_sums_are_reproducible_and_mix_dtypes():
    protos = F.normalize(_rand(20, 24), dim=1)
    z = _rand(90, 24)
    (y,) = _to_device(make_labels(90, 20, ignore_fraction=0.1))
    runs = []
    for _ in range(2):
        actual = protos.clone()
        mlcontrast.update_prototypes_(actual, z, y, 0.7, True, backend="triton")
        runs.append(actual)
    assert torch.equal(runs[0], runs[1])
    # fp64 prototypes with fp32 rows, and fp32 prototypes with fp64 rows.
    for p_dtype, z_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float64)):
        expected = protos.to(p_dtype)
        reference.update_prototypes_(expected, z.to(z_dtype), y, 0.7, True)
        actual = protos.to(p_dtype)
        mlcontrast.update_prototypes_(actual, z.to(z_dtype), y, 0.7, True, backend="triton")
        assert_close_by_norm(actual, expected, torch.float32, f"{p_dtype} prototypes, {z_dtype} rows")


def test_update_prototypes_class_sums_never_single_pass_tf32(monkeypatch):
    # The one-hot products are documented as exact sums: with TF32 allowed they must still not round
    # the fp32 rows to TF32's 10-bit mantissa (the one-hot factor is exact, so 3xTF32 is enough).
    launched = _recording_launch(triton_update_prototypes, monkeypatch)
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        protos, z = _rand(3, 6), _rand(8, 6)
        y = torch.tensor([0, 0, 2, 2, 2, -1, 0, 2], device=DEVICE)
        expected = protos.clone()
        reference.update_prototypes_(expected, z, y, 0.8, True)
        mlcontrast.update_prototypes_(protos, z, y, 0.8, True, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert_close_by_norm(protos, expected, torch.float32, "prototypes")
    precisions = [kwargs["PRECISION"] for name, _, kwargs in launched if name == "_class_sums_kernel"]
    assert precisions == ["tf32x3"]


def test_update_prototypes_label_level_targets_and_no_rows():
    protos = _rand(4, 6)
    features = _rand(3, 4, 6)
    (targets,) = _to_device(make_targets(3, 4, p_positive=0.5))
    expected = protos.clone()
    mlcontrast.update_prototypes_(expected, features, targets, 0.5, backend="torch")
    actual = protos.clone()
    mlcontrast.update_prototypes_(actual, features, targets, 0.5, backend="triton")
    assert_close_by_norm(actual, expected, torch.float32, "prototypes")
    untouched = protos.clone()
    mlcontrast.update_prototypes_(untouched, _rand(5, 6), torch.full((5,), -1, device=DEVICE), backend="triton")
    assert torch.equal(untouched, protos)


def test_update_prototypes_non_contiguous_prototypes():
    base = _rand(6, 3)
    protos = base.t()  # [3, 6] view with strides (1, 3): updated through the view
    z = _rand(8, 6)
    y = torch.tensor([0, 0, 2, 2, 2, -1, 0, 2], device=DEVICE)
    expected = protos.clone()
    reference.update_prototypes_(expected, z, y, 0.8, True)
    mlcontrast.update_prototypes_(protos, z, y, 0.8, True, backend="triton")
    assert_close_by_norm(base.t(), expected, torch.float32, "prototypes")
    assert torch.equal(base.t()[1], expected[1])


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------


def _opcheck_cases():
    z, p = _rand(6, 5), _rand(3, 5)
    y = torch.tensor([0, 0, 1, -1, 2, 1], device=DEVICE)
    t = torch.tensor([[1, 0, -1], [0, 1, 1]], device=DEVICE)
    ops = torch.ops.mlcontrast_triton
    return [
        ("label_supcon", ops.label_supcon.default, (z.requires_grad_(), y, 0.1, 0.2, 1, 4)),
        ("prototype_ce", ops.prototype_ce.default, (z.detach().requires_grad_(), y, p.requires_grad_(), 0.1)),
        ("prototype_nce", ops.prototype_nce.default, (z[:6].reshape(2, 3, 5).detach().requires_grad_(), p, t, 0.1)),
        ("update_prototypes_", ops.update_prototypes_.default, (p.detach().clone(), z.detach(), y, 0.9, True)),
    ]


@pytest.mark.parametrize("case", range(4), ids=["label_supcon", "prototype_ce", "prototype_nce", "update_prototypes_"])
def test_opcheck(case):
    _, op, args = _opcheck_cases()[case]
    # test_aot_dispatch_dynamic is left out: it re-traces with symbolic shapes, slow in the interpreter.
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    # aot_eager: the graph capture (what fullgraph=True checks) without Inductor's C++ compile of the
    # CPU code around the ops, which would add ~15 s here.
    z, p = _rand(12, 6), _rand(3, 6)
    y = torch.tensor([0, 1, 2, 0, 1, 2, -1, 0, 1, 2, 2, 0], device=DEVICE)

    def loss_fn(a, b):
        return mlcontrast.label_supcon_loss(a, y, 0.1, normalize=True, backend="triton") + mlcontrast.prototype_ce_loss(
            a, y, b, 0.1, backend="triton"
        )

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    assert_matches(compiled, loss_fn, [z, p])


_TRACE_TRITON_OPS = textwrap.dedent(
    """
    import os, logging
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # no GPU driver: the mutation analysis falls back, with a warning
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mlcontrast.ops.label_supcon as ls, mlcontrast.ops.prototype_ce as pc
    import mlcontrast.ops.prototype_nce as pn, mlcontrast.ops.update_prototypes as up

    def everything(z, y, p, t):
        loss, lse, npos = ls.label_supcon(z, y, 0.1, 0.1)
        loss_atomic = ls.label_supcon(z, y, 0.1, 0.1, 0, None, True)[0]
        g1 = ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=False)
        g2 = ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=True)
        l2, lse2, norm2 = pc.prototype_ce(z, y, p, 0.1)
        g3 = pc.prototype_ce_backward(l2, z, y, p, lse2, norm2, 0.1)
        z3, p3 = z.view(4, 5, 8), p[:5]
        l3, st, lg, nm = pn.prototype_nce_forward(z3, p3, t, 0.1)
        g4 = pn.prototype_nce_backward(l3, z3, p3, t, st, lg, nm, 0.1)
        q = p.clone()
        up.update_prototypes_(q, z, y, 0.9, True)
        return loss, loss_atomic, g1, g2, g3, g4, q

    graphs = []
    traced = aot_function(everything, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)
    with FakeTensorMode():  # fake CUDA tensors: traced, never run
        z = torch.empty(20, 8, device="cuda", dtype=torch.float16)
        y = torch.empty(20, device="cuda", dtype=torch.long)
        p = torch.empty(7, 8, device="cuda", dtype=torch.float16)
        t = torch.empty(4, 5, device="cuda", dtype=torch.long)
        traced(z, y, p, t)
    print("launches", graphs[0].count("triton_kernel_wrapper_functional("))
    print("opaque", graphs[0].count("mlcontrast_triton"))
    """
)


def test_triton_ops_trace_into_their_kernels_without_a_gpu():
    # Without the interpreter the ops are torch.library.triton_op: AOTAutograd (what torch.compile
    # uses) must see through them to the 13 kernel launches, with no data-dependent shapes or host
    # syncs in their bodies. Run on fake CUDA tensors in a fresh process (no TRITON_INTERPRET).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE_TRITON_OPS], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launches 13" in result.stdout and "opaque 0" in result.stdout, result.stdout


# ----------------------------------------------------------------------------------------------
# Compiling every kernel for a GPU target (opt-in: minutes on 2 cores)
# ----------------------------------------------------------------------------------------------

_COMPILE_CHECK = textwrap.dedent(
    """
    import os, re, shutil, subprocess, sys, tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    import torch, triton
    import triton.backends.nvidia
    PTXAS = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "ptxas")
    PTXAS = PTXAS if os.path.exists(PTXAS) else shutil.which("ptxas")
    from triton.backends.compiler import GPUTarget
    import mlcontrast.ops.label_supcon as ls, mlcontrast.ops.prototype_ce as pc
    import mlcontrast.ops.prototype_nce as pn, mlcontrast.ops.update_prototypes as up
    from benchmarks.ttgir_label_supcon import launch_source, recorded_launches

    dtype = getattr(torch, sys.argv[1])
    z, p = torch.randn(208, 256).to(dtype), torch.randn(48, 256).to(dtype)  # D = 256: the targets' width
    y, t = torch.randint(-1, 48, (208,)), torch.randint(-1, 2, (4, 48))
    with recorded_launches(ls, pc, pn, up) as launches:  # record every launch instead of running it
        loss, lse, npos = ls.label_supcon(z, y, 0.1, 0.1)
        ls.label_supcon(z, y, 0.1, 0.1, 0, None, True)
        ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=False)
        ls.label_supcon_backward(loss, z, y, lse, npos, 0.1, 0.1, atomic=True)
        l2, lse2, norm2 = pc.prototype_ce(z, y, p, 0.1)
        pc.prototype_ce_backward(l2, z, y, p, lse2, norm2, 0.1)
        z3 = z[:192].reshape(4, 48, 256)
        l3, st, lg, nm = pn.prototype_nce_forward(z3, p, t, 0.1)
        pn.prototype_nce_backward(l3, z3, p, t, st, lg, nm, 0.1)
        up.update_prototypes_(p, z, y, 0.9, True)
        up.ONE_HOT_MAX_CLASSES = 0  # and the atomic class sums
        up.update_prototypes_(p, z, y, 0.9, True)

    for kernel, args, kwargs in launches:
        source, options = launch_source(kernel, args, kwargs)
        compiled = triton.compile(source, target=GPUTarget("cuda", int(sys.argv[2]), 32), options=options)
        assert compiled.metadata.shared <= 100 * 1024, (kernel.__name__, compiled.metadata.shared)
        # Registers and spills, from ptxas on the kernel's PTX.
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
            ptx.write(compiled.asm["ptx"])
            ptx.flush()
            arch = "sm_90a" if sys.argv[2] == "90" else "sm_" + sys.argv[2]
            info = subprocess.run([PTXAS, "-arch=" + arch, "-v", ptx.name, "-o", os.devnull],
                                  capture_output=True, text=True).stderr
        spills = sum(int(n) for n in re.findall(r"([0-9]+) bytes spill stores", info))
        registers = max(int(n) for n in re.findall(r"Used ([0-9]+) registers", info))
        print(kernel.__name__, "shared", compiled.metadata.shared, "registers", registers, "spills", spills)
        # The 16-bit kernels (the fast path) and label_supcon's fp32 ones but the atomic backward (3xTF32
        # on symmetric tiles) must not spill on sm_90 (the H100/H200 of the targets), with the pinned
        # triton or 3.6; the others are reported.
        fp32_checked = (dtype == torch.float32 and kernel.fn.__module__.endswith("label_supcon_kernels")
                        and kernel.__name__ != "_label_supcon_bwd_atomic_kernel")
        if (dtype in (torch.float16, torch.bfloat16) or fp32_checked) and sys.argv[2] == "90":
            blocks = {k: v for k, v in dict(zip(kernel.arg_names, args), **kwargs).items() if "BLOCK" in k}
            assert spills == 0, (kernel.__name__, blocks, options, info)
    """
)


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for benchmarks.*

_PIPELINE_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    from benchmarks.ttgir_label_supcon import dot_loops, label_supcon_ttgir, loop_evidence

    dtype, dim = getattr(torch, sys.argv[1]), int(sys.argv[2])
    for kernel, ttgir in label_supcon_ttgir(dtype, dim, arch=90).items():
        for nested, body in dot_loops(ttgir):
            evidence = loop_evidence(body)
            pipelined = (not nested and evidence["async_copy_global_to_local"] > 0 and evidence["carries_token"]
                         and evidence["sync_tile_loads"] == 0)
            print(kernel, "pipelined" if pipelined else "NOT pipelined", "nested" if nested else "", evidence)
    """
)


@pytest.mark.parametrize("dtype,dim", [("bfloat16", 256), ("float16", 128), ("float32", 64)])
def test_label_supcon_column_loops_are_pipelined_for_sm90(dtype, dim):
    # The sm_90 TTGIR (no GPU, no ptxas: seconds): every loop of the deterministic kernels that does a
    # matrix product is the column sweep, innermost, and fetches the next column tile with asynchronous
    # copies carried across iterations; no 2-D tile is loaded synchronously in it.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _PIPELINE_CHECK, dtype, str(dim)], env=env, capture_output=True, text=True, cwd=_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.splitlines()
    for kernel in ("_label_supcon_fwd_kernel", "_label_supcon_lse_kernel", "_label_supcon_bwd_kernel"):
        loops = [line for line in lines if line.startswith(kernel + " ")]
        assert loops and not any("NOT pipelined" in line for line in loops), result.stdout


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("MLCONTRAST_COMPILE_CHECK", "0") != "1",
    reason="opt-in (MLCONTRAST_COMPILE_CHECK=1): compiles every kernel to a cubin, about a minute per dtype",
)
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_kernels_compile_for_gpu_without_a_gpu(dtype, arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _COMPILE_CHECK, dtype, str(arch)], env=env, capture_output=True, text=True, cwd=_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    print(result.stdout)  # shared memory, registers and spills of every kernel (pytest -s shows them)
    assert result.stdout.count("shared") == 15, result.stdout


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


@gpu
@needs_cuda
def test_gpu_update_prototypes_is_reproducible():
    z = torch.randn(16384, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(-1, 80, (16384,), device="cuda")
    protos = F.normalize(torch.randn(80, 256, device="cuda"), dim=1)
    runs = []
    for _ in range(3):
        actual = protos.clone()
        mlcontrast.update_prototypes_(actual, z, y, 0.9, True, backend="triton")
        runs.append(actual)
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    expected = protos.clone()
    reference.update_prototypes_(expected, z, y, 0.9, True)
    assert_close_by_norm(runs[0], expected, torch.float32, "prototypes")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_prototype_ops_low_precision(dtype):
    z, p = torch.randn(2053, 256, device="cuda").to(dtype), torch.randn(80, 256, device="cuda").to(dtype)
    y = torch.randint(-1, 80, (2053,), device="cuda")
    assert_matches(
        lambda a, b: mlcontrast.prototype_ce_loss(a, y, b, 0.1, backend="triton"),
        lambda a, b: reference.prototype_ce_loss(a, y, b, 0.1),
        [z, p],
    )
    z3 = torch.randn(64, 80, 256, device="cuda").to(dtype)
    t = make_targets(64, 80).cuda()
    assert_matches(
        lambda a, b: mlcontrast.prototype_nce_loss(a, b, t, 0.07, backend="triton"),
        lambda a, b: reference.prototype_nce_loss(a, b, t, 0.07),
        [z3, p],
    )
    protos = F.normalize(p.float(), dim=1).to(dtype)
    expected = protos.clone()
    reference.update_prototypes_(expected, z, y, 0.99, True)
    mlcontrast.update_prototypes_(protos, z, y, 0.99, True, backend="triton")
    assert_close_by_norm(protos, expected, dtype, "prototypes")


@gpu
@needs_cuda
def test_gpu_torch_compile_traces_into_the_kernels():
    z = torch.randn(512, 64, device="cuda")
    y = torch.randint(0, 10, (512,), device="cuda")

    def loss_fn(a):
        return mlcontrast.label_supcon_loss(a, y, 0.1, normalize=True, backend="triton")

    compiled = torch.compile(loss_fn, fullgraph=True)
    assert_matches(compiled, loss_fn, [z])
