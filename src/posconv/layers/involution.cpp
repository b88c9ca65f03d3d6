// Involution with its kernel generator and its padding, fused, on CPU. posconv.layers.involution builds
// this file at first use and registers the operators' autograd and shapes; its docstring says why.
//
//   forward:  out[b, c, i, j] = bias[c] + sum over taps t = (u, v) of
//                                 k[b, g(c)*K + t, i, j] * x~[b, c, i*sh + u*dh, j*sw + v*dw]
//             k = ws @ relu(wr @ xbar + br + term) + bs per output pixel, never stored
//   backward: the gradients of x, wr, br, term (per image), ws, bs and bias; the kernels are recomputed.
//
// x~ is x padded as nn.Conv2d pads it, never built: a padded row or column maps to an input one, or to a
// zero (`Problem::rows`, `cols`). xbar(i, j) is the mean of the sh x sw block of x~ whose top-left pixel is
// the kernel centre (i*sh + dh*(kh-1)/2, j*sw + dw*(kw-1)/2), clipped at x~'s end.
//
// Tensors are contiguous in one layout. Three row kernels, chosen per call: channels_last with groups of
// a multiple of 16 channels (the model's case: explicit vectors of 16 channels, P pixels at a time),
// other channels_last (loops over channels), and NCHW (loops over a row's pixels). Pixels whose taps all
// fall inside x ("direct") take the fast path; the border reads through the maps. The forward runs output
// rows in parallel. The backward scatters into x's gradient: with zero padding it runs output rows in
// blocks, even blocks then odd ones, so that no two threads write the same rows; with the other padding
// modes (whose maps fold the border onto distant rows) one image per thread. Weight gradients are summed
// in T per block of rows, then in double.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

enum Mode : int64_t { ZEROS, REFLECT, REPLICATE, CIRCULAR };  // nn.Conv2d's padding modes

template <typename T>
inline void axpy(int64_t n, T a, const T* __restrict x, T* __restrict y) {
#pragma omp simd
  for (int64_t e = 0; e < n; ++e) y[e] += a * x[e];
}

template <typename T>
inline T dot(int64_t n, const T* __restrict x, const T* __restrict y) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += x[e] * y[e];
  return sum;
}

template <typename T>
inline T total(int64_t n, const T* __restrict x) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t e = 0; e < n; ++e) sum += x[e];
  return sum;
}

// The input index that padded index `padded` reads along an axis, or -1 for a zero (as F.pad pads).
int64_t source_index(int64_t padded, int64_t before, int64_t size, int64_t mode) {
  int64_t s = padded - before;
  if (s >= 0 && s < size) return s;
  switch (mode) {
    case ZEROS:
      return -1;
    case REFLECT:
      s = s < 0 ? -s : 2 * (size - 1) - s;
      break;
    case REPLICATE:
      s = s < 0 ? 0 : size - 1;
      break;
    default:
      s = (s % size + size) % size;
  }
  TORCH_CHECK(s >= 0 && s < size, "padding: too large for the input in this padding mode");
  return s;
}

// Sizes, maps and weights of one call.
template <typename T>
struct Problem {
  int64_t B, C, H, W, Hp, Wp, Ho, Wo, kh, kw, sh, sw, dh, dw, G, R, K, GK, Cg, top, left, pad_top, pad_left,
      mode, Cx;  // Cx: x's channels (C once projected)
  bool channels_last;
  const T *x, *project, *wr, *br, *term, *ws, *bs, *bias;  // project: (C, Cx), or null (Cx = C)
  std::vector<int64_t> rows, cols;  // padded row, column -> input row, column, or -1 (a zero)
  // output columns whose taps and generator block all read x's columns at their padded index less the
  // padding ("direct" columns; they are contiguous)
  std::vector<char> col_direct;

  int64_t at_x(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((b * H + y) * W + x) * Cx + c : ((b * Cx + c) * H + y) * W + x;
  }
  int64_t at_out(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((b * Ho + y) * Wo + x) * C + c : ((b * C + c) * Ho + y) * Wo + x;
  }
  // offset in x of x~[b, c, py, px], or -1 where x~ is a padding zero
  int64_t source(int64_t b, int64_t c, int64_t py, int64_t px) const {
    int64_t y = rows[py], x = cols[px];
    return (y < 0 || x < 0) ? -1 : at_x(b, c, y, x);
  }
  int64_t tap_row(int64_t i, int64_t t) const { return i * sh + (t / kw) * dh; }
  int64_t tap_col(int64_t j, int64_t t) const { return j * sw + (t % kw) * dw; }
  bool pointwise_generator() const { return sh == 1 && sw == 1; }  // xbar is one pixel of x~
  // the generator's block for output (i, j): padded rows [r0, r1), columns [q0, q1)
  void block(int64_t i, int64_t j, int64_t& r0, int64_t& r1, int64_t& q0, int64_t& q1) const {
    r0 = i * sh + top, q0 = j * sw + left;
    r1 = std::min(r0 + sh, Hp), q1 = std::min(q0 + sw, Wp);
  }
  T block_scale(int64_t i, int64_t j) const {
    int64_t r0, r1, q0, q1;
    block(i, j, r0, r1, q0, q1);
    return T(1) / T((r1 - r0) * (q1 - q0));
  }
  // padded rows that output row i touches (taps and generator block): [i*sh, i*sh + reach)
  int64_t reach() const { return std::max((kh - 1) * dh + 1, top + sh); }
  T term_at(int64_t r, int64_t i, int64_t j) const { return term ? term[(r * Ho + i) * Wo + j] : T(0); }
};

// whether every padded index in [from, to) maps to itself less `before` (an input index, not a zero's -1)
bool direct(const std::vector<int64_t>& map, int64_t from, int64_t to, int64_t before) {
  for (int64_t e = from; e < to; ++e)
    if (map[e] < 0 || map[e] != e - before) return false;
  return true;
}

template <typename T>
Problem<T> problem(const Tensor& x, const c10::optional<Tensor>& project, const Tensor& wr, const Tensor& br,
                   const c10::optional<Tensor>& term, const Tensor& ws, const Tensor& bs,
                   const c10::optional<Tensor>& bias, at::IntArrayRef geometry, bool channels_last) {
  TORCH_CHECK(geometry.size() == 12, "geometry: expected [kh, kw, sh, sw, dh, dw, G, top, bottom, left, right, mode]");
  Problem<T> p;
  p.kh = geometry[0], p.kw = geometry[1], p.sh = geometry[2], p.sw = geometry[3];
  p.dh = geometry[4], p.dw = geometry[5], p.G = geometry[6], p.pad_top = geometry[7], p.pad_left = geometry[9];
  p.mode = geometry[11];
  TORCH_CHECK(std::min({p.kh, p.kw, p.sh, p.sw, p.dh, p.dw, p.G}) >= 1 &&
                  std::min({geometry[7], geometry[8], geometry[9], geometry[10]}) >= 0 && p.mode >= ZEROS &&
                  p.mode <= CIRCULAR,
              "geometry: out of range");
  TORCH_CHECK(x.dim() == 4, "x: expected a 4-d tensor");
  p.B = x.size(0), p.Cx = x.size(1), p.H = x.size(2), p.W = x.size(3);
  p.C = project.has_value() ? project->size(0) : p.Cx;
  p.project = nullptr;
  if (project.has_value()) {
    TORCH_CHECK(project->dim() == 2 && project->size(1) == p.Cx && project->is_contiguous() &&
                    project->scalar_type() == x.scalar_type(),
                "project: expected a contiguous (C, C_in) in x's dtype");
    p.project = project->data_ptr<T>();
  }
  TORCH_CHECK(p.H >= 1 && p.W >= 1, "x: expected a non-empty image");
  p.Hp = p.H + geometry[7] + geometry[8], p.Wp = p.W + geometry[9] + geometry[10];
  TORCH_CHECK(p.Hp >= p.dh * (p.kh - 1) + 1 && p.Wp >= p.dw * (p.kw - 1) + 1 && p.C % p.G == 0,
              "x: smaller than the dilated kernel once padded, or channels not divisible by the groups");
  p.Ho = (p.Hp - p.dh * (p.kh - 1) - 1) / p.sh + 1, p.Wo = (p.Wp - p.dw * (p.kw - 1) - 1) / p.sw + 1;
  p.R = wr.size(0), p.K = p.kh * p.kw, p.GK = p.G * p.K, p.Cg = p.C / p.G;
  p.top = p.dh * (p.kh - 1) / 2, p.left = p.dw * (p.kw - 1) / 2;
  p.channels_last = channels_last;
  auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(x.is_contiguous(format), "x: expected a tensor contiguous in the given layout");
  TORCH_CHECK(wr.dim() == 2 && wr.size(1) == p.C && br.numel() == p.R, "wr, br: expected (R, C) and (R)");
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == p.GK && ws.size(1) == p.R && bs.numel() == p.GK,
              "ws, bs: expected (G*kh*kw, R) and (G*kh*kw)");
  for (const Tensor* t : {&wr, &br, &ws, &bs})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous(), "weights: expected x's dtype");
  p.x = x.data_ptr<T>(), p.wr = wr.data_ptr<T>(), p.br = br.data_ptr<T>();
  p.ws = ws.data_ptr<T>(), p.bs = bs.data_ptr<T>();
  p.term = nullptr, p.bias = nullptr;
  if (term.has_value()) {
    TORCH_CHECK(term->sizes() == at::IntArrayRef({p.R, p.Ho, p.Wo}) && term->is_contiguous() &&
                    term->scalar_type() == x.scalar_type(),
                "term: expected a contiguous (R, H_out, W_out) in x's dtype");
    p.term = term->data_ptr<T>();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == p.C && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                "bias: expected (C) in x's dtype");
    p.bias = bias->data_ptr<T>();
  }
  for (int64_t e = 0; e < p.Hp; ++e) p.rows.push_back(source_index(e, p.pad_top, p.H, p.mode));
  for (int64_t e = 0; e < p.Wp; ++e) p.cols.push_back(source_index(e, p.pad_left, p.W, p.mode));
  const int64_t wide = std::max((p.kw - 1) * p.dw + 1, p.left + p.sw);  // padded columns a pixel touches
  for (int64_t j = 0; j < p.Wo; ++j)
    p.col_direct.push_back(direct(p.cols, j * p.sw, std::min(j * p.sw + wide, p.Wp), p.pad_left));
  return p;
}

// The weight gradients in double, canonical layouts: wr (R x C), br, ws transposed (R x GK), bs, bias,
// project (C x Cx).
struct Totals {
  std::vector<double> wr, br, ws, bs, bias, project;
  template <typename T>
  explicit Totals(const Problem<T>& p)
      : wr(p.R * p.C), br(p.R), ws(p.R * p.GK), bs(p.GK), bias(p.C), project(p.C * p.Cx) {}
  void add(const Totals& other) {
    for (auto [sum, part] : {std::pair{&wr, &other.wr}, {&br, &other.br}, {&ws, &other.ws},
                             {&bs, &other.bs}, {&bias, &other.bias}, {&project, &other.project}})
      for (size_t e = 0; e < sum->size(); ++e) (*sum)[e] += (*part)[e];
  }
};

// The same sums in T, per block of rows, in the canonical layouts (the loop kernels').
template <typename T>
struct Sums {
  std::vector<T> wr, br, ws, bs, bias;
  explicit Sums(const Problem<T>& p) : wr(p.R * p.C), br(p.R), ws(p.R * p.GK), bs(p.GK), bias(p.C) {}
  void flush(Totals& totals) {
    for (auto [sum, part] : {std::pair{&totals.wr, &wr}, {&totals.br, &br}, {&totals.ws, &ws},
                             {&totals.bs, &bs}, {&totals.bias, &bias}}) {
      for (size_t e = 0; e < part->size(); ++e) (*sum)[e] += (*part)[e];
      std::fill(part->begin(), part->end(), T(0));
    }
  }
};

// ---- channels_last, groups of any size: loops over channels ----

template <typename T>
struct LoopNHWC {
  const Problem<T>& p;
  std::vector<T> xbar, pre, k, scratch;  // per row: Wo x C, Wo x R (before the ReLU), Wo x GK
  std::vector<T> wrt, wst;               // wr transposed (C x R), ws transposed (R x GK)
  Sums<T> sums;

  explicit LoopNHWC(const Problem<T>& problem) : p(problem), sums(problem) {
    wrt.resize(p.C * p.R), wst.resize(p.R * p.GK);
    for (int64_t r = 0; r < p.R; ++r) {
      for (int64_t c = 0; c < p.C; ++c) wrt[c * p.R + r] = p.wr[r * p.C + c];
      for (int64_t t = 0; t < p.GK; ++t) wst[r * p.GK + t] = p.ws[t * p.R + r];
    }
  }
  void generate(int64_t b, int64_t i) {
    xbar.assign(p.Wo * p.C, T(0)), pre.resize(p.Wo * p.R), k.resize(p.Wo * p.GK);
    for (int64_t j = 0; j < p.Wo; ++j) {
      T* x = xbar.data() + j * p.C;
      int64_t r0, r1, q0, q1;
      p.block(i, j, r0, r1, q0, q1);
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t z = q0; z < q1; ++z)
          if (int64_t at = p.source(b, 0, y, z); at >= 0) axpy(p.C, p.block_scale(i, j), p.x + at, x);
      T* h = pre.data() + j * p.R;
      for (int64_t r = 0; r < p.R; ++r) h[r] = p.br[r] + p.term_at(r, i, j);
      for (int64_t c = 0; c < p.C; ++c) axpy(p.R, x[c], wrt.data() + c * p.R, h);
      T* kj = k.data() + j * p.GK;
      std::copy(p.bs, p.bs + p.GK, kj);
      for (int64_t r = 0; r < p.R; ++r)
        if (h[r] > 0) axpy(p.GK, h[r], wst.data() + r * p.GK, kj);
    }
  }
  int64_t tap(int64_t b, int64_t i, int64_t j, int64_t t) const {
    return p.source(b, (t / p.K) * p.Cg, p.tap_row(i, t % p.K), p.tap_col(j, t % p.K));
  }
  void forward(int64_t b, int64_t i, T* out) {
    generate(b, i);
    for (int64_t j = 0; j < p.Wo; ++j) {
      T* o = out + p.at_out(b, 0, i, j);
      for (int64_t c = 0; c < p.C; ++c) o[c] = p.bias ? p.bias[c] : T(0);
      for (int64_t t = 0; t < p.GK; ++t)
        if (int64_t at = tap(b, i, j, t); at >= 0) axpy(p.Cg, k[j * p.GK + t], p.x + at, o + (t / p.K) * p.Cg);
    }
  }
  void backward(int64_t b, int64_t i, const T* grad, T* gx, T* dterm) {
    generate(b, i);
    const int64_t C = p.C, R = p.R, GK = p.GK, Cg = p.Cg;
    scratch.resize(GK + R + C);
    T *dk = scratch.data(), *dpre = dk + GK, *dxb = dpre + R;
    for (int64_t j = 0; j < p.Wo; ++j) {
      const T* gj = grad + p.at_out(b, 0, i, j);
      for (int64_t t = 0; t < GK; ++t) {
        int64_t at = tap(b, i, j, t);
        const T* gg = gj + (t / p.K) * Cg;
        dk[t] = at >= 0 ? dot(Cg, gg, p.x + at) : T(0);
        if (at >= 0) axpy(Cg, k[j * GK + t], gg, gx + at);
      }
      axpy(C, T(1), gj, sums.bias.data());
      axpy(GK, T(1), dk, sums.bs.data());
      const T* h = pre.data() + j * R;
      for (int64_t r = 0; r < R; ++r) {
        axpy(GK, h[r] > 0 ? h[r] : T(0), dk, sums.ws.data() + r * GK);
        dpre[r] = h[r] > 0 ? dot(GK, wst.data() + r * GK, dk) : T(0);
      }
      if (dterm)
        for (int64_t r = 0; r < R; ++r) dterm[((b * R + r) * p.Ho + i) * p.Wo + j] = dpre[r];
      axpy(R, T(1), dpre, sums.br.data());
      const T* x = xbar.data() + j * C;
      std::fill(dxb, dxb + C, T(0));
      for (int64_t r = 0; r < R; ++r) {
        axpy(C, dpre[r], x, sums.wr.data() + r * C);
        axpy(C, dpre[r], p.wr + r * C, dxb);
      }
      int64_t r0, r1, q0, q1;
      p.block(i, j, r0, r1, q0, q1);
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t z = q0; z < q1; ++z)
          if (int64_t at = p.source(b, 0, y, z); at >= 0) axpy(C, p.block_scale(i, j), dxb, gx + at);
    }
  }
  void end_task(int64_t, T*, bool) {}  // (no projection here)
  void flush(Totals& totals) { sums.flush(totals); }
};

// ---- channels_last, groups of 16*m channels: explicit vectors of 16 channels ----

constexpr int64_t L = 16;  // lanes of a vector: one group of 16 channels
constexpr int P = 4;       // pixels per pass: independent chains of multiply-adds, weights loaded once
inline int64_t lanes_for(int64_t n) { return (n + L - 1) / L * L; }

template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(L * sizeof(T))));
  typedef T Unaligned __attribute__((vector_size(L * sizeof(T)), aligned(sizeof(T))));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I Mask __attribute__((vector_size(L * sizeof(T))));
};
template <typename T>
using Vec = typename Lanes<T>::V;

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, typename Lanes<T>::Mask{__VA_ARGS__})
#endif

// (not memcpy: a vector type aliases only its element type, so other loads need not be repeated after a
// store)
template <typename T>
inline Vec<T> load(const T* from) {
  return *reinterpret_cast<const typename Lanes<T>::Unaligned*>(from);
}
template <typename T>
inline void store(T* to, Vec<T> v) {
  *reinterpret_cast<typename Lanes<T>::Unaligned*>(to) = v;
}
template <typename T>
inline Vec<T> relu(Vec<T> v) {
  return v > T(0) ? v : Vec<T>{};
}

// Lane q of the result: the sum of v[q]'s lanes. A tree of shuffles and adds (v is overwritten): each
// level halves the partial sums per vector and the number of vectors.
template <typename T>
inline Vec<T> totals(Vec<T> (&v)[L]) {
  for (int q = 0; q < 8; ++q)
    v[q] = SHUFFLE(v[2 * q], v[2 * q + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE(v[2 * q], v[2 * q + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int q = 0; q < 4; ++q)
    v[q] = SHUFFLE(v[2 * q], v[2 * q + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE(v[2 * q], v[2 * q + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int q = 0; q < 2; ++q)
    v[q] = SHUFFLE(v[2 * q], v[2 * q + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE(v[2 * q], v[2 * q + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return SHUFFLE(v[0], v[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE(v[0], v[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// out[a*width + e] += sum over n of left(n, a) * right[n*width + e], for a < rows, e < width (whole vectors)
template <typename T, typename Left>
void accumulate_outer(int64_t count, int64_t rows, Left left, const T* right, int64_t width, T* out) {
  constexpr int64_t A = 8;  // rows per pass: A accumulators per vector of `right`
  for (int64_t e = 0; e < width; e += L) {
    int64_t a = 0;
    for (; a + A <= rows; a += A) {
      Vec<T> acc[A];
      for (int64_t q = 0; q < A; ++q) acc[q] = load(out + (a + q) * width + e);
      for (int64_t n = 0; n < count; ++n) {
        Vec<T> r = load(right + n * width + e);
        for (int64_t q = 0; q < A; ++q) acc[q] += left(n, a + q) * r;
      }
      for (int64_t q = 0; q < A; ++q) store(out + (a + q) * width + e, acc[q]);
    }
    for (; a < rows; ++a) {
      Vec<T> acc = load(out + a * width + e);
      for (int64_t n = 0; n < count; ++n) acc += left(n, a) * load(right + n * width + e);
      store(out + a * width + e, acc);
    }
  }
}

// Output rows per backward task: with zero padding, blocks that scatter into rows 2 blocks apart never
// share (see backward_rows); with other padding modes, an image.
template <typename T>
int64_t block_height(const Problem<T>& p) {
  return p.mode == ZEROS ? std::max<int64_t>(4, (p.reach() + p.sh - 1) / p.sh) : p.Ho;
}

// Input rows that `height` consecutive output rows touch: a window moving down with zero padding; the
// image with the other modes.
template <typename T>
int64_t window_rows(const Problem<T>& p, int64_t height) {
  return p.mode == ZEROS ? std::min(p.H, (height - 1) * p.sh + p.reach()) : p.H;
}

// Rows of W x C values for input rows made on demand: at most `capacity`. A new row takes a free slot,
// else that of the lowest row held (with zero padding a task's window of rows moves down, so rows above
// it are not needed again; with the other modes the capacity is the image's rows).
template <typename T>
struct RowCache {
  int64_t size, capacity;
  std::vector<T> data;
  std::vector<int64_t> held, slot;  // held[s]: the input row in slot s, or -1; slot[y]: row y's slot, or -1

  RowCache(int64_t rows, int64_t capacity, int64_t size)
      : size(size), capacity(capacity), data(capacity * size), held(capacity, -1), slot(rows, -1) {}
  bool full() const { return std::find(held.begin(), held.end(), -1) == held.end(); }
  // row y's values, and whether they are new (then the caller writes them)
  T* get(int64_t y, bool& fresh) {
    fresh = slot[y] < 0;
    if (fresh) {
      auto free = std::find(held.begin(), held.end(), -1);
      int64_t s = (free != held.end() ? free : std::min_element(held.begin(), held.end())) - held.begin();
      if (held[s] >= 0) slot[held[s]] = -1;
      held[s] = y, slot[y] = s;
    }
    return data.data() + slot[y] * size;
  }
  void clear() {
    for (int64_t& y : held)
      if (y >= 0) slot[y] = -1, y = -1;
  }
};

template <typename T>
struct VecNHWC {
  using V = Vec<T>;
  const Problem<T>& p;
  const int64_t RP, GKP, WP, M;  // R and GK padded to whole vectors; Wo with a vector's room; vectors per group
  // weights, zero-padded: wr transposed (C x RP), br (RP), ws transposed (R x GKP), bs (GKP), ws (GK x RP);
  // the projection transposed (Cx x C) and padded (C x lanes_for(Cx))
  std::vector<T> wrt, br, wst, bs, wsp, pt, pp;
  std::vector<int64_t> groups;  // kernel t of the GK: its group's first channel
  // x~'s rows, (W x C) each: an input row of x, or with a projection that row projected (in `projected`,
  // made at first use per image); its gradient's rows, in x's gradient or (projection) in `gradients`,
  // handed on to the input and the projection's gradients by `end_task`. With zero padding a task's
  // output rows touch a window of input rows moving down, so a few rows are enough; other padding modes
  // (whose maps fold the border onto distant rows) keep the image's.
  int64_t image = -1;
  RowCache<T> projected, gradients;
  // per output row: kernel t's tap row in x~ (null for a padding row of zeros) and that row's gradient
  std::vector<const T*> tap;
  std::vector<T*> tap_grad;
  // per row: xbar where it is not a pixel of x~ (Wo x C), pre-ReLU and ReLU (Wo x RP), kernels (Wo x GKP),
  // their gradients transposed (GK x WP), the pre-ReLU gradient (Wo x RP); where each pixel's xbar is
  std::vector<T> xbar, pre, h, k, dkt, dpre;
  std::vector<const T*> xbars;
  // gradient sums of the rows so far: wr transposed (C x RP), br (RP), ws (GK x RP), bs, bias, the
  // projection transposed (Cx x C)
  std::vector<T> swrt, sbr, sws, sbs, sbias, spt;

  explicit VecNHWC(const Problem<T>& problem)
      : p(problem),
        RP(lanes_for(problem.R)),
        GKP(lanes_for(problem.GK)),
        WP(problem.Wo + L),
        M(problem.Cg / L),
        projected(problem.H, problem.project ? window_rows(problem, 1) : 0, problem.W * problem.C),
        gradients(problem.H, problem.project ? window_rows(problem, block_height(problem)) : 0,
                  problem.W * problem.C) {
    const int64_t C = p.C, R = p.R, GK = p.GK, Wo = p.Wo;
    wrt.assign(C * RP, T(0)), br.assign(RP, T(0)), wst.assign(R * GKP, T(0)), bs.assign(GKP, T(0));
    wsp.assign(GK * RP, T(0));
    for (int64_t r = 0; r < R; ++r) {
      br[r] = p.br[r];
      for (int64_t c = 0; c < C; ++c) wrt[c * RP + r] = p.wr[r * C + c];
      for (int64_t t = 0; t < GK; ++t) wst[r * GKP + t] = wsp[t * RP + r] = p.ws[t * R + r];
    }
    std::copy(p.bs, p.bs + GK, bs.begin());
    for (int64_t t = 0; t < GK; ++t) groups.push_back((t / p.K) * p.Cg);
    tap.resize(GK), tap_grad.resize(GK);
    xbar.resize(Wo * C), pre.resize(Wo * RP), h.resize(Wo * RP), k.resize(Wo * GKP), dpre.resize(Wo * RP);
    dkt.resize(GK * WP), xbars.resize(Wo);
    swrt.assign(C * RP, T(0)), sbr.assign(RP, T(0)), sws.assign(GK * RP, T(0)), sbs.assign(GK, T(0));
    sbias.assign(C, T(0));
    if (p.project) {
      const int64_t CxP = lanes_for(p.Cx);
      pt.resize(p.Cx * C), pp.assign(C * CxP, T(0)), spt.assign(p.Cx * C, T(0));
      for (int64_t c = 0; c < C; ++c)
        for (int64_t e = 0; e < p.Cx; ++e) pt[e * C + c] = pp[c * CxP + e] = p.project[c * p.Cx + e];
    }
  }

  bool direct(int64_t j) const { return p.col_direct[j]; }

  // x~'s padded row py of image b: where its input row starts (column 0), or null for a row of zeros
  const T* source(int64_t b, int64_t py) {
    const int64_t y = p.rows[py];
    if (y < 0) return nullptr;
    if (!p.project) return p.x + p.at_x(b, 0, y, 0);
    if (image != b) projected.clear(), image = b;
    bool fresh;
    T* row = projected.get(y, fresh);
    if (fresh) project_row(p.x + p.at_x(b, 0, y, 0), row);
    return row;
  }
  // the same in x~'s gradient
  T* target(int64_t b, int64_t py, T* gx) {
    const int64_t y = p.rows[py];
    if (y < 0) return nullptr;
    if (!p.project) return gx + p.at_x(b, 0, y, 0);
    TORCH_CHECK(gradients.slot[y] >= 0 || !gradients.full(),
                "involution: more gradient rows than a task touches");  // (they would be lost)
    bool fresh;
    T* row = gradients.get(y, fresh);
    if (fresh) std::fill(row, row + p.W * p.C, T(0));
    return row;
  }
  const T* source_pixel(int64_t b, int64_t py, int64_t px) {
    const T* row = source(b, py);
    return row && p.cols[px] >= 0 ? row + p.cols[px] * p.C : nullptr;
  }
  T* target_pixel(int64_t b, int64_t py, int64_t px, T* gx) {
    T* row = target(b, py, gx);
    return row && p.cols[px] >= 0 ? row + p.cols[px] * p.C : nullptr;
  }

  // out (W x C) = the projection of an input row (W x Cx), P pixels at a time
  void project_row(const T* in, T* out) const {
    const int64_t C = p.C, Cx = p.Cx;
    auto pixels = [&](auto n, int64_t x) {
      constexpr int N = decltype(n)::value;
      for (int64_t e = 0; e < C; e += L) {
        V acc[N] = {};
        for (int64_t c = 0; c < Cx; ++c) {
          V w = load(pt.data() + c * C + e);
          for (int q = 0; q < N; ++q) acc[q] += in[(x + q) * Cx + c] * w;
        }
        for (int q = 0; q < N; ++q) store(out + (x + q) * C + e, acc[q]);
      }
    };
    int64_t x = 0;
    for (; x + P <= p.W; x += P) pixels(std::integral_constant<int, P>{}, x);
    for (; x < p.W; ++x) pixels(std::integral_constant<int, 1>{}, x);
  }

  // After a task's rows (projection only): the gradients of x~'s rows it touched go to the input's
  // gradient (through the projection's transpose) and to the projection's gradient.
  void end_task(int64_t b, T* gx, bool input_grad) {
    if (!p.project) return;
    const int64_t C = p.C, Cx = p.Cx, CxP = lanes_for(Cx), W = p.W;
    for (int64_t y : gradients.held) {
      if (y < 0) continue;
      const T *g = gradients.data.data() + gradients.slot[y] * W * C, *in = p.x + p.at_x(b, 0, y, 0);
      accumulate_outer(W, Cx, [&](int64_t n, int64_t a) { return in[n * Cx + a]; }, g, C, spt.data());
      if (!input_grad) continue;
      T* to = gx + p.at_x(b, 0, y, 0);
      auto pixels = [&](auto n, int64_t x) {  // to[x] += project^T g[x], P pixels at a time
        constexpr int N = decltype(n)::value;
        for (int64_t e = 0; e < CxP; e += L) {
          V acc[N] = {};
          for (int64_t c = 0; c < C; ++c) {
            V w = load(pp.data() + c * CxP + e);
            for (int q = 0; q < N; ++q) acc[q] += g[(x + q) * C + c] * w;
          }
          for (int q = 0; q < N; ++q)
            for (int64_t l = 0; l < L && e + l < Cx; ++l) to[(x + q) * Cx + e + l] += acc[q][l];
        }
      };
      int64_t x = 0;
      for (; x + P <= W; x += P) pixels(std::integral_constant<int, P>{}, x);
      for (; x < W; ++x) pixels(std::integral_constant<int, 1>{}, x);
    }
    gradients.clear();
  }

  // tap, tap_grad: the taps' rows of output row i (gradients only with gx)
  void locate_taps(int64_t b, int64_t i, T* gx) {
    for (int64_t t = 0; t < p.GK; ++t) {
      tap[t] = source(b, p.tap_row(i, t % p.K));
      tap_grad[t] = gx ? target(b, p.tap_row(i, t % p.K), gx) : nullptr;
    }
  }
  // where tap t of direct pixel j is, from its row's start (for the group's first channel)
  int64_t tap_at(int64_t t, int64_t j) const {
    return (p.tap_col(j, t % p.K) - p.pad_left) * p.C + groups[t];
  }

  // where xbar of pixel (i, j) is: the pixel of x~ under the kernel centre, or its block's mean in `xbar`
  const T* locate_xbar(int64_t b, int64_t i, int64_t j) {
    if (p.pointwise_generator() && direct(j))
      if (const T* row = source(b, i + p.top)) return row + (j + p.left - p.pad_left) * p.C;
    T* mean = xbar.data() + j * p.C;
    T scale = p.block_scale(i, j);
    int64_t r0, r1, q0, q1;
    p.block(i, j, r0, r1, q0, q1);
    for (int64_t e = 0; e < p.C; e += L) {
      V sum{};
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t z = q0; z < q1; ++z)
          if (const T* x = source_pixel(b, y, z)) sum += load(x + e);
      store(mean + e, sum * scale);
    }
    return mean;
  }

  // pre, h and k of pixels j, ..., j + N - 1
  template <int N>
  void generate_pixels(int64_t i, int64_t j) {
    const T* const* x = xbars.data() + j;
    for (int64_t e = 0; e < RP; e += L) {
      V acc[N];
      for (int q = 0; q < N; ++q) acc[q] = load(br.data() + e);
      for (int64_t c = 0; c < p.C; ++c) {
        V w = load(wrt.data() + c * RP + e);
        for (int q = 0; q < N; ++q) acc[q] += x[q][c] * w;
      }
      for (int q = 0; q < N; ++q) store(pre.data() + (j + q) * RP + e, acc[q]);
    }
    for (int q = 0; q < N; ++q) {
      T* pj = pre.data() + (j + q) * RP;
      if (p.term)
        for (int64_t r = 0; r < p.R; ++r) pj[r] += p.term_at(r, i, j + q);
      for (int64_t e = 0; e < RP; e += L) store(h.data() + (j + q) * RP + e, relu<T>(load(pj + e)));
    }
    for (int64_t e = 0; e < GKP; e += L) {
      V acc[N];
      for (int q = 0; q < N; ++q) acc[q] = load(bs.data() + e);
      for (int64_t r = 0; r < p.R; ++r) {
        V w = load(wst.data() + r * GKP + e);
        for (int q = 0; q < N; ++q) acc[q] += h[(j + q) * RP + r] * w;
      }
      for (int q = 0; q < N; ++q) store(k.data() + (j + q) * GKP + e, acc[q]);
    }
  }

  void generate(int64_t b, int64_t i, T* gx) {
    locate_taps(b, i, gx);
    for (int64_t j = 0; j < p.Wo; ++j) xbars[j] = locate_xbar(b, i, j);
    int64_t j = 0;
    for (; j + P <= p.Wo; j += P) generate_pixels<P>(i, j);
    for (; j < p.Wo; ++j) generate_pixels<1>(i, j);
  }

  // the output of N pixels in direct columns from j
  template <int N>
  void aggregate_pixels(int64_t b, int64_t i, int64_t j, T* out) {
    const int64_t step = p.sw * p.C;
    for (int64_t c = 0; c < p.C; c += L) {
      int64_t g = c / p.Cg;
      V acc[N];
      for (int q = 0; q < N; ++q) acc[q] = p.bias ? load(p.bias + c) : V{};
      for (int64_t t = g * p.K; t < (g + 1) * p.K; ++t) {
        if (!tap[t]) continue;
        const T* x = tap[t] + (tap_at(t, j) + c - groups[t]);
        for (int q = 0; q < N; ++q) acc[q] += k[(j + q) * GKP + t] * load(x + q * step);
      }
      for (int q = 0; q < N; ++q) store(out + p.at_out(b, c, i, j + q), acc[q]);
    }
  }

  // the output of a pixel in a border column, through the padding maps
  void aggregate_border(int64_t b, int64_t i, int64_t j, T* out) {
    for (int64_t c = 0; c < p.C; c += L) {
      int64_t g = c / p.Cg;
      V acc = p.bias ? load(p.bias + c) : V{};
      for (int64_t t = g * p.K; t < (g + 1) * p.K; ++t)
        if (const T* x = source_pixel(b, p.tap_row(i, t % p.K), p.tap_col(j, t % p.K)))
          acc += k[j * GKP + t] * load(x + c);
      store(out + p.at_out(b, c, i, j), acc);
    }
  }

  void forward(int64_t b, int64_t i, T* out) {
    generate(b, i, nullptr);
    for (int64_t j = 0; j < p.Wo;) {
      if (j + P <= p.Wo && direct(j) && direct(j + P - 1)) {  // (direct columns are contiguous)
        aggregate_pixels<P>(b, i, j, out);
        j += P;
      } else {
        if (direct(j))
          aggregate_pixels<1>(b, i, j, out);
        else
          aggregate_border(b, i, j, out);
        ++j;
      }
    }
  }

  // The kernels' gradients of n <= L pixels in direct columns from j (dkt's columns j, ...), and the
  // aggregation's share of x~'s gradient. Tap by tap: a tree sums the pixels' products at once, and their
  // shares go to n different places (no pixel waits on the previous one's store).
  void kernel_gradients_tile(int64_t b, int64_t i, int64_t j, int64_t n, const T* grad) {
    const T* g = grad + p.at_out(b, 0, i, j);
    const int64_t C = p.C, step = p.sw * C, vectors = M;
    for (int64_t t = 0; t < p.GK; ++t) {
      V parts[L] = {};
      if (tap[t]) {
        const T* x = tap[t] + tap_at(t, j);
        T* gx = tap_grad[t] + tap_at(t, j);
        const int64_t group = groups[t];
        for (int64_t q = 0; q < n; ++q) {
          const T kt = k[(j + q) * GKP + t];
          for (int64_t m = 0; m < vectors; ++m) {
            int64_t e = q * step + m * L;
            V gv = load(g + q * C + group + m * L);
            parts[q] += gv * load(x + e);
            store(gx + e, load(gx + e) + kt * gv);
          }
        }
      }
      store(dkt.data() + t * WP + j, totals<T>(parts));  // (dkt has room for a whole vector)
    }
  }

  // the same for a pixel in a border column, through the padding maps
  void kernel_gradients_border(int64_t b, int64_t i, int64_t j, const T* grad, T* gx) {
    const T *gj = grad + p.at_out(b, 0, i, j), *kj = k.data() + j * GKP;
    for (int64_t t0 = 0; t0 < p.GK; t0 += L) {
      V parts[L] = {};
      for (int64_t q = 0; q < L && t0 + q < p.GK; ++q) {
        int64_t t = t0 + q, py = p.tap_row(i, t % p.K), px = p.tap_col(j, t % p.K);
        const T* x = source_pixel(b, py, px);
        if (!x) continue;
        T* to = target_pixel(b, py, px, gx) + groups[t];
        x += groups[t];
        for (int64_t m = 0; m < M; ++m) {
          V gv = load(gj + groups[t] + m * L);
          parts[q] += gv * load(x + m * L);
          store(to + m * L, load(to + m * L) + kj[t] * gv);
        }
      }
      V sums = totals<T>(parts);
      for (int64_t q = 0; q < L && t0 + q < p.GK; ++q) dkt[(t0 + q) * WP + j] = sums[q];
    }
  }

  // dpre of pixels j, ..., j + N - 1 (from dk), and the generator's share of x~'s gradient
  template <int N>
  void generator_gradients(int64_t b, int64_t i, int64_t j, T* gx, T* dterm) {
    const int64_t C = p.C, R = p.R, GK = p.GK;
    for (int64_t e = 0; e < RP; e += L) {
      V acc[N] = {};
      for (int64_t t = 0; t < GK; ++t) {
        V w = load(wsp.data() + t * RP + e);
        for (int q = 0; q < N; ++q) acc[q] += dkt[t * WP + j + q] * w;
      }
      for (int q = 0; q < N; ++q) {
        V positive = load(pre.data() + (j + q) * RP + e) > T(0) ? acc[q] : V{};
        store(dpre.data() + (j + q) * RP + e, positive);
      }
    }
    if (dterm)
      for (int q = 0; q < N; ++q)
        for (int64_t r = 0; r < R; ++r) dterm[((b * R + r) * p.Ho + i) * p.Wo + j + q] = dpre[(j + q) * RP + r];
    for (int64_t e = 0; e < C; e += L) {
      V acc[N] = {};
      for (int64_t r = 0; r < R; ++r) {
        V w = load(p.wr + r * C + e);
        for (int q = 0; q < N; ++q) acc[q] += dpre[(j + q) * RP + r] * w;
      }
      for (int q = 0; q < N; ++q) {
        int64_t r0, r1, q0, q1;
        p.block(i, j + q, r0, r1, q0, q1);
        V share = acc[q] * p.block_scale(i, j + q);
        for (int64_t y = r0; y < r1; ++y)
          for (int64_t z = q0; z < q1; ++z)
            if (T* to = target_pixel(b, y, z, gx)) store(to + e, load(to + e) + share);
      }
    }
  }

  void backward(int64_t b, int64_t i, const T* grad, T* gx, T* dterm) {
    generate(b, i, gx);
    const int64_t C = p.C, Wo = p.Wo;
    for (int64_t j = 0; j < Wo;) {
      int64_t n = 0;  // direct columns from j, at most L (they are contiguous)
      while (n < L && j + n < Wo && direct(j + n)) ++n;
      if (n) {
        kernel_gradients_tile(b, i, j, n, grad);
        j += n;
      } else {
        kernel_gradients_border(b, i, j++, grad, gx);
      }
    }
    int64_t j = 0;
    for (; j + P <= Wo; j += P) generator_gradients<P>(b, i, j, gx, dterm);
    for (; j < Wo; ++j) generator_gradients<1>(b, i, j, gx, dterm);
    // the row's weight gradients: sums over its pixels of outer products
    accumulate_outer(Wo, C, [&](int64_t n, int64_t a) { return xbars[n][a]; }, dpre.data(), RP, swrt.data());
    accumulate_outer(Wo, p.GK, [&](int64_t n, int64_t a) { return dkt[a * WP + n]; }, h.data(), RP, sws.data());
    const T* g0 = grad + p.at_out(b, 0, i, 0);
    for (int64_t e = 0; e < C; e += L) {
      V acc = load(sbias.data() + e);
      for (int64_t j = 0; j < Wo; ++j) acc += load(g0 + j * C + e);
      store(sbias.data() + e, acc);
    }
    for (int64_t e = 0; e < RP; e += L) {
      V acc = load(sbr.data() + e);
      for (int64_t j = 0; j < Wo; ++j) acc += load(dpre.data() + j * RP + e);
      store(sbr.data() + e, acc);
    }
    for (int64_t t = 0; t < p.GK; ++t) sbs[t] += total(Wo, dkt.data() + t * WP);
  }

  void flush(Totals& totals) {
    const int64_t C = p.C, R = p.R, GK = p.GK, Cx = p.Cx;
    for (int64_t r = 0; r < R; ++r) {
      totals.br[r] += sbr[r];
      for (int64_t c = 0; c < C; ++c) totals.wr[r * C + c] += swrt[c * RP + r];
      for (int64_t t = 0; t < GK; ++t) totals.ws[r * GK + t] += sws[t * RP + r];
    }
    for (int64_t t = 0; t < GK; ++t) totals.bs[t] += sbs[t];
    for (int64_t c = 0; c < C; ++c) totals.bias[c] += sbias[c];
    for (int64_t c = 0; c < C && p.project; ++c)
      for (int64_t e = 0; e < Cx; ++e) totals.project[c * Cx + e] += spt[e * C + c];
    for (auto* v : {&swrt, &sbr, &sws, &sbs, &sbias, &spt}) std::fill(v->begin(), v->end(), T(0));
  }
};

// ---- NCHW: loops vectorised over a row's pixels ----

template <typename T>
struct LoopNCHW {
  const Problem<T>& p;
  std::vector<T> xbar, pre, k, scratch;  // per row: C x Wo, R x Wo (before the ReLU), GK x Wo
  int64_t first, end;                    // the direct columns [first, end)
  Sums<T> sums;

  explicit LoopNCHW(const Problem<T>& problem) : p(problem), sums(problem) {
    auto found = std::find(p.col_direct.begin(), p.col_direct.end(), 1);
    first = found - p.col_direct.begin();
    end = first + std::count(p.col_direct.begin(), p.col_direct.end(), 1);  // (they are contiguous)
  }
  // the pixels j whose padded column j*sw + column is inside x~: [0, stop)
  int64_t stop(int64_t column) const { return std::min(p.Wo, (p.Wp - column + p.sw - 1) / p.sw); }
  // f(j, offset in x of x~[b, c, row, j*sw + column]) for the border pixels j where that is not a zero
  template <typename F>
  void along_border(int64_t b, int64_t c, int64_t row, int64_t column, F f) const {
    int64_t y = p.rows[row];
    if (y < 0) return;
    const int64_t base = p.at_x(b, c, y, 0), last = stop(column);
    for (int64_t j = 0; j < std::min(first, last); ++j)
      if (int64_t x = p.cols[j * p.sw + column]; x >= 0) f(j, base + x);
    for (int64_t j = end; j < last; ++j)
      if (int64_t x = p.cols[j * p.sw + column]; x >= 0) f(j, base + x);
  }
  // where x~[b, c, row, first*sw + column] is in x, for the direct pixels j >= first (at (j - first)*sw
  // further); -1 for a zero row or no direct pixel
  int64_t direct_row(int64_t b, int64_t c, int64_t row, int64_t column) const {
    if (p.rows[row] < 0 || first == end) return -1;
    return p.at_x(b, c, p.rows[row], first * p.sw + column - p.pad_left);
  }
  void generate(int64_t b, int64_t i) {
    const int64_t Wo = p.Wo;
    xbar.assign(p.C * Wo, T(0)), pre.resize(p.R * Wo), k.resize(p.GK * Wo);
    int64_t r0, r1, q0, q1;
    p.block(i, 0, r0, r1, q0, q1);
    for (int64_t c = 0; c < p.C; ++c) {
      T* mean = xbar.data() + c * Wo;
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t column = p.left; column < p.left + p.sw; ++column) {  // pixel j's: j*sw + column
          along_border(b, c, y, column, [&](int64_t j, int64_t at) { mean[j] += p.x[at]; });
          if (int64_t at = direct_row(b, c, y, column); at >= 0)
            for (int64_t j = first; j < std::min(end, stop(column)); ++j) mean[j] += p.x[at + (j - first) * p.sw];
        }
      for (int64_t j = 0; j < Wo; ++j) mean[j] *= p.block_scale(i, j);
    }
    for (int64_t r = 0; r < p.R; ++r) {
      T* h = pre.data() + r * Wo;
      for (int64_t j = 0; j < Wo; ++j) h[j] = p.br[r] + p.term_at(r, i, j);
      for (int64_t c = 0; c < p.C; ++c) axpy(Wo, p.wr[r * p.C + c], xbar.data() + c * Wo, h);
    }
    for (int64_t t = 0; t < p.GK; ++t) {
      T* kt = k.data() + t * Wo;
      std::fill(kt, kt + Wo, p.bs[t]);
      for (int64_t r = 0; r < p.R; ++r) {
        const T* h = pre.data() + r * Wo;
        T w = p.ws[t * p.R + r];
#pragma omp simd
        for (int64_t j = 0; j < Wo; ++j) kt[j] += w * (h[j] > 0 ? h[j] : T(0));
      }
    }
  }
  void forward(int64_t b, int64_t i, T* out) {
    generate(b, i);
    const int64_t sw = p.sw;
    for (int64_t c = 0; c < p.C; ++c) {
      T* __restrict o = out + p.at_out(b, c, i, 0);
      std::fill(o, o + p.Wo, p.bias ? p.bias[c] : T(0));
      const int64_t g = c / p.Cg;
      for (int64_t t = 0; t < p.K; ++t) {
        const T* __restrict kt = k.data() + (g * p.K + t) * p.Wo;
        int64_t row = p.tap_row(i, t), column = p.tap_col(0, t);
        along_border(b, c, row, column, [&](int64_t j, int64_t at) { o[j] += kt[j] * p.x[at]; });
        int64_t at = direct_row(b, c, row, column);
        if (at < 0) continue;
        const T* __restrict x = p.x + at;
        if (sw == 1) {
#pragma omp simd
          for (int64_t j = first; j < end; ++j) o[j] += kt[j] * x[j - first];
        } else {
          for (int64_t j = first; j < end; ++j) o[j] += kt[j] * x[(j - first) * sw];
        }
      }
    }
  }
  void backward(int64_t b, int64_t i, const T* grad, T* gx, T* dterm) {
    generate(b, i);
    const int64_t Wo = p.Wo, sw = p.sw, R = p.R;
    scratch.assign((p.GK + R + 1) * Wo, T(0));
    T *dk = scratch.data(), *dpre = dk + p.GK * Wo, *dxb = dpre + R * Wo;
    for (int64_t c = 0; c < p.C; ++c) {
      const T* __restrict gc = grad + p.at_out(b, c, i, 0);
      sums.bias[c] += total(Wo, gc);
      const int64_t g = c / p.Cg;
      for (int64_t t = 0; t < p.K; ++t) {
        const T* __restrict kt = k.data() + (g * p.K + t) * Wo;
        T* __restrict dkt = dk + (g * p.K + t) * Wo;
        int64_t row = p.tap_row(i, t), column = p.tap_col(0, t);
        along_border(b, c, row, column, [&](int64_t j, int64_t at) {
          dkt[j] += gc[j] * p.x[at];
          gx[at] += kt[j] * gc[j];
        });
        int64_t at = direct_row(b, c, row, column);
        if (at < 0) continue;
        const T* __restrict x = p.x + at;
        T* __restrict gxr = gx + at;
        if (sw == 1) {
#pragma omp simd
          for (int64_t j = first; j < end; ++j) {
            dkt[j] += gc[j] * x[j - first];
            gxr[j - first] += kt[j] * gc[j];
          }
        } else {
          for (int64_t j = first; j < end; ++j) {
            dkt[j] += gc[j] * x[(j - first) * sw];
            gxr[(j - first) * sw] += kt[j] * gc[j];
          }
        }
      }
    }
    for (int64_t t = 0; t < p.GK; ++t) sums.bs[t] += total(Wo, dk + t * Wo);
    for (int64_t r = 0; r < R; ++r) {
      const T* h = pre.data() + r * Wo;
      T* d = dpre + r * Wo;
      for (int64_t t = 0; t < p.GK; ++t) {
        const T* dkt = dk + t * Wo;
        T w = p.ws[t * R + r], sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t j = 0; j < Wo; ++j) {
          sum += dkt[j] * (h[j] > 0 ? h[j] : T(0));
          d[j] += w * dkt[j];
        }
        sums.ws[r * p.GK + t] += sum;
      }
#pragma omp simd
      for (int64_t j = 0; j < Wo; ++j) d[j] = h[j] > 0 ? d[j] : T(0);
      sums.br[r] += total(Wo, d);
      if (dterm) std::copy(d, d + Wo, dterm + ((b * R + r) * p.Ho + i) * Wo);
    }
    int64_t r0, r1, q0, q1;
    p.block(i, 0, r0, r1, q0, q1);
    for (int64_t c = 0; c < p.C; ++c) {
      std::fill(dxb, dxb + Wo, T(0));
      for (int64_t r = 0; r < R; ++r) {
        sums.wr[r * p.C + c] += dot(Wo, dpre + r * Wo, xbar.data() + c * Wo);
        axpy(Wo, p.wr[r * p.C + c], dpre + r * Wo, dxb);
      }
      for (int64_t j = 0; j < Wo; ++j) dxb[j] *= p.block_scale(i, j);
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t column = p.left; column < p.left + p.sw; ++column) {
          along_border(b, c, y, column, [&](int64_t j, int64_t at) { gx[at] += dxb[j]; });
          if (int64_t at = direct_row(b, c, y, column); at >= 0)
            for (int64_t j = first; j < std::min(end, stop(column)); ++j) gx[at + (j - first) * p.sw] += dxb[j];
        }
    }
  }
  void end_task(int64_t, T*, bool) {}  // (no projection here)
  void flush(Totals& totals) { sums.flush(totals); }
};

// ---- the operators ----

template <typename T, typename Rows>
void forward_rows(const Problem<T>& p, T* out) {
  at::parallel_for(0, p.B * p.Ho, 1, [&](int64_t begin, int64_t end) {
    Rows rows(p);
    for (int64_t task = begin; task < end; ++task) rows.forward(task / p.Ho, task % p.Ho, out);
  });
}

template <typename T, typename Rows>
void backward_rows(const Problem<T>& p, const T* grad, T* gx, T* dterm, bool input_grad, Totals& totals) {
  // Zero padding: blocks of `height` output rows. Block n scatters into padded rows [n*height*sh,
  // ((n+1)*height - 1)*sh + reach), which end before block n+2's first, (n+2)*height*sh; input rows are
  // those less the padding, or none. Other modes: one task per image, all its rows.
  const bool blocked = p.mode == ZEROS;
  const int64_t height = block_height(p);
  const int64_t blocks = (p.Ho + height - 1) / height, pairs = blocked ? (blocks + 1) / 2 : 1;
  std::mutex lock;
  for (int64_t parity = 0; parity < (blocked ? 2 : 1); ++parity) {
    at::parallel_for(0, p.B * pairs, 1, [&](int64_t begin, int64_t end) {
      Rows rows(p);
      Totals mine(p);
      for (int64_t task = begin; task < end; ++task) {
        int64_t b = task / pairs, n = 2 * (task % pairs) + parity;
        for (int64_t i = n * height; i < std::min((n + 1) * height, p.Ho); ++i) rows.backward(b, i, grad, gx, dterm);
        rows.end_task(b, gx, input_grad);
        rows.flush(mine);
      }
      std::lock_guard<std::mutex> guard(lock);
      totals.add(mine);
    });
  }
}

template <typename T, typename Run>
void with_rows(const Problem<T>& p, Run run) {
  if (!p.channels_last)
    run(static_cast<LoopNCHW<T>*>(nullptr));
  else if (p.Cg % L == 0)
    run(static_cast<VecNHWC<T>*>(nullptr));
  else
    run(static_cast<LoopNHWC<T>*>(nullptr));
}

at::MemoryFormat layout(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Whether the vector kernel takes the projection inside (the others get x projected by ATen first).
bool fuses_projection(const Tensor& project, int64_t groups, bool channels_last) {
  return channels_last && project.size(0) % (groups * L) == 0;
}

Tensor projected(const Tensor& x, const Tensor& project, bool channels_last) {
  return at::conv2d(x, project.view({project.size(0), project.size(1), 1, 1})).contiguous(layout(channels_last));
}

Tensor forward(const Tensor& x, const c10::optional<Tensor>& project, const Tensor& wr, const Tensor& br,
               const c10::optional<Tensor>& term, const Tensor& ws, const Tensor& bs,
               const c10::optional<Tensor>& bias, at::IntArrayRef geometry, bool channels_last) {
  TORCH_CHECK(geometry.size() == 12, "geometry: expected 12 values");
  if (project.has_value() && !fuses_projection(*project, geometry[6], channels_last))
    return forward(projected(x, *project, channels_last), c10::nullopt, wr, br, term, ws, bs, bias, geometry,
                   channels_last);
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "posconv_involution_forward", [&] {
    using T = scalar_t;
    auto p = problem<T>(x, project, wr, br, term, ws, bs, bias, geometry, channels_last);
    out = at::empty({p.B, p.C, p.Ho, p.Wo}, x.options().memory_format(layout(channels_last)));
    with_rows(p, [&](auto* kind) { forward_rows<T, std::remove_pointer_t<decltype(kind)>>(p, out.data_ptr<T>()); });
  });
  return out;
}

using Gradients = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The gradients of x, project, wr, br, term (per image), ws, bs and bias; x's only with input_grad, and
// empty tensors for absent ones.
Gradients backward(const Tensor& grad, const Tensor& x, const c10::optional<Tensor>& project, const Tensor& wr,
                   const Tensor& br, const c10::optional<Tensor>& term, const Tensor& ws, const Tensor& bs,
                   bool has_bias, at::IntArrayRef geometry, bool channels_last, bool input_grad) {
  TORCH_CHECK(geometry.size() == 12, "geometry: expected 12 values");
  if (project.has_value() && !fuses_projection(*project, geometry[6], channels_last)) {
    Tensor xp = projected(x, *project, channels_last);
    auto [gxp, none, gwr, gbr, gterm, gws, gbs, gbias] =
        backward(grad, xp, c10::nullopt, wr, br, term, ws, bs, has_bias, geometry, channels_last, true);
    Tensor weight = project->view({project->size(0), project->size(1), 1, 1});
    auto [gx, gproject, unused] = at::convolution_backward(gxp, x, weight, c10::nullopt, {1, 1}, {0, 0}, {1, 1},
                                                           false, {0, 0}, 1, {input_grad, true, false});
    return {input_grad ? gx.contiguous(layout(channels_last)) : at::empty({0}, x.options()),
            gproject.view_as(*project), gwr, gbr, gterm, gws, gbs, gbias};
  }
  Gradients gradients;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "posconv_involution_backward", [&] {
    using T = scalar_t;
    auto p = problem<T>(x, project, wr, br, term, ws, bs, c10::nullopt, geometry, channels_last);
    TORCH_CHECK(grad.sizes() == at::IntArrayRef({p.B, p.C, p.Ho, p.Wo}) &&
                    grad.is_contiguous(layout(channels_last)) && grad.scalar_type() == x.scalar_type(),
                "grad: expected the output's shape, layout and dtype");
    auto options = x.options();
    Tensor gx = at::empty(x.sizes(), options.memory_format(layout(channels_last))).zero_();  // (at::zeros: NCHW)
    Tensor gterm = at::empty(term.has_value() ? at::IntArrayRef({p.B, p.R, p.Ho, p.Wo}) : at::IntArrayRef({0}), options);
    T* dterm = term.has_value() ? gterm.data_ptr<T>() : nullptr;
    Totals totals(p);
    with_rows(p, [&](auto* kind) {
      backward_rows<T, std::remove_pointer_t<decltype(kind)>>(p, grad.data_ptr<T>(), gx.data_ptr<T>(), dterm,
                                                              input_grad, totals);
    });
    auto from = [&](const std::vector<double>& values, at::IntArrayRef sizes) {
      Tensor t = at::empty(sizes, options);
      std::copy(values.begin(), values.end(), t.data_ptr<T>());
      return t;
    };
    Tensor gws = from(totals.ws, {p.R, p.GK}).t().contiguous();  // (summed transposed)
    gradients = {input_grad || !project.has_value() ? gx : at::empty({0}, options),
                 project.has_value() ? from(totals.project, {p.C, p.Cx}) : at::empty({0}, options),
                 from(totals.wr, {p.R, p.C}),
                 from(totals.br, {p.R}),
                 gterm,
                 gws,
                 from(totals.bs, {p.GK}),
                 has_bias ? from(totals.bias, {p.C}) : at::empty({0}, options)};
  });
  return gradients;
}

}  // namespace

TORCH_LIBRARY(posconv_involution, m) {
  m.def(
      "forward(Tensor x, Tensor? project, Tensor wr, Tensor br, Tensor? term, Tensor ws, Tensor bs, "
      "Tensor? bias, int[] geometry, bool channels_last) -> Tensor");
  m.def(
      "backward(Tensor grad, Tensor x, Tensor? project, Tensor wr, Tensor br, Tensor? term, Tensor ws, "
      "Tensor bs, bool has_bias, int[] geometry, bool channels_last, bool input_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(posconv_involution, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
