"""The label_supcon_queue op (a batch against a detached queue, contract: mlcontrast.ops.contract) against the
dense definition: the per-row losses, every saved statistic (queue_mean included), the batch's gradient, the
queue normalised in the kernel or used as given, ignored rows on both sides, anchor ranges, and the public
label_supcon_loss taking it for detached reference rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import assert_close_by_norm, make_labels, record_op_calls

import mlcontrast
from mlcontrast import reference
from mlcontrast.ops import contract, registry

BACKENDS = [b for b in contract.FUSED_OPS["label_supcon_queue"].backends if b in mlcontrast.available_backends("cpu")]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no backend with the label_supcon_queue op here")


def _dense(z, y, queue, queue_labels, t, tb, normalize_queue, start, stop, grad_stop=None):
    """(loss, lse, n_pos, queue_mean) of the anchors start .. stop, densely, from reference.py's rows (batch rows
    from ``grad_stop`` on contrasted detached, as the queue)."""
    q = F.normalize(queue, dim=1, eps=1e-8) if normalize_queue else queue
    n = z.shape[0]
    rows, labels = torch.cat([z, q]), torch.cat([y, queue_labels])
    loss = torch.zeros(n, dtype=z.dtype)
    detached_from = n if grad_stop is None else grad_stop
    loss[start:stop] = reference.label_supcon_anchor_rows(rows, labels, t, tb, False, start, stop, 0, detached_from)
    s = z[start:stop] @ rows.T / t
    valid = labels >= 0
    contrast = valid[None, :] & (torch.arange(rows.shape[0])[None, :] != torch.arange(start, stop)[:, None])
    contrast &= valid[start:stop, None]
    lse = torch.zeros(n, dtype=z.dtype)
    lse[start:stop] = torch.where(valid[start:stop], s.masked_fill(~contrast, float("-inf")).logsumexp(1), 0.0)
    n_pos = torch.zeros(n, dtype=z.dtype)
    n_pos[start:stop] = (contrast & (labels[None, :] == y[start:stop, None])).sum(1).to(z.dtype)
    p = torch.where(contrast, (s - lse[start:stop, None]).exp(), 0.0)
    mean = torch.zeros_like(z)
    mean[start:stop] = p[:, n:] @ q
    return loss, lse, n_pos, mean


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize_queue", [True, False])
@pytest.mark.parametrize("n, m, anchors", [(13, 700, (0, 13)), (9, 1500, (2, 7)), (6, 1, (0, 6)), (5, 0, (1, 4))])
def test_op_against_the_dense_definition(backend, dtype, normalize_queue, n, m, anchors):
    g = torch.Generator().manual_seed(n + m)
    z = torch.randn(n, 6, generator=g, dtype=dtype).requires_grad_()
    y = torch.randint(-1, 3, (n,), generator=g)
    queue = 2 * torch.randn(m, 6, generator=g, dtype=dtype)
    queue_labels = torch.randint(-1, 4, (m,), generator=g)  # ignored rows, and a class only the queue may have
    op = registry.op("label_supcon_queue", backend)
    outputs = op(z, y, queue, queue_labels, 0.3, 0.2, normalize_queue, *anchors)
    expected = _dense(z, y, queue, queue_labels, 0.3, 0.2, normalize_queue, *anchors)
    for name, got, want in zip(("loss", "lse", "n_pos", "queue_mean"), outputs, expected):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
        assert_close_by_norm(got, want.detach(), dtype, name)
    weights = torch.randn(n, generator=g, dtype=dtype)
    (got,) = torch.autograd.grad((outputs[0] * weights).sum(), z)
    (want,) = torch.autograd.grad((expected[0] * weights).sum(), z)
    assert_close_by_norm(got, want, dtype, "features' gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("anchors, grad_stop", [((0, 11), 0), ((0, 11), 6), ((2, 9), 4), ((0, 11), 11)])
def test_grad_stop_detaches_the_batch_rows_from_it_on(backend, anchors, grad_stop):
    """Batch rows from grad_stop on take no contrast-role gradient (CrossBatchMemory's anchors, whose memory
    copies are the contrast rows); the anchors keep their own loss's gradient."""
    g = torch.Generator().manual_seed(grad_stop)
    z = torch.randn(11, 5, generator=g, dtype=torch.float64).requires_grad_()
    y, queue_labels = make_labels(11, 3), make_labels(40, 3)
    queue = torch.randn(40, 5, generator=g, dtype=torch.float64)
    op = registry.op("label_supcon_queue", backend)
    loss = op(z, y, queue, queue_labels, 0.2, 0.2, True, *anchors, grad_stop)[0]
    expected = _dense(z, y, queue, queue_labels, 0.2, 0.2, True, *anchors, grad_stop)[0]
    weights = torch.randn(11, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad((loss * weights).sum(), z)
    (want,) = torch.autograd.grad((expected * weights).sum(), z)
    assert_close_by_norm(loss.detach(), expected.detach(), torch.float64, "loss")
    assert_close_by_norm(got, want, torch.float64, "features' gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchors_without_positives_and_an_ignored_queue(backend):
    """A class only one batch row has and the queue lacks: loss 0, finite gradient; a queue whose rows are all
    ignored: the batch alone, as label_supcon's own op; an anchor with nothing to contrast with: lse -inf."""
    op = registry.op("label_supcon_queue", backend)
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 0, 1, 1, 7, -1])  # class 7: one row, not in the queue
    queue, queue_labels = torch.randn(9, 4, dtype=torch.float64), torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, -1])
    loss, lse, n_pos, _ = op(z, y, queue, queue_labels, 0.2, 0.2, True)
    assert loss[4] == 0 and n_pos[4] == 0 and loss[5] == 0 and torch.isfinite(lse[4])
    (grad,) = torch.autograd.grad(loss.sum(), z)
    assert torch.isfinite(grad).all()
    ignored = torch.full((9,), -1)
    got = op(z, y, queue, ignored, 0.2, 0.2, True)
    want = registry.op("label_supcon", backend)(z, y, 0.2, 0.2)
    for name, a, b in zip(("loss", "lse", "n_pos"), got, want):
        assert_close_by_norm(a.detach(), b.detach(), torch.float64, name)
    lone = op(z[:1], y[:1], queue, ignored, 0.2, 0.2, True)
    assert lone[1][0] == float("-inf") and lone[0][0] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_queue_is_read_as_given(backend):
    """A strided queue (a view into a larger buffer, as a ring buffer's slice may be) and a fp64 queue for
    fp32 features give the results of the contiguous fp32 queue."""
    z, y = torch.randn(8, 4), make_labels(8, 3)
    buffer, queue_labels = torch.randn(40, 8), make_labels(20, 3)
    strided = buffer[::2, ::2]
    op = registry.op("label_supcon_queue", backend)
    want = op(z, y, strided.contiguous(), queue_labels, 0.2, 0.2, True)
    for queue in (strided, strided.double()):
        for got, expected in zip(op(z, y, queue, queue_labels, 0.2, 0.2, True), want):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", ["number", "learned"])
def test_label_supcon_loss_takes_the_op_for_a_detached_queue(backend, temperature, monkeypatch):
    calls = record_op_calls(monkeypatch)
    z = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    y, queue, queue_labels = make_labels(12, 3), torch.randn(30, 5, dtype=torch.float64), make_labels(30, 3)
    log_t = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    tau = log_t.exp() if temperature == "learned" else 0.2
    kwargs = dict(normalize=True, ref_features=queue, ref_labels=queue_labels)
    loss = mlcontrast.label_supcon_loss(z, y, tau, 0.1, backend=backend, **kwargs)
    assert [name for name, _ in calls] == ["label_supcon_queue"]
    expected = reference.label_supcon_loss(z, y, log_t.exp() if temperature == "learned" else tau, 0.1, **kwargs)
    leaves = (z, log_t) if temperature == "learned" else (z,)
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert_close_by_norm(got, want, torch.float64, "gradient")
    assert_close_by_norm(loss.detach(), expected.detach(), torch.float64, "loss")
