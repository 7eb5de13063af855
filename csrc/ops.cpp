// Every op schema of the mlcontrast library, in one place.
//
// The CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/, when built) register
// implementations of these schemas for their dispatch keys; Python registers the fake
// (meta) kernels and the autograd formulas from the contract (mlcontrast/ops/contract.py, through
// mlcontrast/ops/compiled.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing mlcontrast._C loads this library, which runs the
// TORCH_LIBRARY static initialisers below. No pybind11 needed.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

// The schemas are the contract of mlcontrast/ops/contract.py, which states every op once (inputs,
// outputs, the statistics saved for backward, the backward op); the Triton library mlcontrast_triton
// has the same ops, with backend-only options as defaulted trailing arguments. tests/test_contract.py
// checks that these strings are the table's. Outputs after the first are statistics for backward
// (not differentiable), in the compute dtype (fp32; fp64 when a floating input is fp64).
TORCH_LIBRARY(mlcontrast, m) {
  // Label-level SupCon: (loss, lse, n_pos), each [N]. loss: the per-row loss (0 on ignored rows, rows
  // without positives and rows outside the anchors); lse: the row log-sum-exp (-inf for an anchor with
  // nothing to contrast with, 0 on ignored rows and outside the anchors); n_pos: |P(i)| for valid
  // anchors, 0 elsewhere. Only the anchor rows [anchor_start, anchor_stop) (stop: N when None) get a
  // loss, against the valid rows j != i from contrast_start on (reference rows, queues: rectangular work).
  // The backward gives the rows before grad_stop (N when None) the gradient of their contrast role and
  // the anchors that of their own loss; other rows get 0 and cost no work.
  m.def("label_supcon(Tensor features, Tensor labels, float temperature, float base_temperature,"
        " int anchor_start=0, int? anchor_stop=None, int contrast_start=0, int? grad_stop=None)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("label_supcon_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor lse, Tensor n_pos,"
        " float temperature, float base_temperature, int anchor_start=0, int? anchor_stop=None,"
        " int contrast_start=0, int? grad_stop=None) -> Tensor");

  // Label-level SupCon of a batch against a detached queue [M, D] (labels [M], -1: no part; its rows
  // L2-normalised in the kernel when normalize_queue): label_supcon's loss, lse and n_pos of the anchor rows
  // [anchor_start, anchor_stop) against the other valid batch rows and the valid queue rows, and
  // queue_mean [N, D]: sum_{j in queue} e^{s_ij - lse_i} q_j of the anchors (0 elsewhere), so that the
  // backward needs no second pass over the queue, which gets no gradient.
  // grad_stop: as label_supcon's, for the batch rows (the queue never gets a gradient).
  m.def("label_supcon_queue(Tensor features, Tensor labels, Tensor queue, Tensor queue_labels, float temperature,"
        " float base_temperature, bool normalize_queue, int anchor_start=0, int? anchor_stop=None,"
        " int? grad_stop=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("label_supcon_queue_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor queue,"
        " Tensor queue_labels, Tensor lse, Tensor n_pos, Tensor queue_mean, float temperature,"
        " float base_temperature, bool normalize_queue, int anchor_start=0, int? anchor_stop=None,"
        " int? grad_stop=None) -> Tensor");

  // Multi-hot (image-level) SupCon over the R rows of the contrast set, targets [R, C] uint8 (1 = label
  // present), positives "jaccard" | "any" | "all" | "mulsupcon" (threshold: jaccard's): (loss, lse, coef,
  // count), each [R]: the per-row loss (0 outside the anchors and on rows without positives), the row
  // log-sum-exp over all other rows (-inf for an anchor with nothing to contrast with), the mean positive
  // weight (mulsupcon: the number of label anchors) and the number of positives (mulsupcon: of label
  // anchors); lse, coef and count are 0 outside the anchors.
  // The backward gives the rows before grad_stop (R when None) their contrast-role gradient, as label_supcon's.
  m.def("multihot_supcon(Tensor features, Tensor targets, float temperature, float base_temperature,"
        " str positives, float threshold, int anchor_start=0, int? anchor_stop=None, int? grad_stop=None)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("multihot_supcon_backward(Tensor grad_rows, Tensor features, Tensor targets, Tensor lse, Tensor coef,"
        " Tensor count, float temperature, float base_temperature, str positives, float threshold,"
        " int anchor_start=0, int? anchor_stop=None, int? grad_stop=None) -> Tensor");

  // Sample-to-prototype cross-entropy: (loss, lse, norm), each [N]: the per-row loss (0 on ignored
  // rows), the row log-sum-exp over the C classes and max(|z_i|, eps).
  m.def("prototype_ce(Tensor features, Tensor labels, Tensor prototypes, float temperature)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("prototype_ce_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor prototypes,"
        " Tensor lse, Tensor norm, float temperature) -> (Tensor, Tensor)");

  // Prototype-to-sample NCE (SADCL's PSCL): (loss, stats, logits, norm): the scalar loss, [2, C]
  // per-class log-sum-exps over the positives and over the known entries (0 for an empty set), the
  // [B, C] logits cos(z_bc, p_c) / t and the [B, C] clamped norms max(|z_bc|, eps).
  m.def("prototype_nce(Tensor features, Tensor prototypes, Tensor targets, float temperature)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("prototype_nce_backward(Tensor grad, Tensor features, Tensor prototypes, Tensor targets,"
        " Tensor stats, Tensor logits, Tensor norm, float temperature) -> (Tensor, Tensor)");

  // In-place EMA of class prototypes towards the mean of each present class's rows.
  m.def("update_prototypes_(Tensor(a!) prototypes, Tensor features, Tensor labels, float momentum,"
        " bool normalize) -> ()");
}
