// Whether fp32 products may use TF32 tensor cores: torch's switch for CUDA matmuls.
//
// torch >= 2.9 has a second switch, torch.backends.cuda.matmul.fp32_precision, and once anything has
// set it, reading the legacy one (allowTF32CuBLAS) throws ("mix of the legacy and new APIs"). Setting
// the legacy switch updates the new one, so the new one is the answer wherever it exists. Header-only
// and free of CUDA headers, so that a CPU test can compile it and check it against torch's Python API.
#pragma once

#include <ATen/Context.h>
#include <torch/version.h>

namespace mlcontrast {

inline bool tf32_allowed() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
  return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
         at::Float32Precision::TF32;
#else
  return at::globalContext().allowTF32CuBLAS();
#endif
}

}  // namespace mlcontrast
