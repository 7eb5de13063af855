"""mlcontrast: fused kernels for the contrastive losses of multi-label image recognition.

Losses are computed without materialising the N x N similarity matrix (backends ``"cpu"``,
``"triton"``, ``"cuda"``); backend ``"torch"`` is the dense reference of :mod:`mlcontrast.reference`.
"""

from mlcontrast import ops  # noqa: F401  (registers the compiled ops' fake kernels and autograd)
from mlcontrast._backends import available_backends
from mlcontrast.distributed import all_gather_with_grad
from mlcontrast.functional import (
    label_supcon_loss,
    multilabel_supcon_loss,
    prototype_ce_loss,
    prototype_nce_loss,
    supcon_loss,
    update_prototypes_,
)
from mlcontrast.losses import (
    LabelSupConLoss,
    MultiLabelSupConLoss,
    PrototypeBank,
    PrototypeCELoss,
    PrototypeNCELoss,
    SupConLoss,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "available_backends",
    "all_gather_with_grad",
    "label_supcon_loss",
    "supcon_loss",
    "multilabel_supcon_loss",
    "prototype_nce_loss",
    "prototype_ce_loss",
    "update_prototypes_",
    "LabelSupConLoss",
    "SupConLoss",
    "MultiLabelSupConLoss",
    "PrototypeNCELoss",
    "PrototypeCELoss",
    "PrototypeBank",
]
