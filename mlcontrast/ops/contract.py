r"""The contract of the fused ops: every op stated once, and its fake kernel and autograd formula.

Each fused op exists in two libraries: ``torch.ops.mlcontrast`` (the compiled C++/CUDA kernels, schemas
in ``csrc/ops.cpp``) and ``torch.ops.mlcontrast_triton`` (the Triton kernels, ``mlcontrast/ops/<op>.py``).
Both have the same required inputs, the same outputs and the same backward op, as :data:`FUSED_OPS` says;
a backend-only option (Triton's ``atomic``) is a defaulted argument after the contract's, and the
autograd formula forwards it to the backward op as its trailing argument.

Every op's forward returns its result first (the per-row losses, or the scalar loss), then the
statistics its backward needs (O(N) or O(B C), never N x N), which are not differentiable. The backward
op ``<op>_backward`` takes, in order: the incoming gradient of the result, the forward's tensor inputs,
the saved statistics, the forward's other inputs; and returns the gradients of the inputs named in
``grads``, in that order. Statistics are in the compute dtype: fp64 when a floating input named in
``dtype_of`` is fp64, fp32 otherwise.

Registration, for a library ``namespace`` whose ops follow the contract:

* :func:`fake` gives the fake (meta) kernel of an op or a backward op (``torch.compile`` traces through
  it); it ignores trailing backend-only arguments.
* :func:`register_autograd` registers the one autograd formula of an op (``setup_context`` saves the
  tensor inputs and the statistics; ``backward`` calls ``torch.ops.<namespace>.<op>_backward``).

``tests/test_contract.py`` checks that both libraries' schemas are the ones stated here.

Example:
    >>> schema("label_supcon_backward")  # doctest: +ELLIPSIS
    'label_supcon_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor lse, Tensor n_pos, ...'
    >>> [o.name for o in FUSED_OPS["prototype_nce"].saved]
    ['stats', 'logits', 'norm']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from mlcontrast._base import compute_dtype

__all__ = ["Arg", "FUSED_OPS", "FusedOp", "Output", "REQUIRED", "fake", "op", "register_autograd",
           "register_fakes", "schema", "signature"]  # fmt: skip

#: The default of an argument that has none.
REQUIRED: Any = object()


@dataclass(frozen=True)
class Arg:
    """One argument of a schema: ``type`` as torch spells it (``Tensor``, ``Tensor(a!)`` for an argument
    written in place, ``float``, ``int``, ``int?``, ``bool``)."""

    name: str
    type: str
    default: Any = REQUIRED

    @property
    def is_tensor(self) -> bool:
        return self.type.startswith("Tensor")

    def schema(self) -> str:
        text = f"{self.type} {self.name}"
        return text if self.default is REQUIRED else f"{text}={self.default!r}"


@dataclass(frozen=True)
class Output:
    """One output of a forward op: its shape from the bound inputs, and what it holds."""

    name: str
    shape: Callable[[Mapping[str, Any]], Sequence[int]]
    doc: str


@dataclass(frozen=True)
class FusedOp:
    """A fused op of the contract.

    Attributes:
        name: the op's name in every library; its backward is ``<name>_backward``.
        args: the forward's arguments, as in the schema.
        outputs: the result (differentiable) first, then the statistics saved for backward; empty for an
            op that only writes an argument in place.
        grads: the inputs that get a gradient, in the order the backward op returns them.
        grad_name: the name of the backward's incoming-gradient argument.
        dtype_of: the floating inputs whose dtypes decide the compute dtype of the outputs.
        doc: what the op computes.
        backends: the fused backends that have its kernels (an op new to the package may reach the others
            later; ``"auto"`` skips a backend without them and an explicit request raises saying so).
    """

    name: str
    args: tuple[Arg, ...]
    outputs: tuple[Output, ...]
    grads: tuple[str, ...]
    grad_name: str
    dtype_of: tuple[str, ...]
    doc: str
    backends: tuple[str, ...] = ("cpu", "cuda", "triton")

    @property
    def saved(self) -> tuple[Output, ...]:
        """The statistics the forward returns for the backward."""
        return self.outputs[1:]

    @property
    def backward(self) -> str | None:
        return f"{self.name}_backward" if self.grads else None

    @property
    def tensor_args(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if a.is_tensor)

    @property
    def other_args(self) -> tuple[Arg, ...]:
        return tuple(a for a in self.args if not a.is_tensor)

    def backward_args(self) -> tuple[Arg, ...]:
        """The backward op's arguments: gradient, tensor inputs, statistics, the other inputs."""
        stats = tuple(Arg(o.name, "Tensor") for o in self.saved)
        return (Arg(self.grad_name, "Tensor"), *self.tensor_args, *stats, *self.other_args)


def _rows(a: Mapping[str, Any]) -> tuple[int]:
    return (a["features"].shape[0],)


def _columns(a: Mapping[str, Any]) -> tuple[int, int]:
    return tuple(a["features"].shape[:2])


_TEMPERATURE = Arg("temperature", "float")
_ANCHORS = (Arg("anchor_start", "int", 0), Arg("anchor_stop", "int?", None))
# Rectangular work (reference rows, queues): rows before contrast_start are in no contrast set (they may be
# anchors), and only rows before grad_stop (None: R) get the gradient of their role as another anchor's
# contrast row; anchors always get the gradient of their own loss.
_ROLES = (Arg("contrast_start", "int", 0), Arg("grad_stop", "int?", None))

#: Every fused op of the package, by name.
FUSED_OPS: dict[str, FusedOp] = {
    fused.name: fused
    for fused in (
        FusedOp(
            name="label_supcon",
            args=(Arg("features", "Tensor"), Arg("labels", "Tensor"), _TEMPERATURE, Arg("base_temperature", "float"),
                  *_ANCHORS, *_ROLES),  # fmt: skip
            outputs=(
                Output("loss", _rows, "[R] per-row loss; 0 on ignored rows, rows without positives and outside "
                       "the anchors"),  # fmt: skip
                Output("lse", _rows, "[R] LSE_{j in A(i)} s_ij of the anchors (-inf when there is nothing to contrast "
                       "with); 0 on ignored rows and outside the anchors"),  # fmt: skip
                Output("n_pos", _rows, "[R] |P(i)| of the valid anchors, 0 elsewhere"),
            ),
            grads=("features",),
            grad_name="grad_rows",
            dtype_of=("features",),
            doc="label-level SupCon of the anchor rows [anchor_start, anchor_stop) (stop None: R) against the "
            "contrast set A(i) = {j != i : j >= contrast_start, label_j >= 0}, P(i) = its rows of i's label; the "
            "backward gives rows j < grad_stop (None: R) their contrast-role gradient and the anchors their own "
            "loss's (rows neither get 0, and no work)",
        ),
        FusedOp(
            name="label_supcon_queue",
            args=(Arg("features", "Tensor"), Arg("labels", "Tensor"), Arg("queue", "Tensor"),
                  Arg("queue_labels", "Tensor"), _TEMPERATURE, Arg("base_temperature", "float"),
                  Arg("normalize_queue", "bool"), *_ANCHORS, Arg("grad_stop", "int?", None)),  # fmt: skip
            outputs=(
                Output("loss", _rows, "[N] per-row loss; 0 on ignored rows, rows without positives and outside "
                       "the anchors"),  # fmt: skip
                Output("lse", _rows, "[N] LSE_{j in A(i)} s_ij of the anchors over batch and queue (-inf when there "
                       "is nothing to contrast with); 0 on ignored rows and outside the anchors"),  # fmt: skip
                Output("n_pos", _rows, "[N] |P(i)| of the valid anchors (batch and queue), 0 elsewhere"),
                Output("queue_mean", lambda a: tuple(a["features"].shape), "[N, D] sum_{j in queue} "
                       "e^{s_ij - lse_i} q_j of the anchors (q_j unit rows if normalize_queue), 0 elsewhere"),
            ),
            grads=("features",),
            grad_name="grad_rows",
            dtype_of=("features",),
            doc="label-level SupCon of the anchor rows [anchor_start, anchor_stop) (stop None: N) against the other "
            "valid batch rows and the valid rows of a detached queue [M, D] (L2-normalised in the kernel if "
            "normalize_queue), P(i) = those of i's label; the queue gets no gradient and no gradient work, and "
            "batch rows j >= grad_stop (None: N) none for their contrast role (a batch whose copies are the "
            "contrast rows, as in a cross-batch memory)",
            backends=("cpu",),
        ),
        FusedOp(
            name="multihot_supcon",
            args=(Arg("features", "Tensor"), Arg("targets", "Tensor"), _TEMPERATURE, Arg("base_temperature", "float"),
                  Arg("positives", "str"), Arg("threshold", "float"), *_ANCHORS, Arg("grad_stop", "int?", None)),  # fmt: skip
            outputs=(
                Output("loss", _rows, "[R] per-row loss; 0 on rows without positives and outside the anchors"),
                Output("lse", _rows, "[R] LSE_{j != i} s_ij of the anchors over every other row (-inf when there "
                       "is nothing to contrast with); 0 outside the anchors"),  # fmt: skip
                Output("coef", _rows, "[R] sum_p w_ip / |P(i)| (mulsupcon: the number of label anchors); 0 without "
                       "positives and outside the anchors"),  # fmt: skip
                Output("count", _rows, "[R] |P(i)| (mulsupcon: the number of label anchors); 0 outside the anchors"),
            ),
            grads=("features",),
            grad_name="grad_rows",
            dtype_of=("features",),
            doc="multi-hot SupCon of the anchor rows [anchor_start, anchor_stop) (stop None: R) against all R rows; "
            "targets [R, C] uint8 (1 = label present), positives 'jaccard' | 'any' | 'all' | 'mulsupcon'; the "
            "backward gives rows j < grad_stop (None: R) their contrast-role gradient and the anchors their own "
            "loss's (rows neither get 0, and no work)",
        ),
        FusedOp(
            name="prototype_ce",
            args=(Arg("features", "Tensor"), Arg("labels", "Tensor"), Arg("prototypes", "Tensor"), _TEMPERATURE),
            outputs=(
                Output("loss", _rows, "[N] per-row cross-entropy of cos(z_i, p_c) / t at labels[i]; 0 on ignored rows"),
                Output("lse", _rows, "[N] LSE_c cos(z_i, p_c) / t"),
                Output("norm", _rows, "[N] max(||z_i||, 1e-8)"),
            ),
            grads=("features", "prototypes"),
            grad_name="grad_rows",
            dtype_of=("features", "prototypes"),
            doc="each row against all C prototypes: cross-entropy of cosine logits",
        ),
        FusedOp(
            name="prototype_nce",
            args=(Arg("features", "Tensor"), Arg("prototypes", "Tensor"), Arg("targets", "Tensor"), _TEMPERATURE),
            outputs=(
                Output("loss", lambda a: (), "[] the PSCL loss"),
                Output("stats", lambda a: (2, a["prototypes"].shape[0]), "[2, C] per-class LSE of s_bc over the "
                       "positives (row 0) and over the known entries (row 1); 0 for an empty set"),  # fmt: skip
                Output("logits", _columns, "[B, C] s_bc = cos(z_bc, p_c) / t, every entry"),
                Output("norm", _columns, "[B, C] max(||z_bc||, 1e-8)"),
            ),
            grads=("features", "prototypes"),
            grad_name="grad",
            dtype_of=("features", "prototypes"),
            doc="SADCL's prototype-to-sample NCE: each prototype against its class column",
        ),
        FusedOp(
            name="update_prototypes_",
            args=(Arg("prototypes", "Tensor(a!)"), Arg("features", "Tensor"), Arg("labels", "Tensor"),
                  Arg("momentum", "float"), Arg("normalize", "bool")),  # fmt: skip
            outputs=(),
            grads=(),
            grad_name="",
            dtype_of=("prototypes",),
            doc="in place: EMA of each present class's prototype towards its rows' mean (no gradient)",
        ),
    )
}


def op(name: str) -> FusedOp:
    """The fused op ``name``, or the one whose backward op ``name`` is."""
    if name in FUSED_OPS:
        return FUSED_OPS[name]
    forward = FUSED_OPS.get(name.removesuffix("_backward"))
    if forward is None or forward.backward != name:
        raise KeyError(f"{name!r} is not a fused op of the contract ({', '.join(FUSED_OPS)} and their backward ops)")
    return forward


def signature(name: str) -> tuple[tuple[Arg, ...], int]:
    """``(arguments, number of returned tensors)`` of the op or backward op ``name``."""
    forward = op(name)
    if name == forward.name:
        return forward.args, len(forward.outputs)
    return forward.backward_args(), len(forward.grads)


def schema(name: str) -> str:
    """The schema of ``name`` (without the namespace), as ``csrc/ops.cpp`` defines it.

    Example:
        >>> schema("prototype_ce")
        'prototype_ce(Tensor features, Tensor labels, Tensor prototypes, float temperature) -> (Tensor, Tensor, Tensor)'
    """
    args, returns = signature(name)
    result = "()" if returns == 0 else "Tensor" if returns == 1 else f"({', '.join(['Tensor'] * returns)})"
    return f"{name}({', '.join(a.schema() for a in args)}) -> {result}"


def _bind(args: tuple[Arg, ...], given: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # The contract's arguments by name, defaults filled in; trailing backend-only arguments are left out.
    values = dict(zip((a.name for a in args), given))
    values.update((k, v) for k, v in kwargs.items() if any(a.name == k for a in args))
    for a in args:
        if a.name not in values and a.default is not REQUIRED:
            values[a.name] = a.default
    return values


def _output_dtype(forward: FusedOp, values: Mapping[str, Any]) -> torch.dtype:
    dtypes = [compute_dtype(values[name].dtype) for name in forward.dtype_of]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def fake(name: str) -> Callable:
    """The fake (meta) kernel of the op or backward op ``name``: empty outputs of the contract's shapes and
    dtypes (contiguous gradients, in their inputs' dtypes). Extra trailing arguments are ignored.

    Example:
        >>> loss, lse, n_pos = fake("label_supcon")(torch.empty(5, 3, device="meta"), torch.empty(5), 0.1, 0.1)
        >>> n_pos.shape, n_pos.dtype
        (torch.Size([5]), torch.float32)
    """
    forward = op(name)
    args, _ = signature(name)

    def forward_fake(*given, **kwargs):
        values = _bind(args, given, kwargs)
        if not forward.outputs:
            return None
        like, dtype = values[forward.dtype_of[0]], _output_dtype(forward, values)
        return tuple(like.new_empty(tuple(o.shape(values)), dtype=dtype) for o in forward.outputs)

    def backward_fake(*given, **kwargs):
        values = _bind(args, given, kwargs)
        grads = tuple(torch.empty_like(values[g], memory_format=torch.contiguous_format) for g in forward.grads)
        return grads[0] if len(grads) == 1 else grads

    fn = forward_fake if name == forward.name else backward_fake
    fn.__name__ = f"fake_{name}"
    return fn


def register_fakes(namespace: str) -> None:
    """Registers :func:`fake` for every op and backward op of the contract in the library ``namespace``
    (for libraries defined in C++; a Python ``custom_op`` takes ``fake(name)`` at its definition)."""
    for forward in FUSED_OPS.values():
        for name in (forward.name, forward.backward):
            if name is not None:
                torch.library.register_fake(f"{namespace}::{name}", fake(name))


def register_autograd(namespace: str, name: str) -> None:
    """Registers the one autograd formula of the fused op ``namespace::name``.

    Args:
        namespace: the library (``"mlcontrast"``, ``"mlcontrast_triton"``); its ``<name>_backward`` op
            must be defined when the backward runs.
        name: a fused op of :data:`FUSED_OPS` with a backward.

    The forward's inputs are the contract's arguments followed by any backend-only ones; the backward
    op ``torch.ops.<namespace>.<name>_backward`` gets the gradient of the result, the tensor inputs, the
    saved statistics, the other inputs and then the backend-only arguments, in the forward's order.
    Statistics are marked non-differentiable; backend-only arguments get no gradient.

    Example:
        >>> register_autograd("mlcontrast_triton", "label_supcon")  # once both of its ops are defined
    """
    forward = op(name)
    if forward.backward is None:
        raise ValueError(f"{name} has no backward")
    count = len(forward.args)
    tensor_names = [a.name for a in forward.tensor_args]
    other_names = [a.name for a in forward.other_args]

    def setup_context(ctx, inputs, output):
        values = dict(zip((a.name for a in forward.args), inputs[:count]))
        ctx.others = tuple(values[n] for n in other_names) + tuple(inputs[count:])
        ctx.extra = len(inputs) - count
        stats = tuple(output[1:])
        ctx.mark_non_differentiable(*stats)
        ctx.save_for_backward(*(values[n] for n in tensor_names), *stats)

    def backward(ctx, grad, *unused_stat_grads):
        backward_op = getattr(getattr(torch.ops, namespace), forward.backward)
        result = backward_op(grad, *ctx.saved_tensors, *ctx.others)
        by_name = dict(zip(forward.grads, (result,) if isinstance(result, torch.Tensor) else result))
        return (*(by_name.get(a.name) for a in forward.args), *(None,) * ctx.extra)

    torch.library.register_autograd(f"{namespace}::{name}", backward, setup_context=setup_context)
