"""update_prototypes_ and PrototypeBank on every fused backend (tests/utils.py: backend_table) against
reference.py.

The backend is a parameter: the ``"full"`` backends run every size, the interpreted Triton backend the
small cases, with each of its ways to form the class sums (one-hot products or atomics:
utils.VARIANTS). The Triton class sums' own properties close the file, in their own section.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from utils import (
    assert_close_by_norm,
    backends,
    cases,
    device_of,
    make_labels,
    make_targets,
    record_launches,
    triton_module,
    use_variant,
)

import mlcontrast
from mlcontrast import reference

BACKENDS = [p.values[0] for p in backends(sizes="full")]


def _absent(labels: torch.Tensor, c: int) -> torch.Tensor:
    present = torch.zeros(c, dtype=torch.bool)
    present[labels[labels >= 0]] = True
    return ~present


def check(backend, protos, z, y, momentum, normalize):
    """Runs both on clones; asserts in-place update, return value, agreement, absent classes untouched."""
    got = protos.clone()
    returned = mlcontrast.update_prototypes_(got, z, y, momentum, normalize, backend=backend)
    assert returned is got, "update_prototypes_ returns its prototypes argument"
    expected = reference.update_prototypes_(protos.to(torch.float64), z.to(torch.float64), y, momentum, normalize)
    assert_close_by_norm(got, expected.to(got.dtype), protos.dtype, "prototypes")
    return got


# 70 x 20 x 40 in the interpreter (tiles of 16): 2 splits, 2 class and 3 D blocks.
SIZES = {
    "full": [(n, c, d, m) for n, c, d in [(1, 1, 1), (7, 3, 3), (257, 20, 64), (1031, 50, 127)]
             for m in [0.0, 0.5, 0.99, 1.0]],  # fmt: skip
    "small": [(5, 3, 7, 0.9), (70, 20, 40, 0.9)],
}


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("backend,variant,n,c,d,momentum,dtype", cases(SIZES, op="update_prototypes_"))
def test_matches_reference(backend, variant, n, c, d, momentum, dtype, normalize, monkeypatch):
    use_variant(monkeypatch, "update_prototypes_", backend, variant)
    dev = device_of(backend)
    protos = F.normalize(torch.randn(c, d), dim=1).to(dev, dtype)
    y = make_labels(n, c, ignore_fraction=0.2).to(dev)
    if c > 2:
        y[y == 1] = 2  # class 1 absent
    got = check(backend, protos, torch.randn(n, d).to(dev, dtype), y, momentum, normalize)
    assert got.dtype == dtype
    absent = _absent(y.cpu(), c).to(dev)
    assert c <= 2 or absent[1]
    assert torch.equal(got[absent], protos[absent]), "absent classes stay bit-for-bit unchanged"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64(backend):
    protos = torch.randn(6, 5, dtype=torch.float64)
    check(backend, protos, torch.randn(40, 5, dtype=torch.float64), make_labels(40, 6, 0.2), 0.7, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_absent_classes_unchanged_bit_for_bit(backend):
    # Un-normalised prototypes and normalize=True: absent rows must not even be re-normalised.
    protos = torch.randn(6, 4) * 3
    y = torch.tensor([1, 1, 4, -1, 4])
    before = protos.clone()
    mlcontrast.update_prototypes_(protos, torch.randn(5, 4), y, 0.9, True, backend=backend)
    for c in (0, 2, 3, 5):
        assert torch.equal(protos[c], before[c]), f"class {c} is absent and must not change"
    for c in (1, 4):
        assert not torch.equal(protos[c], before[c])
        assert protos[c].norm().item() == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_zero_sets_the_class_mean(backend):
    protos = torch.randn(3, 4)
    z = torch.randn(6, 4)
    y = torch.tensor([0, 0, 0, 2, 2, -1])
    mlcontrast.update_prototypes_(protos, z, y, 0.0, False, backend=backend)
    assert_close_by_norm(protos[0], z[:3].mean(0), torch.float32)
    assert_close_by_norm(protos[2], z[3:5].mean(0), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_one_without_normalize_changes_nothing(backend):
    protos = torch.randn(3, 4)
    before = protos.clone()
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    mlcontrast.update_prototypes_(protos, torch.randn(6, 4), y, 1.0, False, backend=backend)
    assert torch.equal(protos, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_changes_nothing(backend):
    protos = torch.randn(4, 3)
    before = protos.clone()
    mlcontrast.update_prototypes_(protos, torch.randn(5, 3), torch.full((5,), -1), 0.5, True, backend=backend)
    assert torch.equal(protos, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
def test_three_dim_features_with_targets(backend, normalize):
    b, c, d = 9, 5, 6
    z = torch.randn(b, c, d)
    targets = make_targets(b, c, p_positive=0.4, p_unknown=0.2)
    targets[:, 3] = torch.tensor([0, -1] * 4 + [0])  # class 3 has no positive: absent
    protos = F.normalize(torch.randn(c, d), dim=1)
    got = protos.clone()
    mlcontrast.update_prototypes_(got, z, targets, 0.8, normalize, backend=backend)
    # Same as the rows with target 1, their column as class.
    rows = z.reshape(-1, d)
    labels = torch.where(targets == 1, torch.arange(c), -1).reshape(-1)
    expected = reference.update_prototypes_(protos.double(), rows.double(), labels, 0.8, normalize)
    assert_close_by_norm(got, expected.float(), torch.float32)
    assert torch.equal(got[3], protos[3])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features_dtype", [torch.float32, torch.float16])
def test_fp16_prototypes(backend, features_dtype):
    protos = F.normalize(torch.randn(10, 32), dim=1).half()
    z = torch.randn(100, 32).to(features_dtype)
    y = make_labels(100, 10, ignore_fraction=0.1)
    y[y == 7] = 3  # class 7 absent
    got = check(backend, protos, z, y, 0.9, True)
    assert got.dtype == torch.float16
    assert torch.equal(got[7], protos[7])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features_into_fp32_prototypes(backend, dtype):
    protos = F.normalize(torch.randn(8, 16), dim=1)
    z = torch.randn(50, 16).to(dtype)
    y = make_labels(50, 8)
    got = protos.clone()
    mlcontrast.update_prototypes_(got, z, y, 0.5, True, backend=backend)
    expected = reference.update_prototypes_(protos.double(), z.double(), y, 0.5, True)
    assert_close_by_norm(got, expected.float(), torch.float32)


@pytest.mark.parametrize("backend", backends())
def test_non_contiguous_prototypes_are_updated_in_place_through_the_view(backend):
    dev = device_of(backend)
    storage = torch.randn(4, 12, device=dev)
    protos = storage[:, ::2]  # [4, 6] view
    before_storage = storage.clone()
    z_base = torch.randn(6, 20, device=dev)
    z = z_base.T  # [20, 6] transposed
    y = make_labels(20, 4).to(dev)
    y[y == 2] = -1  # class 2 absent
    expected = reference.update_prototypes_(protos.double().clone(), z.double(), y, 0.7, True)
    mlcontrast.update_prototypes_(protos, z, y, 0.7, True, backend=backend)
    assert_close_by_norm(storage[:, ::2], expected.float(), torch.float32)
    assert torch.equal(storage[:, 1::2], before_storage[:, 1::2]), "the other columns of the storage are untouched"
    assert torch.equal(storage[2], before_storage[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_features_requiring_grad_record_no_graph(backend):
    protos = torch.randn(3, 4)
    z = torch.randn(5, 4, requires_grad=True)
    mlcontrast.update_prototypes_(protos, z, torch.tensor([0, 1, 2, 0, 1]), 0.5, True, backend=backend)
    assert protos.grad_fn is None and not protos.requires_grad


@pytest.mark.parametrize("backend", BACKENDS + ["torch"])
def test_prototype_bank_update_and_state_dict_round_trip(backend):
    bank = mlcontrast.PrototypeBank(num_classes=5, dim=8, momentum=0.6, backend=backend)
    initial = bank().clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(5))
    z = torch.randn(12, 8)
    y = torch.tensor([0, 0, 1, 1, 1, 3, 3, -1, 0, 1, 3, -1])
    returned = bank.update(z, y)
    assert returned is bank.prototypes
    expected = reference.update_prototypes_(initial.double(), z.double(), y, 0.6, True)
    assert_close_by_norm(bank(), expected.float(), torch.float32)
    assert torch.equal(bank()[[2, 4]], initial[[2, 4]])

    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = mlcontrast.PrototypeBank(num_classes=5, dim=8, momentum=0.6, backend=backend)
    assert not torch.equal(restored(), bank())
    restored.load_state_dict(torch.load(buffer))
    assert torch.equal(restored(), bank())
    assert "prototypes" in bank.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prototype_bank_accepts_three_dim_features_with_targets(backend):
    init = F.normalize(torch.randn(4, 6), dim=1)
    bank = mlcontrast.PrototypeBank(4, 6, momentum=0.5, init=init, backend=backend)
    assert bank().data_ptr() != init.data_ptr(), "init is copied"
    z = torch.randn(3, 4, 6)
    targets = torch.tensor([[1, 0, -1, 0], [1, 1, 0, 0], [0, 1, -1, 0]])
    bank.update(z, targets)
    assert torch.equal(bank()[2:], init[2:])
    expected = reference.update_prototypes_(
        init.double(), z.reshape(-1, 6).double(), torch.tensor([0, -1, -1, -1, 0, 1, -1, -1, -1, 1, -1, -1]), 0.5, True
    )
    assert_close_by_norm(bank(), expected.float(), torch.float32)


@pytest.mark.parametrize("backend", backends())
def test_label_level_targets_match_the_reference_backend_and_no_rows_change_nothing(backend):
    dev = device_of(backend)
    protos = torch.randn(4, 6, device=dev)
    features = torch.randn(3, 4, 6, device=dev)
    targets = make_targets(3, 4, p_positive=0.5).to(dev)
    expected = protos.clone()
    mlcontrast.update_prototypes_(expected, features, targets, 0.5, backend="torch")
    actual = protos.clone()
    mlcontrast.update_prototypes_(actual, features, targets, 0.5, backend=backend)
    assert_close_by_norm(actual, expected, torch.float32, "prototypes")
    untouched = protos.clone()
    mlcontrast.update_prototypes_(untouched, torch.randn(5, 6, device=dev), torch.full((5,), -1, device=dev),
                                  backend=backend)  # fmt: skip
    assert torch.equal(untouched, protos)


# ----------------------------------------------------------------------------------------------
# Triton: the class sums (one-hot products: reproducible, exact in fp32), and the GPU-only cases
# ----------------------------------------------------------------------------------------------


def test_triton_one_hot_sums_are_reproducible_and_mix_dtypes():
    triton_module("update_prototypes")
    dev = device_of("triton")
    protos = F.normalize(torch.randn(20, 24), dim=1).to(dev)
    z = torch.randn(90, 24).to(dev)
    y = make_labels(90, 20, ignore_fraction=0.1).to(dev)
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


def test_triton_class_sums_never_single_pass_tf32(monkeypatch):
    # The one-hot products are documented as exact sums: with TF32 allowed they must still not round
    # the fp32 rows to TF32's 10-bit mantissa (the one-hot factor is exact, so 3xTF32 is enough).
    launched = record_launches(triton_module("update_prototypes"), monkeypatch)
    dev = device_of("triton")
    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        protos, z = torch.randn(3, 6, device=dev), torch.randn(8, 6, device=dev)
        y = torch.tensor([0, 0, 2, 2, 2, -1, 0, 2], device=dev)
        expected = protos.clone()
        reference.update_prototypes_(expected, z, y, 0.8, True)
        mlcontrast.update_prototypes_(protos, z, y, 0.8, True, backend="triton")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before
    assert_close_by_norm(protos, expected, torch.float32, "prototypes")
    precisions = [kwargs["PRECISION"] for name, _, kwargs in launched if name == "_class_sums_kernel"]
    assert precisions == ["tf32x3"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_triton_is_reproducible():
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_triton_low_precision(dtype):
    z, p = torch.randn(2053, 256, device="cuda").to(dtype), torch.randn(80, 256, device="cuda").to(dtype)
    y = torch.randint(-1, 80, (2053,), device="cuda")
    protos = F.normalize(p.float(), dim=1).to(dtype)
    expected = protos.clone()
    reference.update_prototypes_(expected, z, y, 0.99, True)
    mlcontrast.update_prototypes_(protos, z, y, 0.99, True, backend="triton")
    assert_close_by_norm(protos, expected, dtype, "prototypes")
