"""Training package of mlcontrast: data, models, methods (SADCL, BCE), metrics, engine and CLI.

Install with the ``train`` extra (``pip install mlcontrast[train]``: timm, scikit-learn, tqdm).
Targets are encoded 1 / 0 / -1 (positive / negative / unknown) everywhere.
"""
