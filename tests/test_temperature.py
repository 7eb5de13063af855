"""Tensor temperatures (contract §12) on every backend: the loss, the features' gradients and the exact
gradient of a learnable temperature against autograd through reference.py; the error contract."""

from __future__ import annotations

import pytest
import torch
from utils import assert_close_by_norm, backends, device_of, make_labels, make_targets, record_op_calls

import mlcontrast
from mlcontrast import reference

BACKENDS = [*backends(), "torch"]


def _problems(device):
    """(name, the public call, the reference call, the tensors that get gradients) per loss."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(23, 12, generator=g, dtype=torch.float64)
    y = make_labels(23, 4, ignore_fraction=0.2).to(device)
    t = make_targets(23, 5).to(device)
    f3 = torch.randn(7, 5, 12, generator=g, dtype=torch.float64)
    f4 = torch.randn(6, 2, 12, generator=g, dtype=torch.float64)
    protos = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y_sup = torch.randint(0, 3, (6,), generator=g).to(device)
    queue = torch.randn(31, 12, generator=g, dtype=torch.float64).to(device)  # detached reference rows
    y_queue = make_labels(31, 4, ignore_fraction=0.2).to(device)
    refs = {"ref_features": queue, "ref_labels": y_queue}
    t_queue = make_targets(31, 5).to(device)
    multihot_refs = {"ref_features": queue, "ref_targets": t_queue}
    return [
        ("multihot_jaccard_queue", lambda tau, z, b: mlcontrast.multihot_supcon_loss(z, t, tau, 0.1, normalize=True,
                                                                                      backend=b, **multihot_refs),
         lambda tau, z: reference.multihot_supcon_loss(z, t, tau, 0.1, normalize=True, **multihot_refs), [z]),
        ("multihot_mulsupcon_queue", lambda tau, z, b: mlcontrast.multihot_supcon_loss(z, t, tau, positives="mulsupcon",
                                                                                        backend=b, **multihot_refs),
         lambda tau, z: reference.multihot_supcon_loss(z, t, tau, positives="mulsupcon", **multihot_refs), [z]),
        ("label_supcon_queue", lambda tau, z, b: mlcontrast.label_supcon_loss(z, y, tau, 0.07, normalize=True,
                                                                              backend=b, **refs),
         lambda tau, z: reference.label_supcon_loss(z, y, tau, 0.07, normalize=True, **refs), [z]),
        ("label_supcon_queue_default_base", lambda tau, z, b: mlcontrast.label_supcon_loss(z, y, tau, backend=b,
                                                                                            **refs),
         lambda tau, z: reference.label_supcon_loss(z, y, tau, **refs), [z]),
        ("label_supcon", lambda tau, z, b: mlcontrast.label_supcon_loss(z, y, tau, 0.07, normalize=True, backend=b),
         lambda tau, z: reference.label_supcon_loss(z, y, tau, 0.07, normalize=True), [z]),
        ("label_supcon_default_base", lambda tau, z, b: mlcontrast.label_supcon_loss(z, y, tau, reduction="sum",
                                                                                      backend=b),
         lambda tau, z: reference.label_supcon_loss(z, y, tau, reduction="sum"), [z]),
        ("supcon", lambda tau, f, b: mlcontrast.supcon_loss(f, y_sup, tau, backend=b),
         lambda tau, f: reference.supcon_loss(f, y_sup, tau), [f4]),
        ("multilabel_supcon", lambda tau, f, b: mlcontrast.multilabel_supcon_loss(f, t[:7], tau, backend=b),
         lambda tau, f: reference.multilabel_supcon_loss(f, t[:7], tau), [f3]),
        ("multihot_jaccard", lambda tau, z, b: mlcontrast.multihot_supcon_loss(z, t, tau, 0.1, backend=b),
         lambda tau, z: reference.multihot_supcon_loss(z, t, tau, 0.1), [z]),
        ("multihot_mulsupcon", lambda tau, z, b: mlcontrast.multihot_supcon_loss(z, t, tau, positives="mulsupcon",
                                                                                  normalize=True, backend=b),
         lambda tau, z: reference.multihot_supcon_loss(z, t, tau, positives="mulsupcon", normalize=True), [z]),
        ("prototype_nce", lambda tau, f, p, b: mlcontrast.prototype_nce_loss(f, p, t[:7], tau, backend=b),
         lambda tau, f, p: reference.prototype_nce_loss(f, p, t[:7], tau), [f3, protos]),
        ("prototype_ce", lambda tau, z, p, b: mlcontrast.prototype_ce_loss(z, y.clamp(max=4), p, tau, backend=b),
         lambda tau, z, p: reference.prototype_ce_loss(z, y.clamp(max=4), p, tau), [z, protos]),
    ]


PROBLEMS = [name for name, *_ in _problems("cpu")]


def _loss_and_grads(fn, log_t, tensors):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    tau = log_t.detach().clone().requires_grad_()
    loss = fn(tau.exp(), *leaves)
    return loss.detach(), torch.autograd.grad(loss, [tau, *leaves])


@pytest.mark.parametrize("name", PROBLEMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_temperature_matches_autograd_through_the_reference(backend, name):
    device = device_of(backend) if backend != "torch" else torch.device("cpu")
    _, call, expected, tensors = next(p for p in _problems(device) if p[0] == name)
    tensors = [x.to(device) for x in tensors]
    log_t = torch.tensor(-2.3, dtype=torch.float64, device=device)
    loss, (d_log_t, *d_inputs) = _loss_and_grads(lambda tau, *x: call(tau, *x, backend), log_t, tensors)
    ref_loss, (ref_log_t, *ref_inputs) = _loss_and_grads(expected, log_t, tensors)
    assert_close_by_norm(loss, ref_loss, torch.float64, "loss")
    assert_close_by_norm(d_log_t, ref_log_t, torch.float64, "d loss / d log t")
    assert ref_log_t.abs() > 1e-6, "the test needs a temperature gradient that is not 0"
    for a, e in zip(d_inputs, ref_inputs):
        assert_close_by_norm(a, e, torch.float64, "input gradient")


@pytest.mark.parametrize("name", PROBLEMS)
def test_a_tensor_temperature_gives_the_value_of_the_number(name):
    backend = "cpu"
    _, call, _, tensors = next(p for p in _problems("cpu") if p[0] == name)
    as_number = call(0.1, *tensors, backend)
    as_tensor = call(torch.tensor(0.1, dtype=torch.float64), *tensors, backend)
    assert_close_by_norm(as_tensor, as_number, torch.float64, name)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck_of_the_temperature(backend):
    z = torch.randn(9, 6, dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 2, -1, 2, 0, 1])
    t = make_targets(9, 4)

    def losses(log_t):
        tau = log_t.exp()
        return (mlcontrast.label_supcon_loss(z, y, tau, 0.2, normalize=True, backend=backend),
                mlcontrast.multihot_supcon_loss(z, t, tau, positives="any", backend=backend),
                mlcontrast.prototype_ce_loss(z, y.clamp(min=0), z[:3], tau, backend=backend))  # fmt: skip

    assert torch.autograd.gradcheck(losses, (torch.tensor(-1.5, dtype=torch.float64, requires_grad=True),))


def test_a_learnable_temperature_in_a_module_is_a_parameter_that_trains():
    log_t = torch.nn.Parameter(torch.tensor(-1.0))
    z = torch.nn.functional.normalize(torch.randn(32, 8), dim=1)
    y = make_labels(32, 3)
    before = log_t.detach().clone()
    opt = torch.optim.SGD([log_t], lr=0.1)
    loss = mlcontrast.LabelSupConLoss(normalize=True)
    loss.temperature = log_t.exp()  # the module passes whatever temperature it holds
    loss(z, y).backward()
    assert log_t.grad is not None and log_t.grad != 0
    opt.step()
    assert log_t != before


@pytest.mark.parametrize(
    "temperature, error",
    [
        (torch.tensor(0.0), ValueError),
        (torch.tensor(-0.1), ValueError),
        (torch.tensor(float("nan")), ValueError),
        (torch.tensor([0.1]), ValueError),
        (torch.tensor(1), TypeError),
        ("0.1", TypeError),
    ],
)
def test_bad_tensor_temperatures_raise_before_any_work(temperature, error):
    z, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(error, match="temperature"):
        mlcontrast.label_supcon_loss(z, y, temperature)
    with pytest.raises(error, match="temperature"):
        mlcontrast.prototype_ce_loss(z, y, z[:2], temperature)
    with pytest.raises(error, match="temperature"):
        mlcontrast.multihot_supcon_loss(z, torch.ones(4, 2, dtype=torch.long), temperature)


def test_base_temperature_stays_a_number():
    z, y = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    with pytest.raises(TypeError, match="base_temperature"):
        mlcontrast.label_supcon_loss(z, y, 0.1, torch.tensor(0.1))


@pytest.mark.parametrize("queue", [False, True])
def test_a_tensor_temperature_compiles_without_graph_breaks(queue):
    z = torch.randn(16, 8, requires_grad=True)
    y = make_labels(16, 3)
    refs = {"ref_features": torch.randn(20, 8), "ref_labels": make_labels(20, 3)} if queue else {}
    log_t = torch.tensor(-2.0, requires_grad=True)

    @torch.compile(fullgraph=True, backend="eager")
    def step(z, log_t):
        return mlcontrast.label_supcon_loss(z, y, log_t.exp(), normalize=True, backend="cpu", **refs)

    loss = step(z, log_t)
    loss.backward()
    expected = reference.label_supcon_loss(z.detach(), y, log_t.detach().exp(), normalize=True, **refs)
    assert_close_by_norm(loss, expected, torch.float32, "loss")
    assert log_t.grad is not None and torch.isfinite(log_t.grad)


@pytest.mark.parametrize("backend", backends())
def test_a_learned_temperature_costs_a_detached_queue_no_gradient_work(backend, monkeypatch):
    """With a detached queue, τ's gradient comes from the batch rows' work (mlcontrast._detached_rows): the
    backward ops run are the queue op's (which gives the queue no gradient) where the backend has it, else
    label_supcon's with its contrast-role gradient stopped at the batch (grad_stop = B); then label_supcon's
    over the batch alone."""
    from mlcontrast.ops import contract

    device = device_of(backend)
    calls = record_op_calls(monkeypatch, "backward_op")
    z = torch.randn(9, 6, device=device, requires_grad=True)
    y, queue, y_queue = make_labels(9, 3).to(device), torch.randn(40, 6, device=device), make_labels(40, 3).to(device)
    log_t = torch.tensor(-2.0, device=device, requires_grad=True)
    loss = mlcontrast.label_supcon_loss(z, y, log_t.exp(), normalize=True, ref_features=queue, ref_labels=y_queue,
                                        backend=backend)  # fmt: skip
    loss.backward()
    # (op, rows, grad_stop of label_supcon's backward)
    seen = [(name, args[1].shape[0], args[-1] if name == "label_supcon" else None) for name, args in calls]
    if backend in contract.FUSED_OPS["label_supcon_queue"].backends:
        assert seen == [("label_supcon_queue", 9, None), ("label_supcon", 9, None)]
    else:  # the whole set stopped at the batch, then the batch alone
        assert seen == [("label_supcon", 49, 9), ("label_supcon", 9, None)]
    expected = torch.autograd.grad(
        reference.label_supcon_loss(z, y, log_t.exp(), normalize=True, ref_features=queue, ref_labels=y_queue), log_t
    )[0]
    assert_close_by_norm(log_t.grad, expected, torch.float32, "d loss / d log_t")


@pytest.mark.parametrize("backend", backends())
def test_a_learned_temperature_costs_a_detached_multihot_queue_no_gradient_work(backend, monkeypatch):
    """multihot_supcon's backward stops at the batch (grad_stop = B), then runs over the batch alone; τ's
    gradient is still exact."""
    device = device_of(backend)
    calls = record_op_calls(monkeypatch, "backward_op")
    g = torch.Generator().manual_seed(2)
    z = torch.randn(9, 6, generator=g).to(device).requires_grad_()
    targets, queue, queue_targets = make_targets(9, 4).to(device), torch.randn(40, 6).to(device), make_targets(40, 4)
    kw = dict(normalize=True, ref_features=queue, ref_targets=queue_targets.to(device))
    log_t = torch.tensor(-2.0, device=device, requires_grad=True)
    mlcontrast.multihot_supcon_loss(z, targets, log_t.exp(), backend=backend, **kw).backward()
    assert [(args[1].shape[0], args[-1]) for _, args in calls] == [(49, 9), (9, None)]  # (rows, grad_stop)
    expected = torch.autograd.grad(reference.multihot_supcon_loss(z, targets, log_t.exp(), **kw), log_t)[0]
    assert_close_by_norm(log_t.grad, expected, torch.float32, "d loss / d log_t")

