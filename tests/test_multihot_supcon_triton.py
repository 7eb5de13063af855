"""The Triton kernels of multihot_supcon: the op's four outputs and its gradient against a dense computation,
every mode, the anchor range, the exact Jaccard threshold, the run-time chunk loops, the online-max
fallback, and the sm_90 TTGIR of the kernels (compiled without a GPU).

The public function on every backend (Triton included, small sizes) is tests/test_multihot_supcon.py.
Without a GPU the kernels run in the Triton interpreter (tests/conftest.py), with tiles of 16: the sizes
below (R = 37, 45; D = 40; C = 21) leave partial tiles and cross the D, dZ-slab and label chunk
boundaries. Its bf16 tl.dot is wrong: fp32 and fp16 here.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from utils import assert_close_by_norm, backend_table, grads

from mlcontrast import reference

TRITON = backend_table()["triton"]
if TRITON.reason is not None:
    pytest.skip(f"the Triton backend cannot run here: {TRITON.reason}", allow_module_level=True)

from mlcontrast.ops import multihot_supcon as triton_multihot  # noqa: E402

DEVICE = TRITON.device
MODES = ["jaccard", "any", "all", "mulsupcon"]
DTYPES = [torch.float32, torch.float16]  # bf16 only on a GPU (the interpreter's bf16 tl.dot is wrong)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(r: int, d: int, c: int, dtype=torch.float32, p: float = 0.12):
    """Rows of norm ~1 and sparse multi-hot uint8 targets with a duplicated label set and an empty row."""
    z = (torch.randn(r, d) * d**-0.5).to(device=DEVICE, dtype=dtype)
    y = (torch.rand(r, c) < p).to(torch.uint8)
    y[5], y[r - 1] = y[6], 0  # r > 7
    return z, y.to(DEVICE)


def _dense(z, y, t, tb, positives, threshold, start, stop):
    """``(loss, lse, coef, count)`` ``[R]`` in fp64 with the R x R matrices: the op's contract."""
    z = z.detach().to(torch.float64)
    r = z.shape[0]
    loss, counted = reference.multihot_supcon_anchor_rows(z, y, t, tb, positives, threshold, False, start, stop)
    anchors = torch.arange(start, stop, device=z.device)
    not_self = anchors[:, None] != torch.arange(r, device=z.device)[None, :]
    lse = (z[start:stop] @ z.T / t).masked_fill(~not_self, float("-inf")).logsumexp(1)
    if positives == "mulsupcon":
        count = coef = counted.to(torch.float64)
    else:
        y64 = y.to(torch.float64)
        weight, positive = reference._multihot_positives(y64[start:stop], y64, not_self, positives, threshold)
        count = positive.sum(1).to(torch.float64)
        coef = weight.sum(1) / count.clamp(min=1)
    pad = (start, r - stop)
    return tuple(torch.nn.functional.pad(v, pad) for v in (loss, lse, coef, count))


def _check_op(z, y, positives, threshold=0.5, start=0, stop=None, t=0.1, tb=0.07):
    """The op's outputs and its gradient (random upstream) against :func:`_dense`; returns the outputs."""
    stop = z.shape[0] if stop is None else stop
    x = z.clone().requires_grad_()
    outputs = triton_multihot.multihot_supcon(x, y, t, tb, positives, threshold, start, stop)
    expected = _dense(z, y, t, tb, positives, threshold, start, stop)
    for name, a, e in zip(("loss", "lse", "coef", "count"), outputs, expected):
        assert a.dtype == torch.float32 and a.shape == (z.shape[0],), name
        finite = torch.isfinite(e)
        assert torch.equal(torch.isfinite(a), finite), name
        assert_close_by_norm(a[finite], e[finite], z.dtype if name in ("loss", "lse") else torch.float32, name)
    assert torch.equal(outputs[3], expected[3].float()), "counts are exact"
    upstream = torch.randn(z.shape[0], dtype=torch.float64, device=DEVICE)
    (grad,) = grads(outputs[0].double(), [x], upstream)
    x64 = z.detach().double().requires_grad_()
    (expected_grad,) = grads(_dense_loss(x64, y, t, tb, positives, threshold, start, stop), [x64], upstream)
    assert grad.dtype == z.dtype
    assert_close_by_norm(grad, expected_grad, z.dtype, "gradient")
    return outputs, grad


def _dense_loss(z, y, t, tb, positives, threshold, start, stop):
    loss, _ = reference.multihot_supcon_anchor_rows(z, y, t, tb, positives, threshold, False, start, stop)
    return torch.nn.functional.pad(loss, (start, z.shape[0] - stop))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positives", MODES)
@pytest.mark.parametrize("r,d,c,anchors", [(37, 40, 21, (3, 30)), (45, 12, 5, (0, 45))], ids=["anchors", "all-rows"])
def test_outputs_and_gradient_match_dense(r, d, c, anchors, positives, dtype):
    # Partial tiles everywhere; D = 40 spans three D chunks and dZ slabs, C = 21 two label chunks.
    z, y = _problem(r, d, c, dtype)
    outputs, _ = _check_op(z, y, positives, 1 / 3, *anchors)
    start, stop = anchors
    for value in outputs:
        assert not value[:start].any() and not value[stop:].any()


@pytest.mark.parametrize(
    "anchors", [(0, 16), (16, 33), (9, 9), (36, 37)], ids=["first-block", "middle", "none", "last"]
)
def test_anchor_ranges(anchors):
    # Row blocks outside the anchors visit only the anchors' column tiles in the backward.
    z, y = _problem(37, 12, 7, p=0.3)
    for positives in ("jaccard", "mulsupcon"):
        _check_op(z, y, positives, 0.25, *anchors)


@pytest.mark.parametrize("threshold", [1 / 3, 2 / 3, 3 / 7, 0.3, 1.0])
def test_overlap_exactly_at_the_threshold_counts(threshold):
    # Rows 1..4 overlap row 0 = {0, 1, 2} at Jaccard 2/3, 1/3, 3/7 and 3/10 (row 5 not at all): the pairs
    # exactly at the threshold are positives, as the fp64 ratio says (2/3 rounds up in fp64, 1/3 down).
    rows = [[1, 1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]]  # fmt: skip
    y = torch.tensor(rows, dtype=torch.uint8, device=DEVICE)
    z = (torch.randn(6, 8) / 8**0.5).to(DEVICE)
    outputs, _ = _check_op(z, y, "jaccard", threshold)
    expected = sum(o / u >= threshold for o, u in [(2, 3), (1, 3), (3, 7), (3, 10)])
    assert outputs[3][0].item() == expected == {1 / 3: 3, 2 / 3: 1, 3 / 7: 2, 0.3: 4, 1.0: 0}[threshold]


def test_least_passing_ratio_is_the_fp64_decision():
    # o u* >= o* u  <=>  fp64(o / u) >= threshold, for every pair of counts up to C, thresholds near ratios.
    c = 12
    pairs = [(o, u) for u in range(1, c + 1) for o in range(1, u + 1)]
    thresholds = sorted({o / u for o, u in pairs} | {math.nextafter(o / u, 0) for o, u in pairs} | {0.31, 0.5001})
    for threshold in thresholds:
        o_star, u_star = triton_multihot._least_passing_ratio(threshold, c)
        assert [o * u_star >= o_star * u for o, u in pairs] == [o / u >= threshold for o, u in pairs], threshold


@pytest.mark.parametrize("positives", MODES)
def test_edge_cases(positives):
    # No labels anywhere; one row (nothing to contrast: LSE -inf); every row the same label set.
    z = (torch.randn(7, 5) / 5**0.5).to(DEVICE)
    outputs, grad = _check_op(z, torch.zeros(7, 4, dtype=torch.uint8, device=DEVICE), positives)
    assert not outputs[0].any() and not outputs[3].any() and not grad.any()
    loss, lse, coef, count = triton_multihot.multihot_supcon(z[:1], torch.ones(1, 4, dtype=torch.uint8,
                                                             device=DEVICE), 0.1, 0.1, positives, 0.5)  # fmt: skip
    assert lse.item() == float("-inf") and loss.item() == 0 and coef.item() == 0 and count.item() == 0
    outputs, _ = _check_op(z, torch.ones(7, 4, dtype=torch.uint8, device=DEVICE), positives)
    assert torch.all(outputs[3] == (4 if positives == "mulsupcon" else 6))  # 4 label anchors, or the 6 other rows


def test_chunks_looped_at_run_time(monkeypatch):
    # Past the shared memory that buffering all of D (all of C) takes, the kernels loop over the chunks at
    # run time (NUM_D_CHUNKS = NUM_C_CHUNKS = 0): the same results. D = 40 and C = 21 span several chunks.
    monkeypatch.setattr(triton_multihot, "STATIC_D_SHARED_BYTES", 0)
    monkeypatch.setattr(triton_multihot, "STATIC_C_SHARED_BYTES", 0)
    launched, real_launch = [], triton_multihot.launch

    def recording_launch(kernel, grid):
        run = real_launch(kernel, grid)
        return lambda **kwargs: (launched.append((kwargs["NUM_D_CHUNKS"], kwargs.get("NUM_C_CHUNKS"))), run(**kwargs))

    monkeypatch.setattr(triton_multihot, "launch", recording_launch)
    z, y = _problem(37, 40, 21)
    _check_op(z, y, "jaccard", 0.25, 2, 35)
    assert launched == [(0, 0), (0, None), (0, 0)]  # forward, online-max LSE, backward


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("positives", ["jaccard", "mulsupcon"])
def test_rows_far_below_the_fixed_shift(positives, dtype):
    # One row 30x longer than the others sets the shift c = R^2 / t: every other row's fixed-shift sum
    # underflows; label_supcon's online-max kernel recomputes their LSE, and the backward takes two exps.
    z, y = _problem(45, 16, 6, dtype, p=0.3)
    z[7] *= 30
    outputs, _ = _check_op(z, y, positives, 0.25)
    scale_shift = triton_multihot._scale_and_shift(z, None, 0.1, torch.float32)
    shifted = torch.exp2(outputs[1] / math.log(2) - scale_shift[1])
    assert (shifted < triton_multihot.SHIFTED_SUM_FLOOR).sum() > 30


def test_every_row_through_the_online_max(monkeypatch):
    # A floor of +inf sends every anchor row to the online-max kernel: it alone gives the LSE.
    monkeypatch.setattr(triton_multihot, "SHIFTED_SUM_FLOOR", float("inf"))
    z, y = _problem(37, 20, 9, p=0.25)
    _check_op(z, y, "any", 0.5, 4, 33, t=0.05)


def test_deterministic():
    # No atomics: the same bits on every run.
    z, y = _problem(45, 24, 9, p=0.25)
    x = z.clone().requires_grad_()
    runs = []
    for _ in range(2):
        loss = triton_multihot.multihot_supcon(x, y, 0.1, 0.1, "jaccard", 0.3)[0]
        runs.append((loss, grads(loss.sum(), [x])[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_bad_mode_and_threshold_raise():
    z, y = _problem(9, 4, 3)
    with pytest.raises(ValueError, match="positives"):
        triton_multihot.multihot_supcon(z, y, 0.1, 0.1, "some", 0.5)
    with pytest.raises(ValueError, match="threshold"):
        triton_multihot.multihot_supcon(z, y, 0.1, 0.1, "jaccard", 0.0)


# ----------------------------------------------------------------------------------------------
# The kernels compiled for sm_90 without a GPU (TTGIR: seconds)
# ----------------------------------------------------------------------------------------------

_TTGIR_CHECK = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import mlcontrast.ops.multihot_supcon as mh
    from benchmarks.ttgir_label_supcon import dot_loops, launch_source, loop_evidence, recorded_launches, to_ttgir

    dtype, dim = getattr(torch, sys.argv[1]), int(sys.argv[2])
    z, y = torch.randn(208, dim).to(dtype), (torch.rand(208, 80) < 0.04).to(torch.uint8)  # C = 80: one chunk
    with recorded_launches(mh) as launches:
        for positives in ("jaccard", "mulsupcon"):
            loss, lse, coef, count = mh.multihot_supcon(z, y, 0.1, 0.1, positives, 0.5)
            mh.multihot_supcon_backward(loss, z, y, lse, coef, count, 0.1, 0.1, positives, 0.5)
    for kernel, args, kwargs in launches:
        mode = dict(zip(kernel.arg_names, args), **kwargs).get("MODE", "-")
        ttgir = to_ttgir(*launch_source(kernel, args, kwargs), arch=90)
        i8_dots = sum(("warp_group_dot " in line or "tt.dot " in line) and "xi8" in line for line in ttgir.splitlines())
        for nested, body in dot_loops(ttgir):
            evidence = loop_evidence(body)
            pipelined = (not nested and evidence["async_copy_global_to_local"] > 0 and evidence["carries_token"]
                         and evidence["sync_tile_loads"] == 0)
            print(kernel.__name__, mode, "pipelined" if pipelined else "NOT_pipelined", "i8_dots", i8_dots, evidence)
    """
)


@pytest.mark.parametrize("dtype,dim", [("float16", 128), ("bfloat16", 256), ("float32", 64)])
def test_column_loops_are_pipelined_for_sm90(dtype, dim):
    # The sm_90 TTGIR of every launch (both modes, forward and backward): each loop with a matrix product
    # is the column sweep, innermost, with asynchronous copies of the next tiles carried across iterations
    # and no synchronous 2-D tile load; the pair modes' overlap product is an int8 wgmma.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _TTGIR_CHECK, dtype, str(dim)], env=env, capture_output=True, text=True, cwd=_ROOT
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line.split(" ", 4) for line in result.stdout.splitlines()]
    kernels = {(kernel, mode) for kernel, mode, *_ in lines}
    assert kernels == {("_multihot_supcon_fwd_kernel", "0"), ("_multihot_supcon_fwd_kernel", "3"),
                       ("_multihot_supcon_bwd_kernel", "0"), ("_multihot_supcon_bwd_kernel", "3"),
                       ("_label_supcon_lse_kernel", "-")}, result.stdout  # fmt: skip
    assert all(pipelined == "pipelined" for _, _, pipelined, *_ in lines), result.stdout
    for kernel, mode, _, _, rest in lines:  # rest: the count of int8 products, then the loop's evidence
        assert (int(rest.split(" ", 1)[0]) > 0) == (mode == "0"), (kernel, mode, rest)


_TRACE = textwrap.dedent(
    """
    import os, logging
    os.environ.pop("TRITON_INTERPRET", None)
    logging.disable(logging.WARNING)  # no GPU driver: the mutation analysis falls back, with a warning
    import torch
    from functorch.compile import aot_function
    from torch._subclasses.fake_tensor import FakeTensorMode
    import mlcontrast.ops.multihot_supcon as mh

    def everything(z, y):
        out = []
        for positives in ("jaccard", "mulsupcon"):
            loss, lse, coef, count = mh.multihot_supcon(z, y, 0.1, 0.1, positives, 0.5, 3, 17)
            out.append(mh.multihot_supcon_backward(loss, z, y, lse, coef, count, 0.1, 0.1, positives, 0.5, 3, 17))
        return out

    graphs = []
    traced = aot_function(everything, fw_compiler=lambda gm, _: graphs.append(gm.code) or gm)
    with FakeTensorMode():  # fake CUDA tensors: traced, never run
        traced(torch.empty(20, 8, device="cuda", dtype=torch.float16),
               torch.empty(20, 5, device="cuda", dtype=torch.uint8))
    print("launches", graphs[0].count("triton_kernel_wrapper_functional("))
    print("opaque", graphs[0].count("mlcontrast_triton"))
    """
)


def test_ops_trace_into_their_kernels_without_a_gpu():
    # Without the interpreter the ops are torch.library.triton_op: AOTAutograd (torch.compile) sees through
    # them to their 6 kernel launches (forward, online-max LSE and backward, per mode): no data-dependent
    # shapes or host syncs in the launchers. Fake CUDA tensors in a fresh process (no TRITON_INTERPRET).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _TRACE], env=env, capture_output=True, text=True, cwd=_ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "launches 6" in result.stdout and "opaque 0" in result.stdout, result.stdout
