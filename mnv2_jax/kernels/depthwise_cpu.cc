// Depthwise convolution (NHWC input, (KH, KW, 1, C) HWIO kernel) and its two gradients as XLA:CPU FFI kernels,
// float32. Built and registered by mnv2_jax/kernels/cpu.py; equal to XLA's grouped convolution (tests/test_layers.py).
//
// Each pass reads its operands once, one image row at a time: the forward pass and the input gradient add each
// tap's shifted row times the tap into the row they write (in L1), the kernel gradient keeps 32 channels of each
// tap's sum in vector registers. Rows are spread over XLA's intra-op thread pool. XLA itself splits the same
// depthwise into a padded copy, the taps and a sum, and its kernel gradient into a loop over batch chunks.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, kh, kw, oh, ow, sh, sw, pt, pl, dh, dw;
};

// Runs body(task) for task in [0, tasks) on the caller and the intra-op pool; returns when all are done.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, const Body& body) {
  int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  if (helpers <= 0) {
    for (int64_t t = 0; t < tasks; ++t) body(t);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto state = std::make_shared<State>();
  const Body* shared_body = &body;
  auto work = [state, shared_body, tasks]() {
    for (int64_t t; (t = state->next.fetch_add(1)) < tasks;) {
      (*shared_body)(t);  // only reached while the caller waits for this task
      if (state->done.fetch_add(1) + 1 == tasks) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->finished.notify_all();
      }
    }
  };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->finished.wait(lock, [&] { return state->done.load() == tasks; });
}

// out[p * out_step + c] += in[p * in_step + c] * weight[c] for p in [0, count), c in [0, channels).
void MultiplyAddRows(float* __restrict out, const float* __restrict in, const float* __restrict weight,
                     int64_t out_step, int64_t in_step, int64_t count, int64_t channels) {
  for (int64_t p = 0; p < count; ++p) {
    float* o = out + p * out_step;
    const float* x = in + p * in_step;
    for (int64_t c = 0; c < channels; ++c) o[c] += x[c] * weight[c];
  }
}

// The output columns [first, last) whose input column ow * stride + offset lies in [0, size).
inline void ValidRange(int64_t offset, int64_t stride, int64_t size, int64_t outputs, int64_t* first, int64_t* last) {
  *first = offset >= 0 ? 0 : (-offset + stride - 1) / stride;
  *last = size - 1 - offset < 0 ? 0 : std::min(outputs, (size - 1 - offset) / stride + 1);
}

// Calls visit(tap, x_start, first, count) for each tap (i, j) of output row `row` = (n, oh) whose input row is in
// the image: output columns [first, first + count) read the input row segment that starts at x_start, with a step
// of sw columns (the other columns fall in the padding).
template <typename Visit>
void ForEachTapSegment(const Geometry& g, const float* x, int64_t row, const Visit& visit) {
  int64_t n = row / g.oh, oh = row % g.oh;
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t ih = oh * g.sh + i * g.dh - g.pt;
    if (ih < 0 || ih >= g.h) continue;
    for (int64_t j = 0; j < g.kw; ++j) {
      int64_t offset = j * g.dw - g.pl, first, last;
      ValidRange(offset, g.sw, g.w, g.ow, &first, &last);
      if (last <= first) continue;
      visit(i * g.kw + j, x + ((n * g.h + ih) * g.w + first * g.sw + offset) * g.c, first, last - first);
    }
  }
}

// One output row of the forward pass: y[n, oh, :, :] = sum over taps of a shifted input row times the tap.
void ForwardRow(const Geometry& g, const float* x, const float* k, float* y, int64_t row) {
  float* y_row = y + row * g.ow * g.c;
  std::fill(y_row, y_row + g.ow * g.c, 0.0f);
  ForEachTapSegment(g, x, row, [&](int64_t tap, const float* x_start, int64_t first, int64_t count) {
    MultiplyAddRows(y_row + first * g.c, x_start, k + tap * g.c, g.c, g.sw * g.c, count, g.c);
  });
}

// One input row of the input gradient: dx[n, ih, :, :] = sum over the taps that read it of dy times the tap.
void InputGradientRow(const Geometry& g, const float* dy, const float* k, float* dx, int64_t row) {
  int64_t n = row / g.h, ih = row % g.h;
  float* dx_row = dx + row * g.w * g.c;
  std::fill(dx_row, dx_row + g.w * g.c, 0.0f);
  for (int64_t i = 0; i < g.kh; ++i) {
    int64_t oh_scaled = ih + g.pt - i * g.dh;
    if (oh_scaled < 0 || oh_scaled % g.sh || oh_scaled / g.sh >= g.oh) continue;
    const float* dy_row = dy + (n * g.oh + oh_scaled / g.sh) * g.ow * g.c;
    for (int64_t j = 0; j < g.kw; ++j) {
      // Output column ow reads input column iw = ow * sw + offset: walk ow over its valid range.
      int64_t offset = j * g.dw - g.pl, first, last;
      ValidRange(offset, g.sw, g.w, g.ow, &first, &last);
      if (last <= first) continue;
      MultiplyAddRows(dx_row + (first * g.sw + offset) * g.c, dy_row + first * g.c, k + (i * g.kw + j) * g.c,
                      g.sw * g.c, g.c, last - first, g.c);
    }
  }
}

template <int B>
inline void AccumulateBlock(const float* x, const float* dy, int64_t x_step, int64_t dy_step, int64_t count,
                            int64_t offset, float* acc_out) {
  float acc[B];
  for (int j = 0; j < B; ++j) acc[j] = acc_out[offset + j];
  for (int64_t p = 0; p < count; ++p) {
    const float* xp = x + p * x_step + offset;
    const float* dp = dy + p * dy_step + offset;
    for (int j = 0; j < B; ++j) acc[j] += xp[j] * dp[j];
  }
  for (int j = 0; j < B; ++j) acc_out[offset + j] = acc[j];
}

// acc[c] += sum_p x[p * x_step + c] * dy[p * dy_step + c] for p in [0, count).
void AccumulateProducts(const float* x, const float* dy, int64_t x_step, int64_t dy_step, int64_t count,
                        int64_t channels, float* acc) {
  int64_t c = 0;
  for (; c + 32 <= channels; c += 32) AccumulateBlock<32>(x, dy, x_step, dy_step, count, c, acc);
  for (; c + 8 <= channels; c += 8) AccumulateBlock<8>(x, dy, x_step, dy_step, count, c, acc);
  for (; c < channels; ++c) AccumulateBlock<1>(x, dy, x_step, dy_step, count, c, acc);
}

// Adds one output row's contribution to the kernel gradient: acc[tap, c] += sum_ow x[.., c] * dy[n, oh, ow, c].
void KernelGradientRow(const Geometry& g, const float* x, const float* dy, float* acc, int64_t row) {
  const float* dy_row = dy + row * g.ow * g.c;
  ForEachTapSegment(g, x, row, [&](int64_t tap, const float* x_start, int64_t first, int64_t count) {
    AccumulateProducts(x_start, dy_row + first * g.c, g.sw * g.c, g.c, count, g.c, acc + tap * g.c);
  });
}

using Dims = ffi::Span<const int64_t>;

// x: the (N, H, W, C) input, k: the (KH, KW, 1, C) kernel, y: the (N, OH, OW, C) output.
Geometry MakeGeometry(Dims x, Dims k, Dims y, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh, int64_t dw) {
  return Geometry{x[0], x[1], x[2], x[3], k[0], k[1], y[1], y[2], sh, sw, pt, pl, dh, dw};
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                   int64_t dw) {
  Geometry g = MakeGeometry(x.dimensions(), kernel.dimensions(), y->dimensions(), sh, sw, pt, pl, dh, dw);
  const float* xp = x.typed_data();
  const float* kp = kernel.typed_data();
  float* yp = y->typed_data();
  ParallelFor(pool, g.n * g.oh, [&](int64_t row) { ForwardRow(g, xp, kp, yp, row); });
  return ffi::Error::Success();
}

ffi::Error InputGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> kernel,
                         ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                         int64_t dw) {
  Geometry g = MakeGeometry(dx->dimensions(), kernel.dimensions(), dy.dimensions(), sh, sw, pt, pl, dh, dw);
  const float* dyp = dy.typed_data();
  const float* kp = kernel.typed_data();
  float* dxp = dx->typed_data();
  ParallelFor(pool, g.n * g.h, [&](int64_t row) { InputGradientRow(g, dyp, kp, dxp, row); });
  return ffi::Error::Success();
}

// A fixed number of partial sums, added in a fixed order: the result does not depend on the thread count.
constexpr int64_t kKernelGradientParts = 16;

ffi::Error KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dk, int64_t sh, int64_t sw, int64_t pt, int64_t pl, int64_t dh,
                          int64_t dw) {
  Geometry g = MakeGeometry(x.dimensions(), dk->dimensions(), dy.dimensions(), sh, sw, pt, pl, dh, dw);
  int64_t rows = g.n * g.oh, size = g.kh * g.kw * g.c;
  int64_t parts = std::min(rows, kKernelGradientParts);
  std::vector<float> partial(parts * size, 0.0f);
  const float* xp = x.typed_data();
  const float* dyp = dy.typed_data();
  ParallelFor(pool, parts, [&](int64_t part) {
    for (int64_t row = part * rows / parts; row < (part + 1) * rows / parts; ++row)
      KernelGradientRow(g, xp, dyp, partial.data() + part * size, row);
  });
  float* out = dk->typed_data();
  std::fill(out, out + size, 0.0f);
  for (int64_t part = 0; part < parts; ++part)
    for (int64_t i = 0; i < size; ++i) out[i] += partial[part * size + i];
  return ffi::Error::Success();
}

}  // namespace

// Two float32 operands, one float32 result, the geometry as attributes (names as in mnv2_jax/kernels/cpu.py).
#define DEPTHWISE_BINDING()                                                                           \
  ffi::Ffi::Bind()                                                                                     \
      .Ctx<ffi::ThreadPool>()                                                                          \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                    \
      .Arg<ffi::Buffer<ffi::F32>>()                                                                    \
      .Ret<ffi::Buffer<ffi::F32>>()                                                                    \
      .Attr<int64_t>("stride_h")                                                                       \
      .Attr<int64_t>("stride_w")                                                                       \
      .Attr<int64_t>("pad_top")                                                                        \
      .Attr<int64_t>("pad_left")                                                                       \
      .Attr<int64_t>("dilation_h")                                                                     \
      .Attr<int64_t>("dilation_w")

XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2DepthwiseForward, Forward, DEPTHWISE_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2DepthwiseInputGradient, InputGradient, DEPTHWISE_BINDING());
XLA_FFI_DEFINE_HANDLER_SYMBOL(Mnv2DepthwiseKernelGradient, KernelGradient, DEPTHWISE_BINDING());
