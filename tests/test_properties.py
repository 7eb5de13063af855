"""Hypothesis: the fused CPU backends against reference.py on random shapes and labels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from utils import assert_matches, cpu_backends

import mlcontrast
from mlcontrast import reference

BACKENDS = cpu_backends()
SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@st.composite
def labelled_rows(draw):
    n = draw(st.integers(1, 300))
    d = draw(st.integers(1, 70))
    classes = draw(st.integers(1, 10))
    ignored = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=gen)
    y = torch.randint(0, classes, (n,), generator=gen)
    y[torch.rand(n, generator=gen) < ignored] = -1
    return z, y, classes


temperatures = st.floats(0.05, 1.0, allow_nan=False)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(
    case=labelled_rows(),
    temperature=temperatures,
    normalize=st.booleans(),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_label_supcon_matches_reference(backend, case, temperature, normalize, reduction):
    z, y, _ = case
    if not normalize:
        z = z / z.shape[1] ** 0.5  # keep un-normalised logits in a sane range
    upstream = torch.randn(z.shape[0], dtype=torch.float64) if reduction == "none" else None
    assert_matches(
        lambda x: mlcontrast.label_supcon_loss(x, y, temperature, None, reduction, normalize, backend=backend),
        lambda x: reference.label_supcon_loss(x, y, temperature, None, reduction, normalize),
        [z],
        upstream,
        names=["features"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=labelled_rows(), temperature=temperatures)
def test_prototype_ce_matches_reference(backend, case, temperature):
    z, y, classes = case
    p = torch.randn(classes, z.shape[1], generator=torch.Generator().manual_seed(z.shape[0]))
    assert_matches(
        lambda x, q: mlcontrast.prototype_ce_loss(x, y, q, temperature, backend=backend),
        lambda x, q: reference.prototype_ce_loss(x, y, q, temperature),
        [z, p],
        names=["features", "prototypes"],
    )
