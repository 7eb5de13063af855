"""mlcontrast.pml.SupConLoss against pytorch-metric-learning's own SupConLoss, call for call (contract §13):
the value, the embeddings' (and ref rows') gradients, which path ran, inside CrossBatchMemory and
DistributedLossWrapper."""

from __future__ import annotations

import copy

import pytest
import torch

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, reducers  # noqa: E402
from pytorch_metric_learning.utils import distributed as pml_dist  # noqa: E402

from mlcontrast.pml import SupConLoss  # noqa: E402

FUSED = [b for b in ("cpu",) if b in __import__("mlcontrast").available_backends("cpu")]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused CPU backend built")


def _compare(ours, theirs, embeddings, *args, **kwargs):
    """Both losses on fresh leaves of the same tensors: values and gradients equal (float64)."""
    results = []
    for fn in (ours, theirs):
        e = embeddings.detach().clone().requires_grad_()
        ref = kwargs.get("ref_emb")
        call = dict(kwargs)
        if ref is not None:
            call["ref_emb"] = ref.detach().clone().requires_grad_(ref.requires_grad)
        loss = fn(e, *args, **call)
        leaves = [e] + ([call["ref_emb"]] if ref is not None and ref.requires_grad else [])
        g = torch.autograd.grad(loss, leaves, allow_unused=True) if loss.requires_grad else [None] * len(leaves)
        results.append((loss.detach(), g))
    (mine, g_mine), (pmls, g_pml) = results
    torch.testing.assert_close(mine, pmls.to(mine.dtype), rtol=1e-9, atol=1e-12)
    for a, b in zip(g_mine, g_pml):
        if b is None:
            assert a is None or a.abs().max() == 0
        else:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    return mine


def _data(n=40, d=16, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_plain_call(temperature):
    e, y = _data()
    ours = SupConLoss(temperature)
    loss = _compare(ours, losses.SupConLoss(temperature), e, y)
    assert ours.last_path == "fused" and loss > 0


def test_rows_without_positives_and_negative_labels_are_classes():
    e, y = _data(n=31, classes=30)  # many singletons: rows without positives give 0, dropped by the reducer
    y[:4] = -1  # -1 is an ordinary class in PML
    ours = SupConLoss(0.2)
    _compare(ours, losses.SupConLoss(0.2), e, y)
    assert ours.last_path == "fused"


@pytest.mark.parametrize("ref_grad", [False, True])
def test_ref_rows_replace_the_contrast_set(ref_grad):
    e, y = _data(n=17)
    r, yr = _data(n=29, seed=1)
    r.requires_grad_(ref_grad)
    ours = SupConLoss(0.1)
    _compare(ours, losses.SupConLoss(0.1), e, y, ref_emb=r, ref_labels=yr)
    assert ours.last_path == "fused"


def test_pml_quirks_no_negative_pair_or_no_positive_pair_gives_zero():
    e, _ = _data(n=8)
    same = torch.zeros(8, dtype=torch.long)
    for labels in (same, torch.arange(8)):
        ours = SupConLoss(0.1)
        loss = _compare(ours, losses.SupConLoss(0.1), e, labels)
        assert loss == 0


def test_other_reducers_work_on_the_fused_losses():
    e, y = _data()
    _compare(SupConLoss(0.1, reducer=reducers.MeanReducer()), losses.SupConLoss(0.1, reducer=reducers.MeanReducer()),
             e, y)  # fmt: skip


def test_other_distances_and_triplets_take_the_dense_path():
    e, y = _data()
    ours = SupConLoss(0.1, distance=distances.DotProductSimilarity())
    _compare(ours, losses.SupConLoss(0.1, distance=distances.DotProductSimilarity()), e, y)
    assert ours.last_path == "dense"
    a, p, n = torch.tensor([0, 1]), torch.tensor([2, 3]), torch.tensor([4, 5])
    ours = SupConLoss(0.1)
    _compare(ours, losses.SupConLoss(0.1), e, y, indices_tuple=(a, p, n))
    assert ours.last_path == "dense"


def test_a_partial_indices_tuple_takes_the_dense_path():
    e, y = _data(n=12)
    a1, p, a2, n = pml.utils.loss_and_miner_utils.get_all_pairs_indices(y)
    ours = SupConLoss(0.1)
    _compare(ours, losses.SupConLoss(0.1), e, y, indices_tuple=(a1[:-3], p[:-3], a2, n))
    assert ours.last_path == "dense"


def _all_pairs(y, ref_y):
    return pml.utils.loss_and_miner_utils.get_all_pairs_indices(y, ref_y)


def _reordered(pairs, order):
    return tuple(t[order] for t in pairs)


@pytest.mark.parametrize("change", ["shuffled negatives", "a repeated negative", "a positive as negative",
                                    "an anchor out of range"])
def test_index_tuples_that_are_not_all_pairs_in_order_take_the_dense_path(change):
    """The O(pairs) check: PML's own order (row-major, as torch.where lists pairs) is fused; anything else
    is PML's path, with PML's result (or PML's error)."""
    e, y = _data(n=10)
    r, ry = _data(n=14, seed=3)
    a1, p, a2, n = _all_pairs(y, ry)
    if change == "shuffled negatives":
        a2, n = _reordered((a2, n), torch.randperm(a2.numel(), generator=torch.Generator().manual_seed(0)))
    elif change == "a repeated negative":
        a2, n = a2.clone(), n.clone()
        a2[5], n[5] = a2[4], n[4]
    elif change == "a positive as negative":  # the negatives' count stays right; their kinds do not
        a2, n = torch.cat([a2[1:], a1[:1]]), torch.cat([n[1:], p[:1]])
        a1, p = a1[1:], p[1:]
        order = torch.argsort(a2 * 14 + n)
        a2, n = a2[order], n[order]
    else:
        a2 = a2.clone()
        a2[-1] = 10
    ours = SupConLoss(0.1)
    if change == "an anchor out of range":
        with pytest.raises(IndexError):
            losses.SupConLoss(0.1)(e, y, indices_tuple=(a1, p, a2, n), ref_emb=r, ref_labels=ry)
        with pytest.raises(IndexError):
            ours(e, y, indices_tuple=(a1, p, a2, n), ref_emb=r, ref_labels=ry)
    else:
        _compare(ours, losses.SupConLoss(0.1), e, y, indices_tuple=(a1, p, a2, n), ref_emb=r, ref_labels=ry)
    assert ours.last_path == "dense"


@pytest.mark.parametrize("native", [False, True])
def test_pairs_checked_across_chunk_boundaries(native, monkeypatch):
    """The pair lists are checked in chunks, by torch ops (a chunk size of 7 makes every boundary a case) or by
    the extension's parallel pass (its chunks split the list between threads): in order, fused; one swap of
    neighbours anywhere, at either end or around the middle, dense."""
    import mlcontrast.pml as drop_in

    if native and not drop_in._NATIVE_CHECK:
        pytest.skip("the extension's pair check is not built")
    monkeypatch.setattr(drop_in, "_NATIVE_CHECK", native)
    monkeypatch.setattr(drop_in, "_PAIR_CHUNK", 7)
    e, y = _data(n=9)
    r, ry = _data(n=11 if not native else 9000, seed=4)
    a1, p, a2, n = _all_pairs(y, ry)
    ours = SupConLoss(0.1)
    _compare(ours, losses.SupConLoss(0.1), e, y, indices_tuple=(a1, p, a2, n), ref_emb=r, ref_labels=ry)
    assert ours.last_path == "fused"
    total = a2.numel()
    for at in (0, 6, total // 2 - 1, total // 2, total - 2):
        order = torch.arange(total)
        order[at], order[at + 1] = at + 1, at
        _compare(ours, losses.SupConLoss(0.1), e, y, indices_tuple=(a1, p, *_reordered((a2, n), order)),
                 ref_emb=r, ref_labels=ry)  # fmt: skip
        assert ours.last_path == "dense", at


@pytest.mark.parametrize("memory_size, batches", [(64, [16, 16, 16, 16, 16]), (50, [12, 7, 20, 13, 9])])
def test_inside_cross_batch_memory(memory_size, batches):
    """Several steps, the memory filling up and wrapping around (uneven batches too)."""
    torch.manual_seed(0)
    ours = losses.CrossBatchMemory(SupConLoss(0.1), embedding_size=16, memory_size=memory_size)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(0.1), embedding_size=16, memory_size=memory_size)
    ours.embedding_memory = ours.embedding_memory.double()
    theirs.embedding_memory = theirs.embedding_memory.double()
    for step, b in enumerate(batches):
        e, y = _data(n=b, seed=step + 10)
        before = copy.deepcopy(ours)
        results = []
        for wrapper in (ours, theirs):
            leaf = e.clone().requires_grad_()
            loss = wrapper(leaf, y)
            results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-8, atol=1e-12)
        assert ours.loss.last_path == "fused", f"step {step}"
        torch.testing.assert_close(ours.embedding_memory, theirs.embedding_memory)
        assert before.queue_idx != ours.queue_idx or b % memory_size == 0


def test_cross_batch_memory_with_an_enqueue_mask():
    """Rows only enqueued are not anchors: the anchors against the memory, no self pairs."""
    ours = losses.CrossBatchMemory(SupConLoss(0.1), embedding_size=16, memory_size=40)
    theirs = losses.CrossBatchMemory(losses.SupConLoss(0.1), embedding_size=16, memory_size=40)
    for step in range(3):
        e, y = _data(n=20, seed=step)
        mask = torch.arange(20) % 2 == 0
        values = []
        for wrapper in (ours, theirs):
            wrapper.embedding_memory = wrapper.embedding_memory.double()
            leaf = e.clone().requires_grad_()
            loss = wrapper(leaf, y, enqueue_mask=mask)
            values.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
        torch.testing.assert_close(values[0][0], values[1][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(values[0][1], values[1][1], rtol=1e-8, atol=1e-12)
        assert ours.loss.last_path == "fused"


def test_is_a_pml_loss_by_name():
    loss = SupConLoss()
    assert type(loss).__name__ == "SupConLoss"
    assert isinstance(loss, pml.losses.BaseMetricLossFunction)
    losses.CrossBatchMemory.check_loss_support(type(loss).__name__)
    pml_dist.DistributedLossWrapper(loss)  # accepted


# ---------------------------------------------------------------- DistributedLossWrapper on 2 gloo processes


def _distributed_worker(rank, world, port, efficient, out):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        e, y = _data(n=24, seed=5)
        shard = slice(12 * rank, 12 * (rank + 1))  # PML's all_gather needs equal shards
        mine = e[shard]
        result = {}
        for name, loss in (("ours", SupConLoss(0.1)), ("pml", losses.SupConLoss(0.1))):
            wrapper = pml_dist.DistributedLossWrapper(loss, efficient=efficient)
            leaf = mine.clone().requires_grad_()
            value = wrapper(leaf, y[shard])
            value.backward()
            # NumPy arrays travel by value: a shared tensor's memory could go with this process before it is read
            result[name] = (value.detach().numpy(), leaf.grad.numpy(), getattr(loss, "last_path", None))
        out.put((rank, result))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("efficient", [False, True])
def test_inside_distributed_loss_wrapper(efficient):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, 2, port, efficient, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, result in results.items():
        (v_ours, g_ours, path), (v_pml, g_pml, _) = result["ours"], result["pml"]
        v_ours, g_ours, v_pml, g_pml = map(torch.as_tensor, (v_ours, g_ours, v_pml, g_pml))
        torch.testing.assert_close(v_ours, v_pml, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_ours, g_pml, rtol=1e-8, atol=1e-12)
        # efficient=True passes ref rows that hold the anchors with their gradient: PML's dense path
        assert path == ("dense" if efficient else "fused"), f"rank {rank}"
