"""``ContrastQueue``: a FIFO memory of past rows and their labels (MoCo-style queues, cross-batch memory).

The queue is a ring buffer: new rows are written at the write position, which wraps around, and the
oldest rows are overwritten once ``size`` rows are held. Rows are read back oldest first. Its buffers,
fill count and write position are module buffers, so ``state_dict`` saves them, ``load_state_dict``
restores an identical queue and ``.to()`` moves them.
"""

from __future__ import annotations

import operator

import torch
from torch import nn

from mlcontrast import distributed
from mlcontrast._validation import (
    check_features,
    check_label_values,
    check_labels,
    check_multihot_targets,
    check_multihot_values,
    check_same_device,
)

__all__ = ["ContrastQueue"]

# Multi-hot targets hold {-1, 0, 1}: one byte each instead of eight (a 65536 x 80 queue: 5 MiB, not 40).
_TARGET_DTYPE = torch.int8


def _positive_int(value, name: str) -> int:
    """``value`` as an int >= 1 (numpy integers too); ``ValueError`` for anything else, bools included."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return number


class ContrastQueue(nn.Module):
    r"""A FIFO memory of the last ``size`` rows, with their class ids or multi-hot targets.

    After enqueuing batches :math:`x^{(1)}, \dots, x^{(t)}` (each ``[n_k, D]``), the queue holds the last
    :math:`\min(\text{size}, \sum_k n_k)` rows of their concatenation, oldest first, with their labels.
    ``queue.features`` and ``queue.labels`` are what the losses take as reference rows
    (``label_supcon_loss(..., ref_features=, ref_labels=)``, ``multihot_supcon_loss(..., ref_features=,
    ref_targets=)``): extra rows in every anchor's contrast set that are never anchors themselves.

    Storage: features in the queue's floating dtype (float32 unless ``dtype`` is given; ``.to(dtype)``,
    ``.half()`` and ``.double()`` convert it, and enqueued rows are converted to it); labels as int64 class
    ids (``-1`` = takes no part), or multi-hot targets in {1, 0, -1} stored as int8 when ``num_classes``
    is given. Empty slots hold zero features and label ``-1`` (targets 0).

    Reading ``features``, ``labels`` (``targets``, the same) returns a new tensor each time, a snapshot of
    the rows held in FIFO order (one copy of the held rows, O(size·D)): it is not changed by later
    enqueues, so a loss may use it and the queue may be updated before that loss's backward (MoCo's order).

    The fill count and write position are also kept on the host (no device sync per step), so change the
    buffers only through ``enqueue``, ``clear`` and ``load_state_dict``. Inside a DDP model that broadcasts
    buffers, enqueue with ``process_group`` so that every rank's queue is the same.

    Args:
        size: the most rows held (>= 1).
        dim: D, the feature dimension (>= 1).
        num_classes: None for ``[N]`` class-id labels; C (>= 1) for ``[N, C]`` multi-hot targets.
        dtype: floating dtype of the stored features (default ``torch.get_default_dtype()``).
        device: where the buffers live (default: the CPU).

    Shape:
        ``features``: ``[len, D]``; ``labels``: ``[len]`` int64, or ``[len, C]`` int64 when ``num_classes``
        is given. ``len(queue)`` is the number of rows held, at most ``size``.

    Example:
        >>> queue = ContrastQueue(size=4, dim=2)
        >>> queue.enqueue(torch.ones(3, 2), torch.tensor([0, 1, 2]))
        >>> queue.enqueue(torch.zeros(2, 2), torch.tensor([3, 4]))
        >>> len(queue), queue.labels.tolist()
        (4, [1, 2, 3, 4])
    """

    feature_buffer: torch.Tensor
    label_buffer: torch.Tensor
    num_filled: torch.Tensor
    write_position: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        num_classes: int | None = None,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.size = _positive_int(size, "size")
        self.dim = _positive_int(dim, "dim")
        self.num_classes = None if num_classes is None else _positive_int(num_classes, "num_classes")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        label_shape = (self.size,) if self.num_classes is None else (self.size, self.num_classes)
        label_dtype = torch.int64 if self.num_classes is None else _TARGET_DTYPE
        self.register_buffer("feature_buffer", torch.zeros(self.size, self.dim, dtype=dtype, device=device))
        self.register_buffer("label_buffer", torch.empty(label_shape, dtype=label_dtype, device=device))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("write_position", torch.zeros((), dtype=torch.int64, device=device))
        # Host copies of the two counters: slicing needs them, and reading the buffers would sync with the
        # device at every step. The buffers are written alongside and read back on load_state_dict.
        self._filled = 0
        self._position = 0
        self.clear()

    @property
    def multi_hot(self) -> bool:
        """Whether the queue holds ``[N, C]`` multi-hot targets rather than ``[N]`` class ids."""
        return self.num_classes is not None

    def __len__(self) -> int:
        return self._filled

    def _in_fifo_order(self, buffer: torch.Tensor) -> torch.Tensor:
        # Until the queue first wraps, the rows lie in slots [0, filled); afterwards the oldest row is
        # at the write position.
        if self._filled < self.size or self._position == 0:
            return buffer[: self._filled].clone()
        return torch.cat([buffer[self._position :], buffer[: self._position]])

    @property
    def features(self) -> torch.Tensor:
        """The ``[len, D]`` rows held, oldest first (a new tensor, in the queue's dtype, without gradient)."""
        return self._in_fifo_order(self.feature_buffer)

    @property
    def labels(self) -> torch.Tensor:
        """The labels of the rows held, oldest first (a new int64 tensor): ``[len]`` class ids, or ``[len, C]``
        multi-hot targets when the queue has ``num_classes``."""
        return self._in_fifo_order(self.label_buffer).long()

    @property
    def targets(self) -> torch.Tensor:
        """The same as :attr:`labels` (the name the multi-hot losses use)."""
        return self.labels

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, labels)``: the rows held and their labels, oldest first."""
        return self.features, self.labels

    @torch.no_grad()
    def clear(self) -> None:
        """Empty the queue (the buffers keep their size, dtype and device)."""
        self.feature_buffer.zero_()
        self.label_buffer.fill_(0 if self.multi_hot else -1)
        self._set_counters(0, 0)

    def _set_counters(self, filled: int, position: int) -> None:
        self._filled, self._position = filled, position
        self.num_filled.fill_(filled)
        self.write_position.fill_(position)

    def _checked(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The new rows as detached tensors of the storage dtypes, after every check (nothing is written yet)."""
        shape = f"[N, D={self.dim}]"
        check_features(features, "features", (2,), shape)
        if features.shape[1] != self.dim:
            raise ValueError(f"features must be {shape}, got shape {tuple(features.shape)}")
        n = features.shape[0]
        if self.multi_hot:
            labels = check_multihot_targets(labels, "labels", n, self.num_classes, f"[N={n}, C={self.num_classes}]")
        else:
            labels = check_labels(labels, n)  # bool class ids raise TypeError here
        check_same_device(features=features, labels=labels, queue=self.feature_buffer)
        if self.multi_hot:
            check_multihot_values(labels, "labels")
        else:
            check_label_values(labels)
        return features.detach().to(self.feature_buffer.dtype), labels.to(self.label_buffer.dtype)

    @torch.no_grad()
    def enqueue(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        process_group: torch.distributed.ProcessGroup | None = None,
    ) -> None:
        """Append ``features`` ``[N, D]`` and their ``labels`` (``[N]`` class ids, or ``[N, C]`` multi-hot
        targets), overwriting the oldest rows once ``size`` are held. A detached copy is stored.

        With ``process_group``, every rank's rows are gathered in rank order first (ranks may pass different
        numbers of rows, 0 included), so every rank of the group holds the same queue; every rank must call
        it (a collective: one small all_gather of the row counts, then one of the rows and one of the labels).

        More than ``size`` new rows: the newest ``size`` are kept. ``N = 0``: nothing changes.

        Raises:
            ValueError: features not ``[N, D]``, labels not ``[N]`` (``[N, C]``), a label < -1 (a target
                outside {-1, 0, 1}), tensors not on the queue's device. Nothing is written on error.
            TypeError: integer features, floating (or bool class-id) labels.
        """
        features, labels = self._checked(features, labels)
        if process_group is not None:
            distributed.check_process_group(process_group)
            sizes = distributed.gather_sizes(features, process_group)
            features = distributed.all_gather_no_grad(features.contiguous(), sizes, process_group)
            labels = distributed.all_gather_no_grad(labels.contiguous(), sizes, process_group)
        self._write(features, labels)

    def _write(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        n = features.shape[0]
        if n == 0:
            return
        if n >= self.size:  # only the newest `size` rows survive: lay them out from slot 0
            self.feature_buffer.copy_(features[n - self.size :])
            self.label_buffer.copy_(labels[n - self.size :])
            self._set_counters(self.size, 0)
            return
        start = self._position
        first = min(n, self.size - start)  # rows up to the end of the buffer; the rest wrap to slot 0
        self.feature_buffer[start : start + first] = features[:first]
        self.label_buffer[start : start + first] = labels[:first]
        self.feature_buffer[: n - first] = features[first:]
        self.label_buffer[: n - first] = labels[first:]
        self._set_counters(min(self._filled + n, self.size), (start + n) % self.size)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        # The host copies of the counters follow the loaded buffers. Counters that no queue of this size
        # could hold are refused before anything is copied; any other error leaves the queue as it was.
        filled = state_dict.get(prefix + "num_filled")
        position = state_dict.get(prefix + "write_position")
        if filled is not None and position is not None:
            filled, position = int(filled), int(position)
            if not _possible_counters(filled, position, self.size):
                args[-1].append(  # error_msgs, after (local_metadata, strict, missing_keys, unexpected_keys)
                    f"{prefix or 'ContrastQueue'}: num_filled={filled} and write_position={position} are not the "
                    f"counters of a queue of size {self.size}"
                )
                return
        _, strict, *problems = args  # missing_keys, unexpected_keys, error_msgs: each is an error when strict
        counts, kept = [len(p) for p in problems], {name: b.clone() for name, b in self._buffers.items()}
        super()._load_from_state_dict(state_dict, prefix, *args)
        grew = [len(p) > count for p, count in zip(problems, counts)]
        if grew[2] or (strict and any(grew)):  # load_state_dict will raise: keep the queue as it was, whole
            for name, buffer in kept.items():
                self._buffers[name].copy_(buffer)
        self._filled, self._position = int(self.num_filled), int(self.write_position)

    def extra_repr(self) -> str:
        classes = "" if self.num_classes is None else f", num_classes={self.num_classes}"
        return f"size={self.size}, dim={self.dim}{classes}, len={len(self)}, dtype={self.feature_buffer.dtype}"


def _possible_counters(filled: int, position: int, size: int) -> bool:
    """Whether a queue of ``size`` slots can hold ``filled`` rows with that write position: until it is full,
    the write position is the fill count; once full, any slot."""
    if not (0 <= filled <= size and 0 <= position < size):
        return False
    return filled == size or position == filled
