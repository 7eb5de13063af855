// Every op schema of the mlcontrast library, in one place.
//
// The CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/, when built) register
// implementations of these schemas for their dispatch keys; Python registers the fake
// (meta) kernels and the autograd formulas (mlcontrast/ops/compiled.py).
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

TORCH_LIBRARY(mlcontrast, m) {
  // Label-level SupCon. Returns the per-row loss [N] (0 on ignored rows and rows without
  // positives) and the per-row log-sum-exp [N] saved for backward; both fp32 (fp64 for fp64 input).
  // Only the anchor rows [anchor_start, anchor_stop) (stop: N when None) get a loss and an LSE; all
  // valid rows stay in their contrast sets. The other rows' loss and LSE are 0.
  m.def("label_supcon(Tensor features, Tensor labels, float temperature, float base_temperature,"
        " int anchor_start=0, int? anchor_stop=None) -> (Tensor, Tensor)");
  m.def("label_supcon_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor lse,"
        " float temperature, float base_temperature, int anchor_start=0, int? anchor_stop=None) -> Tensor");

  // Prototype-to-sample NCE (SADCL's PSCL). Returns the scalar loss and per-class statistics
  // [2, C] (log-sum-exp over positives and over known entries) saved for backward.
  m.def("prototype_nce(Tensor features, Tensor prototypes, Tensor targets, float temperature)"
        " -> (Tensor, Tensor)");
  m.def("prototype_nce_backward(Tensor grad, Tensor features, Tensor prototypes, Tensor targets,"
        " Tensor stats, float temperature) -> (Tensor, Tensor)");

  // Sample-to-prototype cross-entropy. Returns the per-row loss [N] and per-row log-sum-exp [N].
  m.def("prototype_ce(Tensor features, Tensor labels, Tensor prototypes, float temperature)"
        " -> (Tensor, Tensor)");
  m.def("prototype_ce_backward(Tensor grad_rows, Tensor features, Tensor labels, Tensor prototypes,"
        " Tensor lse, float temperature) -> (Tensor, Tensor)");

  // In-place EMA of class prototypes towards the mean of each present class's rows.
  m.def("update_prototypes_(Tensor(a!) prototypes, Tensor features, Tensor labels, float momentum,"
        " bool normalize) -> ()");
}
