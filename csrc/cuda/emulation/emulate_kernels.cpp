// Runs the CUDA kernel templates of csrc/cuda on the CPU through host_emulation.h (see there).
// Used by tests/test_cuda_build.py; not part of the extension.
//
//   emulate_kernels supcon_fwd  DTYPE TC N D INV_T BEGIN END SHIFT          z lse
//   emulate_kernels supcon_bwd  DTYPE TC N D INV_T BEGIN END G_SCALE SHIFT  z w lse alpha dz
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
// anchor rows. Arrays are raw little-endian files; outputs are written the same way (lse outside the
// anchors keeps the input's zeros).
#include "host_emulation.h"

// The kernel templates under test (after the emulation header, which redefines the CUDA keywords).
#include "../label_supcon.cuh"
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
