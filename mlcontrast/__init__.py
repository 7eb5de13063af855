"""mlcontrast: fused kernels for the contrastive losses of multi-label image recognition.

Losses are computed without materialising the N x N similarity matrix (backends ``"cpu"``,
``"triton"``, ``"cuda"``); backend ``"torch"`` is the dense reference of :mod:`mlcontrast.reference`.
"""

import torch

from mlcontrast import _first_use, ops  # noqa: F401  (ops: registers the compiled ops' fake kernels and autograd)
from mlcontrast._backends import available_backends
from mlcontrast.distributed import all_gather_with_grad
from mlcontrast.functional import (
    label_supcon_loss,
    multihot_supcon_loss,
    multilabel_supcon_loss,
    prototype_ce_loss,
    prototype_nce_loss,
    supcon_loss,
    update_prototypes_,
)
from mlcontrast.losses import (
    LabelSupConLoss,
    MultiHotSupConLoss,
    MultiLabelSupConLoss,
    PrototypeBank,
    PrototypeCELoss,
    PrototypeNCELoss,
    SupConLoss,
)
from mlcontrast.queue import ContrastQueue

__version__ = "0.1.0"


def _run_first_use_check(device: torch.device, backend: str, dtype: torch.dtype) -> list:
    # Imported when a check runs: importing mlcontrast.check with the package would make
    # `python -m mlcontrast.check` run a module that is already imported.
    from mlcontrast import check

    return check.run_checks(device, backends=[backend], dtypes=[dtype])


# The first-use check (mlcontrast._first_use, under the backend resolution) runs the check of
# mlcontrast.check (over the public functions): wired here, above both, so neither imports the other.
_first_use.set_runner(_run_first_use_check)

__all__ = [
    "__version__",
    "available_backends",
    "all_gather_with_grad",
    "label_supcon_loss",
    "supcon_loss",
    "multilabel_supcon_loss",
    "multihot_supcon_loss",
    "prototype_nce_loss",
    "prototype_ce_loss",
    "update_prototypes_",
    "LabelSupConLoss",
    "SupConLoss",
    "MultiLabelSupConLoss",
    "MultiHotSupConLoss",
    "PrototypeNCELoss",
    "PrototypeCELoss",
    "PrototypeBank",
    "ContrastQueue",
]
