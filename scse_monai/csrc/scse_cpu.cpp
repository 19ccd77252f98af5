// CPU kernels for the scSE block with max-out aggregation (scse_monai.cpu_kernels builds and loads them).
//
// Written by hand because PyTorch has no fused form of this block: with its elementwise ops the forward reads or
// writes the full-size map five times and the backward about twenty times (one pass per op). Here the forward
// reads the map twice (statistics, then aggregation) and writes it once; the backward reads the map and its
// gradient once, writes the input gradient once, and revisits each block of positions while it is still in
// cache. All maps are (B, C, N) contiguous, N the number of spatial positions.
//
// Parallel work is split with at::parallel_for. The statistics and the backward take tasks of one batch item and a
// block of positions, over all channels: a task owns its positions' sums over channels (no races), and the
// per-channel sums are added into per-thread partials, reduced at the end. The forward takes row chunks. Sums over many elements use 8 independent lanes (vectorisable without
// -ffast-math) folded into double. The hot loops are compiled for AVX2 and for the baseline ISA (target_clones);
// the loader picks at run time, so one build works on any x86-64 CPU.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace scse_monai {
namespace {

// Positions per task (measured on 2 cores at 4 x 64 x 128 x 128; smaller blocks read too many short row pieces,
// larger ones fall out of L2 before the backward's second sweep: x, grad and the input gradient, C x block each).
constexpr int64_t kStatsBlock = 4096;
constexpr int64_t kBackwardBlock = 2048;
constexpr int64_t kRowChunk = 16384;  // forward: positions of one channel per task
constexpr int64_t kLanes = 8;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SCSE_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SCSE_CLONES
#endif
#define SCSE_INLINE inline __attribute__((always_inline))

// Sum of v[0:n] in kLanes independent partial sums, folded in double.
template <typename T>
SCSE_INLINE double lane_sum(const T* v, int64_t n) {
  T lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) lanes[k] += v[i + k];
  }
  double s = 0;
  for (; i < n; ++i) s += v[i];
  for (int64_t k = 0; k < kLanes; ++k) s += lanes[k];
  return s;
}

// One task of the statistics pass: channel sums (added to csum[c]) and z[i] = sum_c w[c] x[c, i] for the block.
template <typename T>
SCSE_INLINE void stats_block_impl(const T* __restrict__ x, const T* __restrict__ w, int64_t C, int64_t N, int64_t len,
                                  T* __restrict__ z, double* __restrict__ csum) {
  for (int64_t i = 0; i < len; ++i) z[i] = 0;
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * N;
    const T wc = w[c];
    for (int64_t i = 0; i < len; ++i) z[i] += wc * xr[i];
    csum[c] += lane_sum(xr, len);  // xr is in L1 now
  }
}

// max(v * g, v * s); NaN in either product propagates, as torch.maximum does.
template <typename T>
SCSE_INLINE T maxout(T v, T g, T s) {
  const T a = v * g, b = v * s;
  return (a > b || a != a) ? a : b;
}

// One task of the max-out forward: out = max(x * gc[c], x * gs[i]).
template <typename T>
SCSE_INLINE void forward_block_impl(const T* __restrict__ x, const T* __restrict__ gc, const T* __restrict__ gs, int64_t C,
                                    int64_t N, int64_t len, T* __restrict__ out) {
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * N;
    T* o = out + c * N;
    const T g = gc[c];
    for (int64_t i = 0; i < len; ++i) o[i] = maxout(xr[i], g, gs[i]);
  }
}

// The same, written over x (its own loop: out may not alias x under __restrict__).
template <typename T>
SCSE_INLINE void forward_block_inplace_impl(T* __restrict__ x, const T* __restrict__ gc, const T* __restrict__ gs,
                                            int64_t C, int64_t N, int64_t len) {
  for (int64_t c = 0; c < C; ++c) {
    T* xr = x + c * N;
    const T g = gc[c];
    for (int64_t i = 0; i < len; ++i) xr[i] = maxout(xr[i], g, gs[i]);
  }
}

// One task of the backward. First sweep over the channels: the input gradient through the chosen branch, and the
// gate gradients sum_i grad*x where the cSE branch won (per channel, into gc_acc[c]) or the sSE branch won (per
// position). Then the sSE gate's pre-sigmoid gradient dz for the block, and a second sweep while the block is in
// cache: the sSE convolution's input gradient w[c] * dz[i] and its weight gradient sum_i x[c, i] * dz[i].
template <typename T>
SCSE_INLINE void backward_block_impl(const T* __restrict__ x, const T* __restrict__ g, const T* __restrict__ gc,
                                     const T* __restrict__ gs, const T* __restrict__ w, int64_t C, int64_t N, int64_t len,
                                     T* __restrict__ gx, T* __restrict__ dz, T* __restrict__ work,
                                     double* __restrict__ gc_acc, double* __restrict__ w_acc) {
  T* __restrict__ to_cse = work;  // len values
  for (int64_t i = 0; i < len; ++i) dz[i] = 0;  // the sSE branch's sum of grad * x, per position
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * N;
    const T* gr = g + c * N;
    T* o = gx + c * N;
    const T gcc = gc[c];
    for (int64_t i = 0; i < len; ++i) {
      const T v = xr[i], gv = gr[i], si = gs[i];
      // the branch test of the torch paths, x * (gc - gs) > 0 (the same choice where the rounded products tie;
      // ties go to the sSE branch), as 1 or 0 so that the loop vectorises
      const T d = gcc - si;
      const T m = static_cast<T>(v * d > T(0));
      const T p = gv * v, pc = m * p;
      o[i] = gv * (si + m * d);
      to_cse[i] = pc;
      dz[i] += p - pc;
    }
    gc_acc[c] += lane_sum(to_cse, len);
  }
  for (int64_t i = 0; i < len; ++i) dz[i] *= gs[i] * (T(1) - gs[i]);  // through the sigmoid
  for (int64_t c = 0; c < C; ++c) {
    const T* xr = x + c * N;
    T* o = gx + c * N;
    const T wc = w[c];
    for (int64_t i = 0; i < len; ++i) {
      o[i] += wc * dz[i];
      to_cse[i] = xr[i] * dz[i];
    }
    w_acc[c] += lane_sum(to_cse, len);
  }
}

// Non-template entry points, one per dtype, so that target_clones can version them.
SCSE_CLONES void stats_block(const float* x, const float* w, int64_t C, int64_t N, int64_t len, float* z, double* s) {
  stats_block_impl(x, w, C, N, len, z, s);
}
SCSE_CLONES void stats_block(const double* x, const double* w, int64_t C, int64_t N, int64_t len, double* z, double* s) {
  stats_block_impl(x, w, C, N, len, z, s);
}
SCSE_CLONES void forward_block(const float* x, const float* gc, const float* gs, int64_t C, int64_t N, int64_t len,
                               float* out) {
  forward_block_impl(x, gc, gs, C, N, len, out);
}
SCSE_CLONES void forward_block(const double* x, const double* gc, const double* gs, int64_t C, int64_t N, int64_t len,
                               double* out) {
  forward_block_impl(x, gc, gs, C, N, len, out);
}
SCSE_CLONES void forward_block_inplace(float* x, const float* gc, const float* gs, int64_t C, int64_t N, int64_t len) {
  forward_block_inplace_impl(x, gc, gs, C, N, len);
}
SCSE_CLONES void forward_block_inplace(double* x, const double* gc, const double* gs, int64_t C, int64_t N,
                                       int64_t len) {
  forward_block_inplace_impl(x, gc, gs, C, N, len);
}
SCSE_CLONES void backward_block(const float* x, const float* g, const float* gc, const float* gs, const float* w,
                                int64_t C, int64_t N, int64_t len, float* gx, float* dz, float* work, double* gc_acc,
                                double* w_acc) {
  backward_block_impl(x, g, gc, gs, w, C, N, len, gx, dz, work, gc_acc, w_acc);
}
SCSE_CLONES void backward_block(const double* x, const double* g, const double* gc, const double* gs, const double* w,
                                int64_t C, int64_t N, int64_t len, double* gx, double* dz, double* work,
                                double* gc_acc, double* w_acc) {
  backward_block_impl(x, g, gc, gs, w, C, N, len, gx, dz, work, gc_acc, w_acc);
}

void check_map(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "scse_monai kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 3 && t.is_contiguous(), "scse_monai kernels: ", name, " must be a contiguous (B, C, N) map");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "scse_monai kernels: ", name, " must be float32 or float64, got ", t.scalar_type());
}

void check_small(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == x.scalar_type() && t.sizes() == shape,
              "scse_monai kernels: ", name, " must be a contiguous CPU tensor of shape ", shape, " and dtype ",
              x.scalar_type(), ", got ", t.sizes(), " ", t.scalar_type());
}

// Per-thread partial sums of shape (threads, B * C), reduced into a (B, C) double tensor.
struct Partials {
  explicit Partials(int64_t size) : size_(size), data_(static_cast<size_t>(at::get_num_threads() * size), 0.0) {}
  double* of_this_thread() { return data_.data() + at::get_thread_num() * size_; }
  at::Tensor reduced(at::IntArrayRef shape) const {
    auto out = at::zeros(shape, at::kDouble);
    double* o = out.data_ptr<double>();
    for (size_t t = 0; t < data_.size(); t += size_)
      for (int64_t k = 0; k < size_; ++k) o[k] += data_[t + k];
    return out;
  }
  int64_t size_;
  std::vector<double> data_;
};

// Tasks per parallel piece: at least ~32K elements, so that small maps do not pay a fork per tiny task.
int64_t grain(int64_t task_elements) { return std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(1, task_elements)); }

}  // namespace

// Channel sums (B, C) in float64 and z = sum_c w[c] x[:, c] (B, N) in x's dtype, in one pass over x.
std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x, const at::Tensor& w) {
  check_map(x, "x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  check_small(w, x, {C}, "w");
  auto z = at::empty({B, N}, x.options());
  Partials sums(B * C);
  const int64_t nb = (N + kStatsBlock - 1) / kStatsBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scse_stats", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* zp = z.data_ptr<scalar_t>();
    at::parallel_for(0, B * nb, grain(C * kStatsBlock), [&](int64_t begin, int64_t end) {
      double* acc = sums.of_this_thread();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nb, n0 = (t % nb) * kStatsBlock, len = std::min(kStatsBlock, N - n0);
        stats_block(xp + b * C * N + n0, wp, C, N, len, zp + b * N + n0, acc + b * C);
      }
    });
  });
  return {sums.reduced({B, C}), z};
}

// max(x * gc[:, :, None], x * gs[:, None, :]) for x (B, C, N), gc (B, C), gs (B, N), written into out (a fresh
// tensor) or, when out is undefined, over x.
void maxout_forward_into(const at::Tensor& x, const at::Tensor& gc, const at::Tensor& gs, const at::Tensor& out) {
  check_map(x, "x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  check_small(gc, x, {B, C}, "gc");
  check_small(gs, x, {B, N}, "gs");
  const int64_t nb = (N + kRowChunk - 1) / kRowChunk;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scse_maxout_forward", [&] {
    scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gcp = gc.data_ptr<scalar_t>();
    const scalar_t* gsp = gs.data_ptr<scalar_t>();
    scalar_t* op = out.defined() ? out.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, B * C * nb, grain(kRowChunk), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t row = t / nb, n0 = (t % nb) * kRowChunk, len = std::min(kRowChunk, N - n0);
        const int64_t off = row * N + n0;
        if (op != nullptr) {
          forward_block(xp + off, gcp + row, gsp + (row / C) * N + n0, 1, N, len, op + off);
        } else {
          forward_block_inplace(xp + off, gcp + row, gsp + (row / C) * N + n0, 1, N, len);
        }
      }
    });
  });
}

at::Tensor maxout_forward(const at::Tensor& x, const at::Tensor& gc, const at::Tensor& gs) {
  auto out = at::empty_like(x);
  maxout_forward_into(x, gc, gs, out);
  return out;
}

// In-place form for inference without autograd: x is overwritten by the block's output.
at::Tensor& maxout_forward_(at::Tensor& x, const at::Tensor& gc, const at::Tensor& gs) {
  maxout_forward_into(x, gc, gs, at::Tensor());
  return x;
}

// Backward of the max-out block for the gates gc = cSE(x), gs = sigmoid(sum_c w[c] x[:, c] + bias). Returns the
// input gradient without the cSE mean's term, the gradient w.r.t. gc (B, C, float64), w.r.t. the sSE
// pre-sigmoid z (B, N, x's dtype), and w.r.t. w (C, float64).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> maxout_backward(const at::Tensor& x, const at::Tensor& grad,
                                                                           const at::Tensor& gc, const at::Tensor& gs,
                                                                           const at::Tensor& w) {
  check_map(x, "x");
  const int64_t B = x.size(0), C = x.size(1), N = x.size(2);
  check_small(grad, x, x.sizes(), "grad");
  check_small(gc, x, {B, C}, "gc");
  check_small(gs, x, {B, N}, "gs");
  check_small(w, x, {C}, "w");
  auto grad_x = at::empty_like(x);
  auto grad_z = at::empty({B, N}, x.options());
  Partials gc_acc(B * C), w_acc(C);
  const int64_t nb = (N + kBackwardBlock - 1) / kBackwardBlock;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scse_maxout_backward", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* gcp = gc.data_ptr<scalar_t>();
    const scalar_t* gsp = gs.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* gxp = grad_x.data_ptr<scalar_t>();
    scalar_t* dzp = grad_z.data_ptr<scalar_t>();
    at::parallel_for(0, B * nb, grain(C * kBackwardBlock), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> work(kBackwardBlock);
      double* gca = gc_acc.of_this_thread();
      double* wa = w_acc.of_this_thread();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nb, n0 = (t % nb) * kBackwardBlock, len = std::min(kBackwardBlock, N - n0);
        const int64_t off = b * C * N + n0;
        backward_block(xp + off, gp + off, gcp + b * C, gsp + b * N + n0, wp, C, N, len, gxp + off, dzp + b * N + n0,
                       work.data(), gca + b * C, wa);
      }
    });
  });
  return {grad_x, gc_acc.reduced({B, C}), grad_z, w_acc.reduced({C})};
}

TORCH_LIBRARY(scse_monai, m) {
  m.def("stats(Tensor x, Tensor w) -> (Tensor, Tensor)", &stats);
  m.def("maxout_forward(Tensor x, Tensor gc, Tensor gs) -> Tensor", &maxout_forward);
  m.def("maxout_forward_(Tensor(a!) x, Tensor gc, Tensor gs) -> Tensor(a!)", &maxout_forward_);
  m.def("maxout_backward(Tensor x, Tensor grad, Tensor gc, Tensor gs, Tensor w) -> (Tensor, Tensor, Tensor, Tensor)",
        &maxout_backward);
}

}  // namespace scse_monai
