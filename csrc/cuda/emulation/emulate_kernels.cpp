// Runs the CUDA kernel templates of csrc/cuda on the CPU through host_emulation.h (see there).
// Used by tests/test_cuda_build.py; not part of the extension.
//
//   emulate_kernels supcon_fwd  DTYPE TC N D INV_T BEGIN END SHIFT          z lse [COL_BEGIN]
//   emulate_kernels supcon_bwd  DTYPE TC N D INV_T BEGIN END G_SCALE SHIFT  z w lse alpha dz [COL_BEGIN GRAD_END]
//   emulate_kernels multihot_fwd DTYPE TC N D C INV_T BEGIN END SHIFT RULE THRESHOLD
//                                z targets lse count coef b
//   emulate_kernels multihot_bwd DTYPE TC N D C INV_T BEGIN END G_SCALE SHIFT RULE THRESHOLD
//                                z targets w lse pair alpha dz [GRAD_END]
//   emulate_kernels nce_fwd     DTYPE ROWS C D INV_T                  z unit_p logits norm
//   emulate_kernels nce_bwd     DTYPE ROWS C D INV_T                  z unit_p dlogits grad_z grad_unit_p
//   emulate_kernels nce_grid    DTYPE B C D     (prints the backward's split and grids; runs nothing)
//   emulate_kernels segment_sum DTYPE ROWS D SEGMENTS WEIGHTED        x weight order offsets out
//
// DTYPE is float32, float16, bfloat16 or float64: the element type of z / x; every other float
// array is in the accumulation type (fp64 for float64, else fp32); order and offsets are int64.
// TC = 1 picks the tensor-core (WMMA) configuration (fp32 as TF32), 0 the SIMT one. G_SCALE = 0
// means none. SHIFT is the logit bound c of the fixed-shift forward and the one-exp backward, or "-"
// for the online max and two exps (the backward's alpha file is then "-" too). BEGIN END are the
// anchor rows; the optional COL_BEGIN (default 0) and GRAD_END (default N) the roles of the rows
// (params.h). Arrays are raw little-endian files; outputs are written the same way (lse outside the
// anchors keeps the input's zeros).
//
// multihot_*: the pair kernels of multihot_supcon.cuh with C labels, the targets [N, C] uint8 packed by
// the emulated pack_masks_kernel; RULE is jaccard, any or all, THRESHOLD jaccard's (least_passing_ratio,
// as the api); the forward's SHIFT is required. RULE mulsupcon runs label_supcon's kernels on the same
// parameters, as the api does (count, coef and b then stay 0).
#include "host_emulation.h"

// The kernel templates under test (after the emulation header, which redefines the CUDA keywords).
#include "../label_supcon.cuh"
#include "../multihot_supcon.cuh"
#include "../prototype_nce.cuh"
#include "../segment_sum.cuh"

#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>

using namespace mlcontrast::cuda;

namespace {

std::vector<char> read_file(const std::string& path, std::size_t bytes) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::vector<char> data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (data.size() != bytes) {
    throw std::runtime_error(path + ": " + std::to_string(data.size()) + " bytes, expected " + std::to_string(bytes));
  }
  return data;
}

// Exactly-sized heap buffers (so that AddressSanitizer sees any access past their ends).
struct Buffer {
  std::unique_ptr<char[]> data;
  std::size_t bytes = 0;
  explicit Buffer(std::size_t n) : data(new char[n == 0 ? 1 : n]()), bytes(n) {}
  static Buffer from_file(const std::string& path, std::size_t n) {
    Buffer b(n);
    auto raw = read_file(path, n);
    std::memcpy(b.data.get(), raw.data(), n);
    return b;
  }
  void save(const std::string& path) const {
    std::ofstream out(path, std::ios::binary);
    out.write(data.get(), static_cast<std::streamsize>(bytes));
  }
  void* get() { return data.get(); }
};

DType parse_dtype(const std::string& s) {
  if (s == "float32") return DType::kFloat32;
  if (s == "float16") return DType::kFloat16;
  if (s == "bfloat16") return DType::kBFloat16;
  if (s == "float64") return DType::kFloat64;
  throw std::runtime_error("unknown dtype " + s);
}

std::size_t elem_size(DType t) { return t == DType::kFloat64 ? 8 : (t == DType::kFloat32 ? 4 : 2); }
std::size_t acc_size(DType t) { return t == DType::kFloat64 ? 8 : 4; }

// Calls f.template operator()<T, TensorCores>() for the dtype / configuration.
template <class F>
void dispatch(DType t, bool tc, F f) {
  switch (t) {
    case DType::kFloat32:
      if (tc) {
        f.template operator()<float, true>();
      } else {
        f.template operator()<float, false>();
      }
      break;
    case DType::kFloat16:
      if (tc) {
        f.template operator()<__half, true>();
      } else {
        f.template operator()<__half, false>();
      }
      break;
    case DType::kBFloat16:
      if (tc) {
        f.template operator()<__nv_bfloat16, true>();
      } else {
        f.template operator()<__nv_bfloat16, false>();
      }
      break;
    case DType::kFloat64:
      f.template operator()<double, false>();
      break;
  }
}

// The label sets of a targets file as the api builds them (the emulated pack kernel), and the pair rule.
struct PackedLabels {
  Buffer masks{0}, sizes{0};
  LabelPairs pairs;
};

PackedLabels pack_labels(const std::string& path, int64_t n, int64_t c, const std::string& rule, double threshold) {
  const int64_t words = std::max<int64_t>(1, (c + 63) / 64);
  Buffer targets = Buffer::from_file(path, n * c);
  PackedLabels l{Buffer(words * n * 8), Buffer(n * 4), LabelPairs{}};
  PackLabelMasksParams p;
  p.targets = static_cast<const uint8_t*>(targets.get());
  p.masks = static_cast<uint64_t*>(l.masks.get());
  p.sizes = static_cast<int32_t*>(l.sizes.get());
  p.n = n;
  p.c = c;
  p.ld_targets = c;
  p.words = words;
  if (n > 0) emu::launch(multihot::pack_grid(p), kThreads, multihot::pack_masks_kernel, p);
  l.pairs.masks = p.masks;
  l.pairs.sizes = p.sizes;
  l.pairs.words = words;
  if (rule == "jaccard") {
    l.pairs.rule = PairRule::kJaccard;
    least_passing_ratio(threshold, c, l.pairs.o_star, l.pairs.u_star);
  } else if (rule == "any" || rule == "all") {
    l.pairs.rule = rule == "any" ? PairRule::kAny : PairRule::kAll;
  } else {
    throw std::runtime_error("unknown rule " + rule);
  }
  return l;
}

// The fields that label_supcon's forward and backward parameters share, as the api sets them.
template <class Params>
void set_rows(Params& p, void* z, int64_t n, int64_t d, double inv_t, DType dtype, const void* shift) {
  p.z = z;
  p.n = n;
  p.d = d;
  p.ld_z = d;
  p.inv_temperature = inv_t;
  p.dtype = dtype;
  p.shift = shift;
}

// multihot_fwd / multihot_bwd (see the header): arguments from argv[3].
int run_multihot(const std::string& op, DType dtype, int argc, char** argv) {
  const std::size_t es = elem_size(dtype), as = acc_size(dtype);
  const bool tc = std::stoi(argv[3]) != 0;
  const int64_t n = std::stoll(argv[4]), d = std::stoll(argv[5]), c = std::stoll(argv[6]);
  const double inv_t = std::stod(argv[7]);
  const int64_t begin = std::stoll(argv[8]), end = std::stoll(argv[9]);
  const bool fwd = op == "multihot_fwd";
  char** rest = argv + (fwd ? 10 : 11);  // SHIFT RULE THRESHOLD z targets ...
  const std::string shift_arg = rest[0];
  const double shift_value = shift_arg != "-" ? std::stod(shift_arg) : 0.0;
  const float shift_f32 = static_cast<float>(shift_value);
  const void* shift = shift_arg == "-" ? nullptr : (as == 8 ? static_cast<const void*>(&shift_value) : &shift_f32);
  // "mulsupcon" runs label_supcon's kernels on the same parameters, as the api does (no label masks).
  const bool pairs = std::string(rest[1]) != "mulsupcon";
  const PackedLabels labels = pairs ? pack_labels(rest[4], n, c, rest[1], std::stod(rest[2])) : PackedLabels{};
  Buffer z = Buffer::from_file(rest[3], n * d * es);
  if (fwd) {
    if (shift == nullptr) throw std::runtime_error("multihot_fwd needs the shift");
    Buffer lse(n * as), count(n * as), coef(n * as), b(n * as);
    MultihotSupconFwdParams p;
    set_rows(p.lse, z.get(), n, d, inv_t, dtype, shift);
    p.lse.lse = lse.get();
    p.lse.row_begin = begin;
    p.lse.row_end = end;
    p.pairs = labels.pairs;
    p.count = count.get();
    p.coef = coef.get();
    p.b = b.get();
    dispatch(dtype, tc, [&]<typename T, bool TC>() {
      using Cfg = supcon::KernelConfig<T, TC>;
      if (end <= begin) return;
      if (pairs) {
        emu::launch(supcon::lse_grid<Cfg>(p.lse), kThreads, multihot::pairs_fwd_kernel<Cfg>, p);
      } else {
        emu::launch(supcon::lse_grid<Cfg>(p.lse), kThreads, supcon::lse_kernel<Cfg>, p.lse);
      }
    });
    lse.save(rest[5]);
    count.save(rest[6]);
    coef.save(rest[7]);
    b.save(rest[8]);
    return 0;
  }
  const double g_scale_value = std::stod(argv[10]);
  float g_scale = static_cast<float>(g_scale_value);
  Buffer w = Buffer::from_file(rest[5], n * as), lse = Buffer::from_file(rest[6], n * as),
         pair = Buffer::from_file(rest[7], n * as), dz(n * d * as);
  Buffer alpha = shift != nullptr ? Buffer::from_file(rest[8], n * as) : Buffer(0);
  MultihotSupconBwdParams p;
  set_rows(p.softmax, z.get(), n, d, inv_t, dtype, shift);
  p.softmax.w = w.get();
  p.softmax.lse = lse.get();
  p.softmax.g_scale = g_scale_value != 0 ? &g_scale : nullptr;
  p.softmax.dz = dz.get();
  p.softmax.anchor_begin = begin;
  p.softmax.anchor_end = end;
  p.softmax.ld_dz = d;
  p.softmax.alpha = shift != nullptr ? alpha.get() : nullptr;
  p.softmax.grad_end = argc > 21 ? std::stoll(argv[21]) : n;  // the optional GRAD_END after dz
  p.pairs = labels.pairs;
  p.pair = pair.get();
  dispatch(dtype, tc, [&]<typename T, bool TC>() {
    using Cfg = supcon::KernelConfig<T, TC>;
    if (pairs) {
      emu::launch(supcon::lse_grad_grid<Cfg>(p.softmax), kThreads, multihot::pairs_grad_kernel<Cfg>, p);
    } else {
      emu::launch(supcon::lse_grad_grid<Cfg>(p.softmax), kThreads, supcon::lse_grad_kernel<Cfg>, p.softmax);
    }
  });
  dz.save(rest[9]);
  return 0;
}

int run(int argc, char** argv) {
  if (argc < 3) throw std::runtime_error("usage: see the header of emulate_kernels.cpp");
  const std::string op = argv[1];
  const DType dtype = parse_dtype(argv[2]);
  const std::size_t es = elem_size(dtype), as = acc_size(dtype);

  if (op == "supcon_fwd" || op == "supcon_bwd") {
    const bool tc = std::stoi(argv[3]) != 0;
    const int64_t n = std::stoll(argv[4]), d = std::stoll(argv[5]);
    const double inv_t = std::stod(argv[6]);
    const int64_t begin = std::stoll(argv[7]), end = std::stoll(argv[8]);
    // The shift as a device scalar of the accumulation type (a host value here).
    const std::string shift_arg = op == "supcon_fwd" ? argv[9] : argv[10];
    const bool shifted = shift_arg != "-";
    const double shift_value = shifted ? std::stod(shift_arg) : 0.0;
    const float shift_f32 = static_cast<float>(shift_value);
    const void* shift = !shifted ? nullptr : (as == 8 ? static_cast<const void*>(&shift_value) : &shift_f32);
    if (op == "supcon_fwd") {
      Buffer z = Buffer::from_file(argv[10], n * d * es), lse(n * as);
      LabelSupconFwdParams p;
      p.shift = shift;
      p.z = z.get();
      p.lse = lse.get();
      p.n = n;
      p.row_begin = begin;
      p.row_end = end;
      p.col_begin = argc > 12 ? std::stoll(argv[12]) : 0;
      p.d = d;
      p.ld_z = d;
      p.inv_temperature = inv_t;
      p.dtype = dtype;
      dispatch(dtype, tc, [&]<typename T, bool TC>() {
        using Cfg = supcon::KernelConfig<T, TC>;
        emu::launch(supcon::lse_grid<Cfg>(p), kThreads, supcon::lse_kernel<Cfg>, p);
      });
      lse.save(argv[11]);
    } else {
      const double g_scale_value = std::stod(argv[9]);
      Buffer z = Buffer::from_file(argv[11], n * d * es), w = Buffer::from_file(argv[12], n * as),
             lse = Buffer::from_file(argv[13], n * as), dz(n * d * as);
      Buffer alpha = shifted ? Buffer::from_file(argv[14], n * as) : Buffer(0);
      float g_scale = static_cast<float>(g_scale_value);
      LabelSupconBwdParams p;
      p.shift = shift;
      p.alpha = shifted ? alpha.get() : nullptr;
      p.z = z.get();
      p.w = w.get();
      p.lse = lse.get();
      p.g_scale = g_scale_value != 0 ? &g_scale : nullptr;
      p.dz = dz.get();
      p.n = n;
      p.anchor_begin = begin;
      p.anchor_end = end;
      p.col_begin = argc > 16 ? std::stoll(argv[16]) : 0;
      p.grad_end = argc > 17 ? std::stoll(argv[17]) : n;
      p.d = d;
      p.ld_z = d;
      p.ld_dz = d;
      p.inv_temperature = inv_t;
      p.dtype = dtype;
      dispatch(dtype, tc, [&]<typename T, bool TC>() {
        using Cfg = supcon::KernelConfig<T, TC>;
        emu::launch(supcon::lse_grad_grid<Cfg>(p), kThreads, supcon::lse_grad_kernel<Cfg>, p);
      });
      dz.save(argv[15]);
    }
    return 0;
  }

  if (op == "multihot_fwd" || op == "multihot_bwd") {
    if (argc < (op == "multihot_fwd" ? 19 : 21)) throw std::runtime_error("too few arguments for " + op);
    return run_multihot(op, dtype, argc, argv);
  }

  if (op == "nce_grid") {
    const int64_t b = std::stoll(argv[3]), c = std::stoll(argv[4]), d = std::stoll(argv[5]);
    PrototypeNceBwdParams p;
    p.rows = b * c;
    p.c = c;
    p.d = d;
    p.split = nce::split_for(b, c, d, dtype);
    const dim3 g = nce::prototypes_grid(p), s = nce::partials_grid(p);
    std::printf("splits %lld per_split %lld prototypes_grid %u %u %u partials_grid %u\n",
                static_cast<long long>(p.split.splits), static_cast<long long>(p.split.per_split), g.x, g.y, g.z, s.x);
    return 0;
  }

  if (op == "nce_fwd" || op == "nce_bwd") {
    const int64_t rows = std::stoll(argv[3]), c = std::stoll(argv[4]), d = std::stoll(argv[5]);
    const double inv_t = std::stod(argv[6]);
    Buffer z = Buffer::from_file(argv[7], rows * d * es), unit_p = Buffer::from_file(argv[8], c * d * as);
    const dim3 grid_rows = nce::rows_grid(rows);
    if (op == "nce_fwd") {
      Buffer logits(rows * as), norm(rows * as);
      PrototypeNceFwdParams p;
      p.z = z.get();
      p.unit_p = unit_p.get();
      p.logits = logits.get();
      p.norm = norm.get();
      p.rows = rows;
      p.c = c;
      p.d = d;
      p.inv_temperature = inv_t;
      p.dtype = dtype;
      dispatch(dtype, false, [&]<typename T, bool>() {
        emu::launch(grid_rows, kThreads, nce::logits_kernel<T, acc_t<T>>, p);
      });
      logits.save(argv[9]);
      norm.save(argv[10]);
    } else {
      const PrototypeNceSplit split = nce::split_for(rows / c, c, d, dtype);
      Buffer dlogits = Buffer::from_file(argv[9], rows * as), norm(rows * as), grad_z(rows * d * es),
             grad_p(c * d * as), partials(split.splits > 1 ? split.splits * c * d * as : 0);
      PrototypeNceBwdParams p;
      p.z = z.get();
      p.unit_p = unit_p.get();
      p.dlogits = dlogits.get();
      p.norm = norm.get();
      p.grad_z = grad_z.get();
      p.grad_unit_p = grad_p.get();
      p.partials = split.splits > 1 ? partials.get() : nullptr;
      p.split = split;
      p.rows = rows;
      p.c = c;
      p.d = d;
      p.inv_temperature = inv_t;
      p.dtype = dtype;
      dispatch(dtype, false, [&]<typename T, bool>() {
        emu::launch(grid_rows, kThreads, nce::grad_rows_kernel<T, acc_t<T>>, p);
        emu::launch(nce::prototypes_grid(p), kThreads, nce::grad_prototypes_kernel<T, acc_t<T>>, p);
        if (p.split.splits > 1) emu::launch(nce::partials_grid(p), kThreads, nce::sum_partials_kernel<acc_t<T>>, p);
      });
      grad_z.save(argv[10]);
      grad_p.save(argv[11]);
    }
    return 0;
  }

  if (op == "segment_sum") {
    const int64_t rows = std::stoll(argv[3]), d = std::stoll(argv[4]), segments = std::stoll(argv[5]);
    const bool weighted = std::stoi(argv[6]) != 0;
    Buffer x = Buffer::from_file(argv[7], rows * d * es);
    Buffer weight = weighted ? Buffer::from_file(argv[8], rows * as) : Buffer(0);
    Buffer order = Buffer::from_file(argv[9], rows * 8), offsets = Buffer::from_file(argv[10], (segments + 1) * 8);
    Buffer out(segments * d * as);
    SegmentSumParams p;
    p.x = x.get();
    p.weight = weighted ? weight.get() : nullptr;
    p.order = static_cast<const int64_t*>(order.get());
    p.offsets = static_cast<const int64_t*>(offsets.get());
    p.out = out.get();
    p.segments = segments;
    p.d = d;
    p.ld_x = d;
    p.x_dtype = dtype;
    p.dtype = dtype == DType::kFloat64 ? DType::kFloat64 : DType::kFloat32;
    dispatch(dtype, false, [&]<typename T, bool>() {
      emu::launch(segsum::grid(p), segsum::kBlock, segsum::segment_sum_kernel<T, acc_t<T>>, p);
    });
    out.save(argv[11]);
    return 0;
  }
  throw std::runtime_error("unknown op " + op);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emulate_kernels: %s\n", e.what());
    return 2;
  }
}
