// What every CUDA api file (host code, torch headers) needs between torch and the kernels: the device
// checks, the mapping from torch dtypes to the kernels' DType, and the current stream.
//
// What does not depend on the device (compute dtype, unit rows, shape checks) is
// shared/checks_and_rows.h, the CPU backend's too; the per-class sums are cuda/class_sums.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#include "shared/checks_and_rows.h"

namespace mlcontrast {
namespace cuda {

#define MLC_CHECK_CUDA(x) \
  TORCH_CHECK((x).device().is_cuda(), #x " must be a CUDA tensor for the CUDA kernels, got one on ", (x).device())
#define MLC_CHECK_SAME_DEVICE(x, y)                                                                            \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device, got ", (x).device(), \
              " and ", (y).device())

// The kernels' element type of a torch dtype; anything else is refused with a clear message.
inline DType dtype_of(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kDouble:
      return DType::kFloat64;
    default:
      TORCH_CHECK(false, "the mlcontrast CUDA kernels take float32, float16, bfloat16 or float64 tensors, got ",
                  type);
  }
}

// The stream of the current device (set by the caller's CUDAGuard).
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace mlcontrast
