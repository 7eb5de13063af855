// The check that mlcontrast.pml runs on pytorch-metric-learning's index tuples before it takes the fused path:
// whether a list of pairs (rows[k], cols[k]) is, in row-major order and without repeats, of one kind (every
// pair same-label, or none). One pass over the pairs, in parallel chunks, with no O(pairs) buffer: at
// B = 256 against a memory of 16384 the negatives are 4 million pairs, checked every step.
//
// Not a fused loss op (no contract entry): a helper of mlcontrast/pml.py, in its own library
// (torch.ops.mlcontrast_pml), CPU only; other devices take the same check written with torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace mlcontrast {
namespace cpu {
namespace {

// rows, cols: [P] int64; same_pair: [n * m] bool, the flags of the same-label pairs (row-major).
bool pairs_of_kind(const at::Tensor& rows, const at::Tensor& cols, const at::Tensor& same_pair, int64_t n, int64_t m,
                   bool same) {
  TORCH_CHECK(rows.device().is_cpu() && cols.device().is_cpu() && same_pair.device().is_cpu(),
              "pairs_of_kind takes CPU tensors");
  TORCH_CHECK(rows.scalar_type() == at::kLong && cols.scalar_type() == at::kLong, "rows and cols must be int64");
  TORCH_CHECK(same_pair.scalar_type() == at::kBool && same_pair.numel() == n * m, "same_pair must be [n * m] bool");
  TORCH_CHECK(rows.dim() == 1 && rows.sizes() == cols.sizes(), "rows and cols must be 1-D of one length");
  const auto r = rows.contiguous(), c = cols.contiguous(), flags = same_pair.contiguous();
  const int64_t total = r.numel();
  if (total == 0) return true;
  const int64_t* rp = r.data_ptr<int64_t>();
  const int64_t* cp = c.data_ptr<int64_t>();
  const bool* fp = flags.data_ptr<bool>();
  std::atomic<bool> ok{true};
  const uint64_t rows_n = n, cols_m = m, top = uint64_t(std::max<int64_t>(n * m, 1) - 1);
  // Within each chunk: every pair in range, of the kind, at a strictly larger row-major position than the
  // pair before it (the pair before a chunk's first is checked too, so chunk boundaries are covered).
  // Branch-free within blocks of pairs (a negative index wraps to a huge unsigned one: out of range).
  at::parallel_for(0, total, 1 << 16, [&](int64_t begin, int64_t end) {
    constexpr int64_t kBlock = 2048;
    uint64_t keys[kBlock + 1];
    // keys[0]: the position of the pair before the block (none before the first pair: no order check).
    keys[0] = begin == 0 ? 0 : uint64_t(rp[begin - 1]) * cols_m + uint64_t(cp[begin - 1]);
    for (int64_t k0 = begin; k0 < end; k0 += kBlock) {
      if (!ok.load(std::memory_order_relaxed)) return;
      const int64_t count = std::min(end, k0 + kBlock) - k0;
      const uint64_t* row = reinterpret_cast<const uint64_t*>(rp + k0);
      const uint64_t* col = reinterpret_cast<const uint64_t*>(cp + k0);
      bool bad = false;
      for (int64_t k = 0; k < count; ++k) {  // range and order: vectorisable
        const uint64_t key = row[k] * cols_m + col[k];
        keys[k + 1] = key;
        bad |= (row[k] >= rows_n) | (col[k] >= cols_m) | (key <= keys[k] && k0 + k > 0);
      }
      for (int64_t k = 1; k <= count && !bad; ++k) bad |= fp[std::min(keys[k], top)] != same;  // the kind
      if (bad) {
        ok.store(false, std::memory_order_relaxed);
        return;
      }
      keys[0] = keys[count];
    }
  });
  return ok.load();
}

}  // namespace

TORCH_LIBRARY(mlcontrast_pml, m) {
  m.def("pairs_of_kind(Tensor rows, Tensor cols, Tensor same_pair, int n, int m, bool same) -> bool");
}

TORCH_LIBRARY_IMPL(mlcontrast_pml, CPU, m) { m.impl("pairs_of_kind", &pairs_of_kind); }

}  // namespace cpu
}  // namespace mlcontrast
