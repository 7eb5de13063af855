"""ContrastQueue (DESIGN.md §11): FIFO order against a Python list, state, dtype and device moves, the
error contract, use as the losses' reference rows, and the same queue on 2 gloo ranks."""

from __future__ import annotations

import datetime
import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mlcontrast
from mlcontrast import ContrastQueue, reference

D, C = 3, 4
# Uneven batches: empty ones, ones that wrap, ones larger than the queue (size 6 below).
BATCHES = [3, 0, 5, 1, 7, 2, 0, 11, 4, 6, 5]


class ListQueue:
    """The specification: a Python list of (row, label) pairs of which the last `size` are kept."""

    def __init__(self, size: int) -> None:
        self.size, self.items = size, []

    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.items = (self.items + list(zip(features, labels)))[-self.size :]

    def tensors(self, dim: int, label_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.items:
            return torch.zeros(0, dim), torch.zeros((0, *label_shape), dtype=torch.int64)
        return torch.stack([f for f, _ in self.items]), torch.stack([y for _, y in self.items]).long()


def _batch(n: int, gen: torch.Generator, multi_hot: bool) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.randn(n, D, generator=gen)
    labels = torch.randint(-1, 2, (n, C), generator=gen) if multi_hot else torch.randint(-1, 5, (n,), generator=gen)
    return features, labels


def _assert_holds(queue: ContrastQueue, model: ListQueue) -> None:
    features, labels = model.tensors(D, (C,) if queue.num_classes else ())
    assert len(queue) == len(model.items)
    assert queue.features.dtype == torch.float32 and queue.labels.dtype == torch.int64
    assert torch.equal(queue.features, features)
    assert torch.equal(queue.labels, labels)
    assert torch.equal(queue.targets, labels)
    assert int(queue.num_filled) == len(queue)


def _state(queue: ContrastQueue) -> dict:
    return {k: v.clone() for k, v in queue.state_dict().items()}


def _assert_same_state(queue: ContrastQueue, state: dict) -> None:
    now = queue.state_dict()
    assert now.keys() == state.keys()
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


@pytest.mark.parametrize("multi_hot", [False, True], ids=["labels", "multi-hot"])
def test_fifo_order_and_wrap_around(multi_hot):
    gen = torch.Generator().manual_seed(0)
    queue, model = ContrastQueue(6, D, num_classes=C if multi_hot else None), ListQueue(6)
    _assert_holds(queue, model)
    for n in BATCHES:
        features, labels = _batch(n, gen, multi_hot)
        queue.enqueue(features, labels)
        model.enqueue(features, labels)
        _assert_holds(queue, model)


def test_batch_larger_than_size_keeps_the_newest():
    queue = ContrastQueue(4, 1)
    queue.enqueue(torch.tensor([[0.0], [1.0]]), torch.tensor([0, 1]))  # half full, write position 2
    queue.enqueue(torch.arange(2.0, 12.0)[:, None], torch.arange(2, 12))
    assert len(queue) == 4
    assert queue.labels.tolist() == [8, 9, 10, 11]
    assert queue.features.squeeze(1).tolist() == [8.0, 9.0, 10.0, 11.0]
    queue.enqueue(torch.tensor([[12.0]]), torch.tensor([12]))
    assert queue.labels.tolist() == [9, 10, 11, 12]
    queue.enqueue(torch.arange(13.0, 17.0)[:, None], torch.arange(13, 17))  # exactly `size` rows
    assert queue.labels.tolist() == [13, 14, 15, 16]


def test_empty_batch_changes_nothing():
    queue = ContrastQueue(5, D)
    queue.enqueue(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
    assert len(queue) == 0 and queue.features.shape == (0, D) and queue.labels.shape == (0,)
    queue.enqueue(torch.randn(7, D), torch.arange(7))
    state = _state(queue)
    queue.enqueue(torch.zeros(0, D), torch.zeros(0, dtype=torch.int64))
    _assert_same_state(queue, state)
    multi = ContrastQueue(5, D, num_classes=C)
    multi.enqueue(torch.zeros(0, D), torch.zeros(0, C, dtype=torch.bool))
    assert multi.labels.shape == (0, C)


def test_reads_are_snapshots_and_carry_no_gradient():
    queue = ContrastQueue(3, D)
    x = torch.randn(2, D, requires_grad=True)
    queue.enqueue(x * 2, torch.tensor([0, 1]))
    held = queue.features
    assert not held.requires_grad
    queue.enqueue(torch.zeros(3, D), torch.tensor([2, 2, 2]))  # overwrites every slot
    torch.testing.assert_close(held, (x * 2).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("multi_hot", [False, True], ids=["labels", "multi-hot"])
def test_state_dict_round_trip(multi_hot):
    gen = torch.Generator().manual_seed(1)
    classes = C if multi_hot else None
    queue = ContrastQueue(6, D, num_classes=classes)
    for n in (4, 5):  # wrapped: write position 3
        queue.enqueue(*_batch(n, gen, multi_hot))
    assert set(queue.state_dict()) == {"feature_buffer", "label_buffer", "num_filled", "write_position"}
    assert int(queue.write_position) == 3
    saved = io.BytesIO()
    torch.save(queue.state_dict(), saved)
    saved.seek(0)
    fresh = ContrastQueue(6, D, num_classes=classes)
    fresh.load_state_dict(torch.load(saved))
    assert len(fresh) == len(queue)
    assert torch.equal(fresh.features, queue.features) and torch.equal(fresh.labels, queue.labels)
    for n in (2, 5, 0, 9):  # and the same behaviour afterwards
        batch = _batch(n, gen, multi_hot)
        queue.enqueue(*batch)
        fresh.enqueue(*batch)
        _assert_same_state(fresh, _state(queue))
        assert torch.equal(fresh.features, queue.features) and torch.equal(fresh.labels, queue.labels)


def test_load_state_dict_refuses_another_size_whole():
    small = ContrastQueue(4, D)
    small.enqueue(torch.randn(5, D), torch.arange(5))  # full, write position 0
    other = ContrastQueue(5, D)
    other.enqueue(torch.randn(2, D), torch.tensor([7, 8]))
    state = _state(other)
    with pytest.raises(RuntimeError, match="counters of a queue of size 5"):
        other.load_state_dict(small.state_dict())  # 4 rows held, position 0: impossible in 5 slots
    _assert_same_state(other, state)
    small.clear()
    small.enqueue(torch.randn(1, D), torch.tensor([3]))  # possible counters (1, 1), but [4, D] buffers
    with pytest.raises(RuntimeError, match="size mismatch"):
        other.load_state_dict(small.state_dict())
    _assert_same_state(other, state)
    assert len(other) == 2 and other.labels.tolist() == [7, 8]


def test_dtype_and_device_moves():
    queue = ContrastQueue(4, D, num_classes=C)
    rows = torch.randn(3, D, dtype=torch.float64)
    queue.enqueue(rows, torch.ones(3, C, dtype=torch.int64))
    assert queue.feature_buffer.dtype == torch.float32
    torch.testing.assert_close(queue.features, rows.float(), rtol=0, atol=0)
    assert queue.to(torch.float64) is queue
    assert queue.features.dtype == torch.float64 and queue.label_buffer.dtype == torch.int8
    assert queue.num_filled.dtype == torch.int64 and len(queue) == 3
    queue.enqueue(rows[:2], torch.zeros(2, C, dtype=torch.int64))
    assert torch.equal(queue.features, torch.cat([rows.float().double()[1:], rows[:2]]))
    queue.half()
    assert queue.features.dtype == torch.float16 and queue.labels.dtype == torch.int64
    double = ContrastQueue(2, D, dtype=torch.float64)
    assert double.features.dtype == torch.float64
    queue.to("meta")  # every buffer moves (meta: no data, so only where they are is checked)
    assert {b.device.type for b in queue.buffers()} == {"meta"} and len(queue) == 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_queue():
    cpu = ContrastQueue(5, D)
    cpu.enqueue(torch.randn(4, D), torch.arange(4))
    queue = ContrastQueue(5, D).cuda()
    queue.load_state_dict(cpu.state_dict())
    batch = torch.randn(3, D), torch.tensor([5, 6, 7])
    cpu.enqueue(*batch)
    queue.enqueue(batch[0].cuda(), batch[1].cuda())
    assert queue.features.is_cuda and torch.equal(queue.features.cpu(), cpu.features)
    assert torch.equal(queue.labels.cpu(), cpu.labels) and len(queue) == len(cpu) == 5
    with pytest.raises(ValueError, match="one device"):
        queue.enqueue(*batch)


def test_constructor_errors():
    for size, dim, classes in [(0, D, None), (-1, D, None), (2.5, D, None), (True, D, None), ("4", D, None),
                               (4, 0, None), (4, D, 0), (4, D, -2), (4, D, 1.0)]:  # fmt: skip
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            ContrastQueue(size, dim, num_classes=classes)
    with pytest.raises(TypeError, match="floating dtype"):
        ContrastQueue(4, D, dtype=torch.int64)


def _bad_enqueues(multi_hot: bool) -> list:
    """(features, labels, error, message) that must raise and change nothing."""
    z = torch.randn(3, D)
    good = torch.ones(3, C, dtype=torch.int64) if multi_hot else torch.tensor([0, 1, 2])
    cases = [
        (torch.randn(3, D + 1), good, ValueError, r"features must be \[N, D=3\]"),
        (torch.randn(3), good, ValueError, "features must be"),
        (torch.randn(1, 3, D), good, ValueError, "features must be"),
        (torch.ones(3, D, dtype=torch.int64), good, TypeError, "floating point"),
        (z, good[:2], ValueError, "labels must be"),
        (z, good.float(), TypeError, "labels must be an integer"),
        (torch.empty(3, D, device="meta"), good, ValueError, "one device"),
    ]
    if multi_hot:
        cases += [
            (z, torch.ones(3, C + 1, dtype=torch.int64), ValueError, r"labels must be \[N=3, C=4\]"),
            (z, torch.ones(3, dtype=torch.int64), ValueError, "labels must be"),
            (z, torch.full((3, C), 2), ValueError, r"1 \(label present\), 0"),
            (z, torch.full((3, C), 256), ValueError, r"1 \(label present\), 0"),  # would wrap to 0 in int8
        ]
    else:
        cases += [
            (z, torch.zeros(3, 1, dtype=torch.int64), ValueError, r"labels must be \[N=3\]"),
            (z, torch.tensor([0, -2, 1]), ValueError, "or -1 for a row"),
            (z, torch.tensor([True, False, True]), TypeError, "int64 class ids"),
        ]
    return cases


@pytest.mark.parametrize("multi_hot", [False, True], ids=["labels", "multi-hot"])
def test_enqueue_errors_change_nothing(multi_hot):
    queue = ContrastQueue(5, D, num_classes=C if multi_hot else None)
    queue.enqueue(*_batch(4, torch.Generator().manual_seed(2), multi_hot))
    state, features, labels = _state(queue), queue.features, queue.labels
    for bad_features, bad_labels, error, message in _bad_enqueues(multi_hot):
        with pytest.raises(error, match=message):
            queue.enqueue(bad_features, bad_labels)
        _assert_same_state(queue, state)
        assert len(queue) == 4 and torch.equal(queue.features, features) and torch.equal(queue.labels, labels)
    with pytest.raises(RuntimeError, match="not initialised"):  # a group without torch.distributed
        queue.enqueue(*_batch(2, torch.Generator(), multi_hot), process_group=object())
    _assert_same_state(queue, state)


def test_multi_hot_storage():
    queue = ContrastQueue(3, D, num_classes=C)
    assert queue.multi_hot and queue.label_buffer.dtype == torch.int8
    queue.enqueue(torch.randn(2, D), torch.tensor([[True, False, True, False], [False] * 4]))
    queue.enqueue(torch.randn(2, D), torch.tensor([[-1, 0, 1, 1], [1, -1, -1, 0]], dtype=torch.int32))
    assert queue.labels.tolist() == [[0, 0, 0, 0], [-1, 0, 1, 1], [1, -1, -1, 0]]


def test_clear_and_repr():
    queue = ContrastQueue(4, D, num_classes=C)
    queue.enqueue(torch.randn(6, D), torch.ones(6, C, dtype=torch.int64))
    assert repr(queue) == "ContrastQueue(size=4, dim=3, num_classes=4, len=4, dtype=torch.float32)"
    queue.clear()
    assert len(queue) == 0 and int(queue.write_position) == 0 and queue.features.shape == (0, D)
    _assert_same_state(queue, _state(ContrastQueue(4, D, num_classes=C)))
    assert "len=0" in repr(ContrastQueue(2, 5)) and "num_classes" not in repr(ContrastQueue(2, 5))


def test_as_multihot_reference_rows():
    """The queue's rows are multihot_supcon_loss's ref rows: the loss equals the dense definition over
    the rows held, and enqueuing before backward (MoCo's order) leaves the gradient unchanged."""
    gen = torch.Generator().manual_seed(3)
    queue, model = ContrastQueue(8, D, num_classes=C), ListQueue(8)
    z, t = torch.randn(4, D, generator=gen), torch.randint(0, 2, (4, C), generator=gen)
    empty = mlcontrast.multihot_supcon_loss(z, t, ref_features=queue.features, ref_targets=queue.targets)
    assert torch.equal(empty, mlcontrast.multihot_supcon_loss(z, t))  # the first step: no ref rows yet
    for n in (5, 6):
        batch = _batch(n, gen, True)
        queue.enqueue(*batch)
        model.enqueue(*batch)
    q = torch.randn(4, D, dtype=torch.float64, generator=gen).float().requires_grad_()
    targets = torch.randint(0, 2, (4, C), generator=gen)
    ref_features, ref_targets = model.tensors(D, (C,))
    kwargs = dict(normalize=True, positives="any")
    loss = mlcontrast.multihot_supcon_loss(q, targets, ref_features=queue.features, ref_targets=queue.targets,
                                           backend="cpu", **kwargs)  # fmt: skip
    expected = reference.multihot_supcon_loss(q, targets, ref_features=ref_features, ref_targets=ref_targets, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    (want,) = torch.autograd.grad(expected, q)
    queue.enqueue(*_batch(8, gen, True))  # every slot overwritten before backward
    loss.backward()
    torch.testing.assert_close(q.grad, want, rtol=1e-5, atol=1e-6)


def test_as_label_reference_rows():
    """A MoCo-style step with label_supcon_loss: the loss against the queue equals the loss over the
    batch and the rows held in which only the batch rows are anchors."""
    gen = torch.Generator().manual_seed(4)
    queue = ContrastQueue(10, D)
    queue.enqueue(torch.randn(7, D, generator=gen), torch.randint(-1, 3, (7,), generator=gen))
    queue.enqueue(torch.randn(6, D, generator=gen), torch.randint(-1, 3, (6,), generator=gen))
    q = torch.randn(5, D, generator=gen).requires_grad_()
    labels = torch.tensor([0, 1, 2, 0, -1])
    loss = mlcontrast.label_supcon_loss(
        q, labels, ref_features=queue.features, ref_labels=queue.labels, normalize=True, reduction="none"
    )
    z = torch.nn.functional.normalize(torch.cat([q, queue.features]), dim=1)
    every = reference.label_supcon_loss(z, torch.cat([labels, queue.labels]), reduction="none")
    torch.testing.assert_close(loss, every[:5], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 2 gloo processes: the same queue on every rank, equal to one process fed the concatenation
# ----------------------------------------------------------------------------------------------

WORLD = 2
DDP_SIZE = 8
# Rows per rank at each step: uneven, empty on one rank or on both, more than the queue at once.
DDP_STEPS = [(3, 5), (0, 2), (4, 0), (0, 0), (6, 7), (1, 1)]


def _ddp_batches(multi_hot: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The concatenation of all ranks' rows at each step, rank 0's first."""
    gen = torch.Generator().manual_seed(5 + multi_hot)
    return [_batch(sum(sizes), gen, multi_hot) for sizes in DDP_STEPS]


def _rank_part(batch, sizes, rank):
    start = sum(sizes[:rank])
    return [t[start : start + sizes[rank]] for t in batch]


def _ddp_worker(rank: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    try:
        out = {}
        for multi_hot in (False, True):
            queue = ContrastQueue(DDP_SIZE, D, num_classes=C if multi_hot else None)
            steps = []
            for sizes, batch in zip(DDP_STEPS, _ddp_batches(multi_hot)):
                features, labels = _rank_part(batch, sizes, rank)
                # The ranks' dtypes may differ: rows are converted to the queue's dtypes before the gather.
                features = features.double() if rank == 1 else features
                labels = labels.int() if rank == 0 else labels
                queue.enqueue(features, labels, process_group=dist.group.WORLD)
                steps.append({"state": _state(queue), "features": queue.features, "labels": queue.labels})
            out[multi_hot] = steps
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_same_queue_on_every_rank(tmp_path):
    mp.spawn(_ddp_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for multi_hot in (False, True):
        single = ContrastQueue(DDP_SIZE, D, num_classes=C if multi_hot else None)
        for step, batch in enumerate(_ddp_batches(multi_hot)):
            single.enqueue(*batch)
            for rank in range(WORLD):
                got = results[rank][multi_hot][step]
                _assert_same_state(single, got["state"])
                assert torch.equal(got["features"], single.features), (multi_hot, step, rank)
                assert torch.equal(got["labels"], single.labels), (multi_hot, step, rank)
