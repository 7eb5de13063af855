"""Reading the files that the released training code loads, from local paths (nothing is downloaded).

- :func:`load_class_matrix`: a ``[C, width]`` float ``.npy``. SADCL's shipped prototypes
  (``data/prototype/vis_prototype_embed_file_select_resnet101_448_coco_085.npy``: float32 ``[80, 2048]``,
  loaded with ``np.load`` at ``code/lib_sadcl/models/sadcl.py:103-111``) and HST's GloVe class vectors
  (``data/coco/vectors.npy`` of the repo's data.zip: ``[80, 300]``, ``np.load`` at ``utils/dataloader.py:34-44``,
  shape stated at ``model/SemanticDecoupling.py:26``).
- :func:`load_sadcl_state`: a Query2Label-style checkpoint (SADCL's stage 1, ``model_best.pth.tar``: a dict
  whose ``state_dict`` holds DDP's ``module.``-prefixed names, ``code/lib_q2l/main_worker.py:225-245``) copied
  into :class:`~mlcontrast.train.methods.sadcl.SADCL` by name, as the released ``load_model``
  (``code/lib_sadcl/utils/util.py:85-132``) copies the matching keys; a 20-class model takes the class rows of an
  80-class (COCO) checkpoint through the released VOC ← COCO map (``util.py:110-125``).

Every function is strict: a missing file, a wrong shape or a name that maps nowhere is an error that says
what did not load, and nothing is changed when it fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

__all__ = ["VOC_FROM_COCO", "load_class_matrix", "load_torch_file", "sadcl_state_from_released",
           "load_sadcl_state"]

#: VOC class i (alphabetical, as ``VOC_CLASSES``) ← COCO class ``VOC_FROM_COCO[i]`` (category-id order), as the
#: released stage-2 initialisation maps query embeddings and classifier rows (SADCL ``utils/util.py:113``)
VOC_FROM_COCO = (4, 1, 14, 8, 39, 5, 2, 15, 56, 19, 60, 16, 17, 3, 0, 58, 18, 57, 6, 62)

_LIST_LIMIT = 12  # names shown per list in an error message


def _require_file(path, option: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{option}: file not found: {path}")
    return p


def load_class_matrix(path, *, option: str, num_classes: int, width: int | None = None,
                      what: str = "class matrix") -> torch.Tensor:
    """A ``[num_classes, width]`` float32 tensor from a ``.npy`` file (a leading axis of 1 is accepted: the
    released SADCL keeps its prototype as ``[1, C, d]``).

    Args:
        path: local ``.npy`` file (read with ``allow_pickle=False``).
        option: the command-line option, for the messages.
        what: what the file holds, for the messages.
        num_classes: the rows it must have.
        width: the columns it must have (``None``: any).

    Raises:
        FileNotFoundError: no such file. ValueError: not a float array, wrong shape or non-finite values.

    Example:
        >>> glove = load_class_matrix("data/coco/vectors.npy", option="--hst-word-vectors", num_classes=80,
        ...                           width=300)  # doctest: +SKIP
    """
    p = _require_file(path, option)
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"{option}: {p} is not a numeric .npy array ({e})") from e
    if not isinstance(arr, np.ndarray) or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{option}: {p} must hold a float array, got {getattr(arr, 'dtype', type(arr))}")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    want = f"[C={num_classes}, {width if width is not None else 'E'}]"
    if arr.ndim != 2 or arr.shape[0] != num_classes or (width is not None and arr.shape[1] != width):
        raise ValueError(f"{option}: the {what} in {p} have shape {tuple(arr.shape)}, expected {want}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{option}: the {what} in {p} hold non-finite values")
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _numpy_scalar_globals() -> list:
    # Checkpoints pickle numpy scalars (the released best_mAP is np.float64): allow exactly those, under the
    # numpy 1 and numpy 2 module names, and nothing that could run code.
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    dtype_classes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") \
        else []  # numpy >= 1.25 pickles a dtype through its class (Float64DType)
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype,
            *dtype_classes]


def load_torch_file(path, *, option: str):
    """``torch.load`` of a local file on the CPU with ``weights_only=True`` (tensors, containers, numbers and
    numpy scalars only). Raises FileNotFoundError, or ValueError when the file holds anything else."""
    p = _require_file(path, option)
    try:
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors come in many types; say which file and why
        raise ValueError(f"{option}: cannot read {p} as a weights-only torch file: {str(e).splitlines()[0]}") from e


def _state_dict_of(obj, option: str) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``state_dict`` (the releases), ``model`` (this package's and
    Query2Label's), or the object itself; DDP's ``module.`` prefix removed."""
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{option}: the file holds no state dict (a dict of tensors, or one under 'state_dict' "
                         "or 'model')")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


# Released name (code/lib_sadcl/models: backbone.py Joiner → backbone.0.body.*, transformer/*.py, sadcl.py) → ours
# (mlcontrast/train/models.py). "{proto}" is the model's prototype tensor.
_SADCL_RULES = (
    (r"backbone\.0\.body\.(.+)", r"backbone.body.\1"),
    (r"input_proj\.(.+)", r"decoder.input_proj.\1"),
    (r"query_embed\.weight", "decoder.query_embed.weight"),
    (r"fc\.W", "fc.weight"),
    (r"fc\.b", "fc.bias"),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attn\.(.+)", r"decoder.encoder.\1.attn.\2"),
    (r"transformer\.encoder\.layers\.(\d+)\.norm([12])\.(.+)", r"decoder.encoder.\1.norm\2.\3"),
    (r"transformer\.decoder\.layers\.(\d+)\.multihead_attn\.(.+)", r"decoder.decoder.\1.attn.\2"),
    (r"transformer\.decoder\.layers\.(\d+)\.norm2\.(.+)", r"decoder.decoder.\1.norm1.\2"),  # norm1 went with
    (r"transformer\.decoder\.layers\.(\d+)\.norm3\.(.+)", r"decoder.decoder.\1.norm2.\2"),  # the self-attention
    (r"transformer\.(en|de)coder\.layers\.(\d+)\.linear1\.(.+)", r"decoder.\1coder.\2.ffn.0.\3"),
    (r"transformer\.(en|de)coder\.layers\.(\d+)\.linear2\.(.+)", r"decoder.\1coder.\2.ffn.3.\3"),
    (r"transformer\.decoder\.norm\.(.+)", r"decoder.norm.\1"),
    (r"proj_head\.layers\.0\.(.+)", r"proj.net.0.\1"),
    (r"proj_head\.layers\.1\.(.+)", r"proj.net.2.\1"),
    (r"prototype", "{proto}"),
    (r"memorybank", "memory"),
)
#: our tensors that a stage-1 (Query2Label) checkpoint does not have: new in stage 2 (util.py's note), and the
#: BatchNorm counters that FrozenBatchNorm2d does not keep
_NEW_IN_STAGE_2 = re.compile(r"(proj\.|learned_prototypes$|prototype_bank\.|memory$)|.*num_batches_tracked$")
_CLASS_ROWS = ("decoder.query_embed.weight", "fc.weight", "fc.bias")  # indexed by class on their first axis


def _our_name(key: str, ours: dict, proto: str) -> str | None:
    if key in ours:  # already this package's name (its own checkpoints)
        return key
    for pattern, target in _SADCL_RULES:
        if re.fullmatch(pattern, key):
            name = re.sub(pattern, target, key).replace("{proto}", proto)
            return name if name in ours else None
    return None


def _fit(value: torch.Tensor, target: torch.Tensor, name: str, class_map) -> torch.Tensor | None:
    """``value`` shaped as ``target``: the released ``[1, C, d]`` / ``[1, C]`` lose their leading 1, and the
    class rows go through ``class_map``; None if the shapes still differ."""
    if value.dim() == target.dim() + 1 and value.shape[0] == 1:
        value = value[0]
    if class_map is not None and (name in _CLASS_ROWS) and value.shape[0] != target.shape[0]:
        if max(class_map) < value.shape[0]:
            value = value[torch.as_tensor(class_map)]
    return value if value.shape == target.shape else None


def _listing(title: str, names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT]) + (f" … (+{len(names) - _LIST_LIMIT})" if len(names) > _LIST_LIMIT else "")
    return f"\n  {title} ({len(names)}): {shown}"


def sadcl_state_from_released(model, state: dict[str, torch.Tensor], *, option: str = "--sadcl-init",
                              class_map="auto") -> dict[str, torch.Tensor]:
    """``state`` (released names, ``module.`` already removed) as a state dict of ``model`` (ours).

    Args:
        model: a :class:`~mlcontrast.train.methods.sadcl.SADCL`.
        state: the checkpoint's tensors.
        option: the option named in the messages.
        class_map: ``"auto"`` (the released VOC ← COCO map when the model has 20 classes and the file 80),
            a sequence (model class i ← file class ``class_map[i]``) or None.

    Raises:
        ValueError: listing the file's tensors that map to no tensor of the model, those whose shape differs,
            and the model's tensors that the file lacks (other than the projector, the prototypes, the memory
            bank and BatchNorm counters, which stage 2 adds).
    """
    ours = model.state_dict()
    proto = "learned_prototypes" if getattr(model, "legacy_learned_prototypes", False) else "prototype_bank.prototypes"
    if class_map == "auto":
        rows = state.get("query_embed.weight", state.get("decoder.query_embed.weight"))
        class_map = VOC_FROM_COCO if (model.num_classes == 20 and rows is not None and rows.shape[0] == 80) else None
    out, unmatched, mis_shaped, named = {}, [], [], set()
    for key, value in state.items():
        name = _our_name(key, ours, proto)
        if name is None:
            unmatched.append(key)
            continue
        named.add(name)
        fitted = _fit(value, ours[name], name, class_map)
        if fitted is None:
            mis_shaped.append(f"{key} {tuple(value.shape)} → {name} {tuple(ours[name].shape)}")
        else:
            out[name] = fitted.to(ours[name].dtype)
    missing = [k for k in ours if k not in named and not _NEW_IN_STAGE_2.match(k)]
    if unmatched or mis_shaped or missing:
        msg = f"{option}: the checkpoint does not fit this model; nothing was loaded"
        if unmatched:
            msg += _listing("in the file, no counterpart in the model", unmatched)
        if mis_shaped:
            msg += _listing("shapes differ", mis_shaped)
        if missing:
            msg += _listing("in the model, not in the file", missing)
        raise ValueError(msg + "\n  (same --backbone, --feature-index, --hidden-dim and decoder depth as the "
                         "checkpoint's run?)")
    return out


def load_sadcl_state(model, path, *, option: str = "--sadcl-init", class_map="auto") -> list[str]:
    """Copy a Query2Label / SADCL checkpoint's weights into ``model`` (see :func:`sadcl_state_from_released`);
    the prototypes, when the file has them, also fill every memory-bank slot unless it has a memory bank of
    its own. Returns the model's names that were loaded.

    Example:
        >>> load_sadcl_state(model, "checkpoint/Q2L/ResNet_448_MSCOCO14/model_best.pth.tar")  # doctest: +SKIP
    """
    state = _state_dict_of(load_torch_file(path, option=option), option)
    mapped = sadcl_state_from_released(model, state, option=option, class_map=class_map)
    model.load_state_dict(mapped, strict=False)
    proto = "learned_prototypes" if getattr(model, "legacy_learned_prototypes", False) else "prototype_bank.prototypes"
    if proto in mapped and "memory" not in mapped:
        model.set_prototypes_(mapped[proto])
    return sorted(mapped)
