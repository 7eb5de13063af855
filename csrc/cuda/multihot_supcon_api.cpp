// multihot_supcon on CUDA tensors: device checks, the label masks, the launches and the registration
// for the CUDA dispatch key. The pair modes ("jaccard", "any", "all") run their own kernels
// (multihot_supcon.cuh: label_supcon's tiles plus each pair's overlap count from bit masks); "mulsupcon"
// runs label_supcon's LSE kernels as they are and takes its positives through class sums. The O(R D)
// rest is shared/multihot_supcon.h, run by the CPU backend too. No float atomics: two runs give the
// same bits.
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "cuda/supcon_shift.h"
#include "shared/multihot_supcon.h"

namespace mlcontrast {
namespace cuda {
namespace {

using multihot_supcon::Options;
using multihot_supcon::Positives;

Options check_arguments(const at::Tensor& features, const at::Tensor& targets, double temperature,
                        double base_temperature, c10::string_view positives, double threshold, int64_t anchor_start,
                        std::optional<int64_t> anchor_stop, std::optional<int64_t> grad_stop) {
  MLC_CHECK_CUDA(features);
  MLC_CHECK_CUDA(targets);
  MLC_CHECK_SAME_DEVICE(features, targets);
  const auto o = multihot_supcon::check_inputs(features, targets, temperature, base_temperature, positives, threshold,
                                               anchor_start, anchor_stop, grad_stop);
  dtype_of(features.scalar_type());
  return o;
}

// The rows' label sets as the pair kernels read them, and the device tensors they point into.
struct LabelSets {
  at::Tensor masks;  // [words, R] int64 (bit masks)
  at::Tensor sizes;  // [R] int32
  LabelPairs pairs;
};

PairRule rule_of(Positives positives) {
  switch (positives) {
    case Positives::kJaccard:
      return PairRule::kJaccard;
    case Positives::kAny:
      return PairRule::kAny;
    default:
      TORCH_INTERNAL_ASSERT(positives == Positives::kAll, "mulsupcon has no pair kernels");
      return PairRule::kAll;
  }
}

LabelSets label_sets(const at::Tensor& targets, const Options& o) {
  const auto t = targets.contiguous();
  const int64_t n = t.size(0), c = t.size(1), words = std::max<int64_t>(1, (c + 63) / 64);
  LabelSets l;
  l.masks = at::empty({words, n}, t.options().dtype(at::kLong));
  l.sizes = at::empty({n}, t.options().dtype(at::kInt));
  PackLabelMasksParams p;
  p.targets = t.data_ptr<uint8_t>();
  p.masks = reinterpret_cast<uint64_t*>(l.masks.data_ptr<int64_t>());
  p.sizes = l.sizes.data_ptr<int32_t>();
  p.n = n;
  p.c = c;
  p.ld_targets = c;
  p.words = words;
  run_pack_label_masks(p, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  l.pairs.masks = p.masks;
  l.pairs.sizes = p.sizes;
  l.pairs.words = words;
  l.pairs.rule = rule_of(o.positives);
  if (o.positives == Positives::kJaccard) least_passing_ratio(o.threshold, c, l.pairs.o_star, l.pairs.u_star);
  return l;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> multihot_supcon_cuda(
    const at::Tensor& features, const at::Tensor& targets, double temperature, double base_temperature,
    c10::string_view positives, double threshold, int64_t anchor_start, std::optional<int64_t> anchor_stop,
    std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const auto o = check_arguments(features, targets, temperature, base_temperature, positives, threshold,
                                 anchor_start, anchor_stop, grad_stop);
  const c10::cuda::CUDAGuard device_guard(features.device());
  // The kernels read the features in their own dtype (16-bit features get no fp32 copy).
  const auto z = features.detach().contiguous();
  auto lse = at::zeros({z.size(0)}, z.options().dtype(compute_dtype(features)));
  auto count = at::zeros_like(lse), coef = at::zeros_like(lse), b = at::zeros_like(lse);
  if (o.anchors() == 0) return multihot_supcon::outputs(lse, coef, count, b, o);

  const double inv_t = 1.0 / temperature;
  const auto bound = logit_bound(z, lse.scalar_type(), inv_t);
  const auto lse_launch = lse_params(z, lse, bound, inv_t, o.begin, o.end);
  if (o.pairs()) {
    const auto labels = label_sets(targets, o);
    MultihotSupconFwdParams p;
    p.lse = lse_launch;
    p.pairs = labels.pairs;
    p.count = count.data_ptr();
    p.coef = coef.data_ptr();
    p.b = b.data_ptr();
    run_multihot_supcon_fwd(p, current_stream());
  } else {
    run_label_supcon_fwd(lse_launch, current_stream());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  redo_underflowed_rows(lse_launch, lse, bound);
  if (!o.pairs()) {
    const auto zc = to_compute(features);
    std::tie(count, b) = multihot_supcon::mulsupcon_positives(multihot_supcon::class_terms(zc, targets), zc, o);
    coef = count.clone();  // two outputs may not share storage
  }
  return multihot_supcon::outputs(lse, coef, count, b, o);
}

at::Tensor multihot_supcon_backward_cuda(const at::Tensor& grad_rows, const at::Tensor& features,
                                         const at::Tensor& targets, const at::Tensor& lse, const at::Tensor& coef,
                                         const at::Tensor& count, double temperature, double base_temperature,
                                         c10::string_view positives, double threshold, int64_t anchor_start,
                                         std::optional<int64_t> anchor_stop, std::optional<int64_t> grad_stop) {
  MLC_KERNEL_GUARD();
  const auto o = check_arguments(features, targets, temperature, base_temperature, positives, threshold,
                                 anchor_start, anchor_stop, grad_stop);
  for (const auto* t : {&grad_rows, &lse, &coef, &count}) {
    MLC_CHECK_CUDA(*t);
    MLC_CHECK_SAME_DEVICE(features, *t);
  }
  multihot_supcon::check_backward_rows(grad_rows, lse, coef, count, features.size(0));
  const c10::cuda::CUDAGuard device_guard(features.device());
  // Contiguous, whatever the features' strides (the fake kernel says so).
  if (o.anchors() == 0 || features.size(1) == 0) return at::zeros(features.sizes(), features.options());

  const auto dtype = compute_dtype(features);
  const auto z = features.detach().contiguous();
  auto row_values = [&](const at::Tensor& t) { return t.detach().to(dtype).reshape({-1}).contiguous(); };
  const auto wts = multihot_supcon::backward_weights(multihot_supcon::anchor_grads(grad_rows, o, dtype),
                                                     row_values(lse), row_values(coef), row_values(count), o);
  auto dz = at::empty(z.sizes(), z.options().dtype(dtype));
  const double inv_t = 1.0 / temperature;
  auto softmax = softmax_grad(z, wts.soft, wts.lse, dz, inv_t, o.begin, o.end, o.pairs() ? wts.pair : at::Tensor());
  softmax.params.grad_end = o.grad_end;  // the rows from grad_end on take no contrast-role gradient (params.h)
  if (o.pairs()) {
    const auto labels = label_sets(targets, o);
    MultihotSupconBwdParams p;
    p.softmax = softmax.params;
    p.pairs = labels.pairs;
    p.pair = wts.pair.data_ptr();
    run_multihot_supcon_bwd(p, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    run_label_supcon_bwd(softmax.params, current_stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const auto zc = to_compute(features);
    dz.sub_(multihot_supcon::mulsupcon_positive_grad(multihot_supcon::class_terms(zc, targets), zc, wts.a,
                                                     o.grad_end));
  }
  return dz.to(features.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(mlcontrast, CUDA, m) {
  m.impl("multihot_supcon", &multihot_supcon_cuda);
  m.impl("multihot_supcon_backward", &multihot_supcon_backward_cuda);
}

}  // namespace cuda
}  // namespace mlcontrast
