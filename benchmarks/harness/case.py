"""One case, child side: a bench script's :class:`CaseSetup` (the phases of one iteration and what to check),
run, timed and measured by :func:`run_case`; the providers (the eager and compiled references, fused
backends and their variants) and the function each one times (:func:`provider_function`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.harness.constants import MIB
from benchmarks.harness.devices import select_cuda_device, tf32_allowed
from benchmarks.harness.memory import PeakMemory, limit_address_space
from benchmarks.harness.retry import import_mlcontrast
from benchmarks.harness.timing import RepeatPolicy, time_phases

REFERENCE_PROVIDERS = ("torch", "torch_compile")

#: Providers that run a fused backend in another mode: provider -> (backend, environment of the case's process).
BACKEND_VARIANTS: dict[str, tuple[str, dict[str, str]]] = {
    "triton_atomic": ("triton", {"MLCONTRAST_TRITON_ATOMIC": "1"}),
}


def backend_of(provider: str) -> str:
    """The mlcontrast backend a fused provider calls (itself, or the backend of a variant)."""
    return BACKEND_VARIANTS.get(provider, (provider, {}))[0]


# Outputs kept for the correctness check between providers (bytes, as fp32); larger ones are not kept.
MAX_SAVED_OUTPUT_BYTES = 256 * MIB


@dataclass
class CaseSetup:
    """What a bench script builds for one case (in the child): the phases of one iteration and what to check.

    ``phases``: ``(name, fn)`` run in order as ``state = fn(state)`` (see :func:`time_phases`); ``reset``:
    untimed, before every iteration; ``outputs()``: the tensors compared with the eager reference after
    the run (gradients, or the tensor updated in place); ``loss()``: the last loss, or None for an op
    without one; ``grad_bytes``: bytes of the gradients one iteration returns (subtracted from the peak
    for ``memory.beyond_inputs_and_grads_bytes``).
    """

    phases: list[tuple[str, Callable[[Any], Any]]]
    reset: Callable[[], None]
    outputs: Callable[[], dict[str, Any]]
    loss: Callable[[], Any] | None = None
    grad_bytes: int = 0


def loss_case(loss_fn: Callable[[], Any], leaves: dict[str, Any]) -> CaseSetup:
    """A loss op: ``fwd`` = ``loss_fn()`` with autograd enabled (it saves what backward needs), ``bwd`` =
    ``loss.backward()`` of that forward; ``reset`` clears the ``.grad`` of ``leaves``, whose gradients are
    the outputs (named by their keys: ``{"grad": features, "prototypes_grad": prototypes}``)."""
    last: dict[str, Any] = {}

    def reset() -> None:
        for t in leaves.values():
            t.grad = None

    def forward(_: Any) -> Any:
        return loss_fn()

    def backward(loss: Any) -> None:
        loss.backward()
        last["loss"] = loss.detach()

    return CaseSetup(
        phases=[("fwd", forward), ("bwd", backward)], reset=reset,
        outputs=lambda: {name: t.grad for name, t in leaves.items()}, loss=lambda: last["loss"],
        grad_bytes=sum(t.numel() * t.element_size() for t in leaves.values()),
    )


def unavailable_reason(provider: str, device: str, mlcontrast, op: str | None = None) -> str | None:
    """None when the fused backend ``provider`` runs on ``device`` (and has the kernels of the contract's
    ``op``, when given), otherwise why not."""
    import torch

    from mlcontrast import _backends

    if provider in mlcontrast.available_backends(device):
        return None if op is None else _backends._missing_kernels(op, provider)
    return _backends.why_unavailable(provider, torch.device(device)) or "not in available_backends"


def run_case(setup_case: Callable[[dict[str, Any], Any], CaseSetup], case: dict[str, Any]) -> dict[str, Any]:
    """Runs one (provider, N) case in this process and returns its record (without the case fields);
    ``setup_case(case, mlcontrast)`` is the op's ``BenchSpec.setup``."""
    import torch

    if case.get("threads"):
        torch.set_num_threads(int(case["threads"]))
    device, provider = case["device"], case["provider"]
    os.environ.update(BACKEND_VARIANTS.get(provider, ("", {}))[1])  # this process runs this one case
    mlcontrast = import_mlcontrast()
    if provider not in REFERENCE_PROVIDERS:
        reason = unavailable_reason(backend_of(provider), device, mlcontrast, case.get("op"))
        if reason is not None:
            return {"status": "unavailable", "message": f"backend {provider!r} unavailable on {device}: {reason}"}
    if device.startswith("cuda"):
        select_cuda_device(device, case.get("allow_tf32", False))

    setup = setup_case(case, mlcontrast)
    # The cap is set after the imports and the inputs: it bounds what the benchmark itself allocates.
    limit = None if device.startswith("cuda") else limit_address_space(case.get("max_memory_gib"))

    policy = RepeatPolicy.from_dict(case["policy"])
    if provider == "torch_compile":  # the first warm-up iteration compiles (the forward and the backward)
        policy.first_warmup_free = True
        policy.warmup = max(policy.warmup, 2)
    probe = PeakMemory(device)
    timing = time_phases(setup.phases, reset=setup.reset, device=device, policy=policy, probe=probe)
    times = timing["times"]
    time_s = {name: times[name] for name, _ in setup.phases}
    time_s["full"] = times["total"]

    outputs = {k: v.detach() for k, v in setup.outputs().items() if v is not None}
    loss = setup.loss() if setup.loss is not None else None
    memory = dict(probe.result or {})
    if "extra_peak_bytes" in memory:
        memory["grad_bytes"] = setup.grad_bytes
        memory["beyond_inputs_and_grads_bytes"] = max(0, memory["extra_peak_bytes"] - setup.grad_bytes)
    # Norms accumulated in fp32 without an fp64 copy (the largest-N probe runs near the memory limit); a
    # norm is finite exactly when every element is (short of an overflow of the sum of squares).
    norms = {k: float(torch.linalg.vector_norm(v, dtype=torch.float32).item()) for k, v in outputs.items()}
    finite = all(math.isfinite(x) for x in norms.values())
    record: dict[str, Any] = {"status": "ok", "time_s": time_s, "memory": memory, "warmup": timing["warmup"],
                              "repeats": times["total"]["n"]}
    if loss is not None:
        record["loss"] = float(loss.item())
        finite = finite and math.isfinite(record["loss"])
    if "grad" in norms:
        record["grad_norm"] = norms["grad"]
    record["output_norms"] = norms
    record.update(finite=finite, threads=torch.get_num_threads(), address_space_limit_bytes=limit)
    if device.startswith("cuda"):
        record["allow_tf32"] = tf32_allowed()
    if provider in BACKEND_VARIANTS:
        record["backend"], record["environment"] = BACKEND_VARIANTS[provider]

    out_dir = case.get("artifacts_dir")
    if out_dir and sum(v.numel() for v in outputs.values()) * 4 <= MAX_SAVED_OUTPUT_BYTES:
        path = Path(out_dir) / f"{provider}_{case['n']}.pt"
        torch.save({"loss": None if loss is None else loss.double().cpu(),
                    "outputs": {k: v.float().cpu() for k, v in outputs.items()}}, path)
        record["output_file"] = str(path)
    return record


def provider_function(provider: str, mlcontrast, name: str, **kwargs: Any):
    """The function a provider times, with ``kwargs`` bound: ``mlcontrast.reference.<name>`` run eagerly
    ("torch") or under ``torch.compile(dynamic=False)`` ("torch_compile"), or the public
    ``mlcontrast.<name>`` with ``backend=provider`` (a fused backend)."""
    import functools

    import torch

    if provider == "torch":
        return functools.partial(getattr(mlcontrast.reference, name), **kwargs)
    if provider == "torch_compile":
        return functools.partial(torch.compile(getattr(mlcontrast.reference, name), dynamic=False), **kwargs)
    return functools.partial(getattr(mlcontrast, name), backend=backend_of(provider), **kwargs)
