"""process_group=: cross-rank contrast sets, on 2 and 3 CPU processes with the gloo backend.

Each world is spawned once (module-scoped fixture); every rank runs all the cases on its shard of the
same inputs and saves loss and features.grad; the tests compare them with the single-process loss over
the concatenation: the same loss on every rank, and grad_r == world_size x the single-process gradient
of rank r's rows.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from utils import assert_close_by_norm

import mlcontrast
from mlcontrast import functional as fn
from mlcontrast.distributed import all_gather_with_grad

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

WORLDS = (2, 3)
DEFAULT_SIZES = {2: [3, 5], 3: [4, 0, 3]}  # per-rank rows (label) or samples (supcon, multilabel)

# name: (kind, kwargs, options). options: dtype, sizes (override), module, labels (False: supcon without),
# views (multilabel: None for [B, C, D]), group ("sub": ranks 0 and world-1 only).
CASES = {
    "label-mean-torch": ("label", dict(reduction="mean", normalize=True, backend="torch"), {}),
    "label-mean-cpu": ("label", dict(reduction="mean", normalize=True, backend="cpu"), {}),
    "label-mean-cpu-first-empty": ("label", dict(reduction="mean", backend="cpu"), dict(sizes="first-empty")),
    "label-mean-cpu-all-empty": ("label", dict(reduction="mean", backend="cpu"), dict(sizes="all-empty")),
    "label-sum-cpu": ("label", dict(reduction="sum", temperature=0.5, base_temperature=0.2, backend="cpu"), {}),
    "label-sum-torch": ("label", dict(reduction="sum", backend="torch"), {}),
    "label-none-cpu": ("label", dict(reduction="none", normalize=True, backend="cpu"), {}),
    "label-none-torch": ("label", dict(reduction="none", backend="torch"), {}),
    "label-mean-cpu-fp32": ("label", dict(reduction="mean", normalize=True, backend="cpu"), dict(dtype=torch.float32)),
    "label-mean-cpu-fp16": ("label", dict(reduction="mean", normalize=True, backend="cpu"), dict(dtype=torch.float16)),
    "label-mean-cpu-bf16": ("label", dict(reduction="mean", normalize=True, backend="cpu"), dict(dtype=torch.bfloat16)),
    "label-mean-cpu-subgroup": ("label", dict(reduction="mean", backend="cpu"), dict(group="sub")),
    "label-module": ("label", dict(reduction="mean", normalize=True, backend="cpu"), dict(module=True)),
    # label_supcon_loss with ref rows; options ref: the same ref rows (a queue) on every rank, with gradient
    # (True) or detached ("detached": the op's grad_stop at the gathered rows' end).
    "label-ref-cpu": ("label", dict(reduction="mean", normalize=True, backend="cpu"), dict(ref=True)),
    "label-ref-detached-cpu": ("label", dict(reduction="mean", backend="cpu"), dict(ref="detached")),
    "label-ref-none-cpu": ("label", dict(reduction="none", normalize=True, backend="cpu"), dict(ref="detached")),
    "label-ref-sum-torch": ("label", dict(reduction="sum", backend="torch"), dict(ref=True)),
    "label-ref-first-empty-cpu": ("label", dict(backend="cpu"), dict(ref=True, sizes="first-empty")),
    "label-ref-triton": ("label", dict(reduction="mean", normalize=True, backend="triton"), dict(ref="detached")),
    "label-ref-module": ("label", dict(reduction="mean", backend="cpu"), dict(module=True, ref=True)),
    "supcon-labels-all-cpu": ("supcon", dict(contrast_mode="all", backend="cpu"), {}),
    "supcon-labels-all-torch": ("supcon", dict(contrast_mode="all", backend="torch"), {}),
    "supcon-none-all-cpu": ("supcon", dict(contrast_mode="all", backend="cpu"), dict(labels=False)),
    "supcon-none-all-torch": ("supcon", dict(contrast_mode="all", backend="torch"), dict(labels=False)),
    "supcon-labels-one-cpu": ("supcon", dict(contrast_mode="one", backend="cpu"), {}),
    "supcon-none-one-cpu": ("supcon", dict(contrast_mode="one", backend="cpu"), dict(labels=False)),
    "supcon-labels-one-torch": ("supcon", dict(contrast_mode="one", temperature=0.2, backend="torch"), {}),
    "supcon-module": ("supcon", dict(contrast_mode="all", backend="cpu"), dict(module=True, sizes="first-empty")),
    "multilabel-bcd-cpu": ("multilabel", dict(backend="cpu"), dict(views=None)),
    "multilabel-bcd-torch": ("multilabel", dict(backend="torch"), dict(views=None)),
    "multilabel-bvcd-cpu": ("multilabel", dict(backend="cpu"), {}),
    "multilabel-bvcd-torch": ("multilabel", dict(temperature=0.5, backend="torch"), {}),
    "multilabel-legacy-cpu": ("multilabel", dict(backend="cpu", legacy_sadcl=True), {}),
    "multilabel-legacy-torch": ("multilabel", dict(backend="torch", legacy_sadcl=True), {}),
    # The Triton kernels (interpreted here), whose anchor rows are each rank's own rows.
    "label-mean-triton": ("label", dict(reduction="mean", normalize=True, backend="triton"), {}),
    "supcon-labels-all-triton": ("supcon", dict(contrast_mode="all", backend="triton"), {}),
    "multilabel-bvcd-triton": ("multilabel", dict(backend="triton"), {}),
    "multilabel-module": ("multilabel", dict(backend="cpu"), dict(module=True)),
    # multihot_supcon_loss; options ref: the same ref rows (a queue, with gradient) on every rank.
    "multihot-jaccard-torch": ("multihot", dict(normalize=True, backend="torch"), {}),
    "multihot-jaccard-cpu": ("multihot", dict(normalize=True, threshold=1 / 3, backend="cpu"), {}),
    "multihot-any-sum-cpu": ("multihot", dict(positives="any", reduction="sum", backend="cpu"), {}),
    "multihot-all-cpu": ("multihot", dict(positives="all", temperature=0.5, base_temperature=0.2, backend="cpu"), {}),
    "multihot-mulsupcon-cpu": ("multihot", dict(positives="mulsupcon", normalize=True, backend="cpu"), {}),
    "multihot-mulsupcon-torch": ("multihot", dict(positives="mulsupcon", backend="torch"), {}),
    "multihot-none-cpu": ("multihot", dict(reduction="none", normalize=True, backend="cpu"), {}),
    "multihot-none-torch": ("multihot", dict(positives="mulsupcon", reduction="none", backend="torch"), {}),
    "multihot-first-empty-cpu": ("multihot", dict(backend="cpu"), dict(sizes="first-empty")),
    "multihot-all-empty-cpu": ("multihot", dict(backend="cpu"), dict(sizes="all-empty")),
    "multihot-ref-cpu": ("multihot", dict(normalize=True, backend="cpu"), dict(ref=True)),
    "multihot-ref-mulsupcon-torch": ("multihot", dict(positives="mulsupcon", backend="torch"), dict(ref=True)),
    "multihot-ref-none-cpu": ("multihot", dict(positives="any", reduction="none", backend="cpu"), dict(ref=True)),
    "multihot-module-cpu": ("multihot", dict(normalize=True, backend="cpu"), dict(module=True, ref=True)),
}
MODULES = {
    "label": mlcontrast.LabelSupConLoss,
    "supcon": mlcontrast.SupConLoss,
    "multilabel": mlcontrast.MultiLabelSupConLoss,
    "multihot": mlcontrast.MultiHotSupConLoss,
}
FUNCTIONS = {"label": fn.label_supcon_loss, "supcon": fn.supcon_loss, "multilabel": fn.multilabel_supcon_loss,
             "multihot": fn.multihot_supcon_loss}  # fmt: skip
D, C, V = 8, 4, 2
DDP_WORLDS = (2,)


def _sizes(world: int, options: dict) -> list[int]:
    sizes = options.get("sizes")
    if sizes == "first-empty":
        return [0] + [3 + r for r in range(1, world)]
    if sizes == "all-empty":
        return [0] * world
    if options.get("group") == "sub":
        return [2, 5]
    return DEFAULT_SIZES[world]


def _make_inputs(world: int) -> dict:
    """Full (concatenated) inputs of every case, and the upstream gradient for reduction="none"."""
    gen = torch.Generator().manual_seed(1234 + world)
    inputs = {}
    for name, (kind, _, options) in CASES.items():
        sizes = _sizes(world, options)
        total = sum(sizes)
        dtype = options.get("dtype", torch.float64)
        case = {"sizes": sizes}
        if kind == "label":
            case["features"] = torch.randn(total, D, generator=gen, dtype=torch.float64).to(dtype)
            labels = torch.randint(0, 3, (total,), generator=gen)
            labels[torch.rand(total, generator=gen) < 0.2] = -1
            case["other"] = labels
            case["upstream"] = torch.rand(total, generator=gen, dtype=torch.float64).to(dtype)
            if options.get("ref"):  # the same queue on every rank, with ignored rows
                case["ref_features"] = torch.randn(6, D, generator=gen, dtype=torch.float64).to(dtype)
                case["ref_labels"] = torch.tensor([0, 1, -1, 2, 0, -1])
                case["ref_requires_grad"] = options["ref"] is True
        elif kind == "multihot":
            case["features"] = torch.randn(total, D, generator=gen, dtype=torch.float64).to(dtype)
            case["other"] = torch.randint(-1, 2, (total, C), generator=gen)
            case["upstream"] = torch.rand(total, generator=gen, dtype=torch.float64).to(dtype)
            if options.get("ref"):  # the same queue on every rank
                case["ref_features"] = torch.randn(5, D, generator=gen, dtype=torch.float64).to(dtype)
                case["ref_targets"] = torch.randint(-1, 2, (5, C), generator=gen)
        elif kind == "supcon":
            case["features"] = F.normalize(torch.randn(total, V, D, generator=gen, dtype=dtype), dim=-1)
            # labels offset by -3: any integer is a class for supcon (the global minimum is subtracted)
            case["other"] = torch.randint(-3, 0, (total,), generator=gen) if options.get("labels", True) else None
        else:
            shape = (total, C, D) if "views" in options else (total, V, C, D)
            case["features"] = torch.randn(*shape, generator=gen, dtype=dtype)
            case["other"] = torch.randint(-1, 2, (total, C), generator=gen)
        inputs[name] = case
    return inputs


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """utils' by-norm check, tightened to 1e-5 relative for fp32 (fp64 cases use utils' 1e-10)."""
    if dtype != torch.float32:
        return assert_close_by_norm(actual, expected, dtype, what)
    assert actual.shape == expected.shape, what
    err = torch.linalg.vector_norm((actual - expected).double()).item()
    ref = torch.linalg.vector_norm(expected.double()).item()
    assert err <= 1e-5 * ref + 1e-7, f"{what}: relative error by norm {err / max(ref, 1e-30):.3e} > 1e-5"


def _call(kind, kwargs, options, features, other, group, ref=None):
    ref = ref or {}  # multihot: ref_features and ref_targets
    if options.get("module"):
        return MODULES[kind](**kwargs, process_group=group)(features, other, **ref)
    return FUNCTIONS[kind](features, other, **kwargs, **ref, process_group=group)


def _ref(case: dict) -> dict:
    """The ref rows of a case as keyword arguments (a fresh leaf, which requires grad unless the case's ref rows
    are detached; with their targets or labels), or {}."""
    if "ref_features" not in case:
        return {}
    leaf = case["ref_features"].clone().requires_grad_(case.get("ref_requires_grad", True))
    other = "ref_targets" if "ref_targets" in case else "ref_labels"
    return {"ref_features": leaf, other: case[other]}


def _shard(x, sizes, rank):
    start = sum(sizes[:rank])
    return x[start : start + sizes[rank]]


def _ddp_inputs(world: int) -> dict:
    gen = torch.Generator().manual_seed(99)
    sizes = [0] + [7] * (world - 1)  # rank 0 holds no rows
    total = sum(sizes)
    return {
        "sizes": sizes,
        "x": torch.randn(total, 5, generator=gen, dtype=torch.float64),
        "labels": torch.randint(0, 3, (total,), generator=gen),
        "weight": torch.randn(D, 5, generator=gen, dtype=torch.float64),
        "bias": torch.randn(D, generator=gen, dtype=torch.float64),
    }


def _ddp_step(rank: int, world: int, out: dict) -> None:
    ddp = _ddp_inputs(world)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(5, D, dtype=torch.float64))
    with torch.no_grad():
        model.module.weight.copy_(ddp["weight"])
        model.module.bias.copy_(ddp["bias"])
    x, y = _shard(ddp["x"], ddp["sizes"], rank), _shard(ddp["labels"], ddp["sizes"], rank)
    loss = fn.label_supcon_loss(model(x), y, normalize=True, backend="cpu", process_group=dist.group.WORLD)
    loss.backward()
    out["ddp"] = {"loss": loss.detach(), "weight": model.module.weight.grad, "bias": model.module.bias.grad}


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/store",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        sub = dist.new_group([0, world - 1])  # every rank takes part in creating it
        inputs = torch.load(os.path.join(tmp, "inputs.pt"))
        out = {}
        for name, (kind, kwargs, options) in CASES.items():
            case = inputs[name]
            group = dist.group.WORLD
            if options.get("group") == "sub":
                if rank not in (0, world - 1):
                    try:
                        _call(kind, kwargs, options, case["features"], case["other"], sub)
                    except ValueError as error:
                        out[name] = {"error": str(error)}
                    continue
                group = sub
            grank = dist.get_rank(group)
            features = _shard(case["features"], case["sizes"], grank).clone().requires_grad_()
            other = None if case["other"] is None else _shard(case["other"], case["sizes"], grank)
            ref = _ref(case)
            loss = _call(kind, kwargs, options, features, other, group, ref)
            if loss.dim() > 0:
                (loss * _shard(case["upstream"], case["sizes"], grank)).sum().backward()
            else:
                loss.backward()
            out[name] = {"loss": loss.detach(), "grad": features.grad, "group_rank": grank}
            if ref:
                out[name]["ref_grad"] = ref["ref_features"].grad

        # DDP: a linear encoder trained on the shards gets the single-process gradient of the whole batch
        # (in world 2 only, with an empty rank: building DDP costs seconds in every process).
        if world in DDP_WORLDS:
            _ddp_step(rank, world, out)

        # all_gather_with_grad alone: forward is the concatenation; backward of sum((r+1) * w * X) on
        # rank r gives rank r the sum over ranks, (1 + ... + world) * w, on its rows. Uneven shards
        # (padded for the reduce-scatter), even ones (not padded), and a backend without reduce-scatter.
        for key, sizes in (("gather", DEFAULT_SIZES[world]), ("gather-even", [2] * world)):
            out[key] = _gather_and_backward(rank, sizes)
        real = dist.reduce_scatter_tensor
        dist.reduce_scatter_tensor = _no_reduce_scatter
        try:
            out["gather-fallback"] = _gather_and_backward(rank, DEFAULT_SIZES[world])
        finally:
            dist.reduce_scatter_tensor = real
        try:
            all_gather_with_grad(torch.zeros(2, 3 + rank))
        except ValueError as error:
            out["gather-mismatch"] = str(error)
        torch.save(out, os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _gather_weights(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.arange(sum(sizes) * 3, dtype=torch.float64).reshape(-1, 3)
    return full, torch.linspace(-1, 1, full.numel(), dtype=torch.float64).reshape(full.shape)


def _gather_and_backward(rank: int, sizes: list[int]) -> dict:
    full, weights = _gather_weights(sizes)
    x = _shard(full, sizes, rank).clone().requires_grad_()
    gathered = mlcontrast.all_gather_with_grad(x)
    ((rank + 1) * weights * gathered).sum().backward()
    return {"value": gathered.detach(), "grad": x.grad, "sizes": sizes}


def _no_reduce_scatter(*args, **kwargs):
    raise RuntimeError("this backend has no reduce_scatter")


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """world -> (inputs, [rank results]); each world is spawned once for the whole module."""
    cache = {}

    def get(world: int):
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            inputs = _make_inputs(world)
            torch.save(inputs, tmp / "inputs.pt")
            mp.spawn(_worker, args=(world, str(tmp)), nprocs=world, join=True)
            cache[world] = inputs, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]
        return cache[world]

    return get


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("world", WORLDS)
def test_matches_single_process(spawned, world, name):
    inputs, results = spawned(world)
    kind, kwargs, options = CASES[name]
    case = inputs[name]
    sizes = case["sizes"]
    features = case["features"].clone().requires_grad_()
    ref = _ref(case)
    expected = FUNCTIONS[kind](features, case["other"], **kwargs, **ref)  # single process over the concatenation
    leaves = (features, ref["ref_features"]) if ref and ref["ref_features"].requires_grad else (features,)
    grad, *ref_grad = torch.autograd.grad(expected, leaves, case["upstream"] if expected.dim() > 0 else None)
    members = [0, world - 1] if options.get("group") == "sub" else list(range(world))
    group_size = len(members)
    dtype = features.dtype
    losses = []
    for rank in range(world):
        result = results[rank][name]
        if rank not in members:
            assert "not a member of process_group" in result["error"]
            continue
        grank = result["group_rank"]
        assert grank == members.index(rank)
        assert result["loss"].dtype == expected.dtype
        want = _shard(expected.detach(), sizes, grank) if expected.dim() > 0 else expected.detach()
        _close(result["loss"], want, dtype, f"{name} loss on rank {rank}")
        _close(result["grad"], group_size * _shard(grad, sizes, grank), dtype, f"{name} grad on rank {rank}")
        losses.append(result["loss"])
    if expected.dim() == 0:
        assert all(torch.equal(loss, losses[0]) for loss in losses), f"{name}: ranks disagree: {losses}"
    if ref and not ref_grad:  # detached ref rows get no gradient on any rank
        assert all(results[rank][name]["ref_grad"] is None for rank in members)
    if ref_grad:  # rank r's ref rows get world_size x its share's gradient: they sum to world_size x the gradient
        total = sum(results[rank][name]["ref_grad"] for rank in members)
        _close(total, group_size * ref_grad[0], dtype, f"{name} ref grad summed over the ranks")


@pytest.mark.parametrize("world", WORLDS)
def test_all_gather_with_grad(spawned, world):
    _, results = spawned(world)
    for rank in range(world):
        for key in ("gather", "gather-even", "gather-fallback"):
            out = results[rank][key]
            sizes = out["sizes"]
            full, weights = _gather_weights(sizes)
            assert torch.equal(out["value"], full)
            expected = sum(r + 1 for r in range(world)) * _shard(weights, sizes, rank)
            assert out["grad"].shape == (sizes[rank], 3)
            torch.testing.assert_close(out["grad"], expected, rtol=1e-15, atol=1e-15, msg=key)
        message = results[rank]["gather-mismatch"]
        assert "same dtype and trailing shape" in message and "rank 1: (2, 4)" in message


@pytest.mark.parametrize("world", DDP_WORLDS)
def test_ddp_reproduces_single_process(spawned, world):
    _, results = spawned(world)
    ddp = _ddp_inputs(world)
    model = torch.nn.Linear(5, D, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(ddp["weight"])
        model.bias.copy_(ddp["bias"])
    loss = fn.label_supcon_loss(model(ddp["x"]), ddp["labels"], normalize=True, backend="cpu")
    loss.backward()
    for rank in range(world):
        out = results[rank]["ddp"]
        assert_close_by_norm(out["loss"], loss.detach(), torch.float64, f"DDP loss on rank {rank}")
        assert_close_by_norm(out["weight"], model.weight.grad, torch.float64, f"DDP weight grad on rank {rank}")
        assert_close_by_norm(out["bias"], model.bias.grad, torch.float64, f"DDP bias grad on rank {rank}")


def test_needs_initialised_distributed():
    assert not dist.is_initialized()
    assert dist.group.WORLD is None  # before init_process_group, passing it means "no process group"
    group = object()  # any group: nothing is initialised here
    z, y = torch.randn(4, D), torch.tensor([0, 0, 1, 1])
    with pytest.raises(RuntimeError, match="not initialised"):
        fn.label_supcon_loss(z, y, process_group=group)
    with pytest.raises(RuntimeError, match="not initialised"):
        fn.supcon_loss(z.reshape(2, 2, D), process_group=group)
    with pytest.raises(RuntimeError, match="not initialised"):
        mlcontrast.MultiLabelSupConLoss(process_group=group)(torch.randn(2, C, D), torch.ones(2, C, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not initialised"):
        all_gather_with_grad(z)
    # local validation comes first, as without a process group
    with pytest.raises(ValueError, match="labels must be"):
        fn.label_supcon_loss(z, y[:3], process_group=group)
