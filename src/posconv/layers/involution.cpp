// Involution with its kernel generator, fused, on CPU: posconv.layers.involution builds this file at first
// use and registers the operators' autograd and shapes (its docstring says why and what it costs).
//
//   forward:  out[b, c, i, j] = bias[c] + sum over taps t = (u, v) of
//                                 k[b, g(c)*K + t, i, j] * xp[b, c, i*sh + u*dh, j*sw + v*dw]
//             k = ws @ relu(wr @ xbar + br + term) + bs per output pixel, never stored
//   backward: the gradients of xp, wr, br, term (per image), ws, bs and bias; the kernels are recomputed.
//
// xbar(i, j) is the mean of the sh x sw block of xp whose top-left pixel is the kernel centre
// (i*sh + dh*(kh-1)/2, j*sw + dw*(kw-1)/2), clipped at xp's end. Tensors are contiguous in one layout.
// Three row kernels, chosen per call: channels_last with groups of a multiple of 16 channels (the model's
// case; explicit 16-lane vectors of channels), any other channels_last (loops over channels), and NCHW
// (loops vectorised over a row's pixels). The forward runs output rows in parallel; the backward runs them
// in blocks, even blocks then odd ones, so that no two threads scatter into the same rows of xp's gradient.
// Weight gradients are summed in T per block of rows, then in double.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

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

// Sizes, strides and weights of one call.
template <typename T>
struct Problem {
  int64_t B, C, Hp, Wp, Ho, Wo, kh, kw, sh, sw, dh, dw, G, R, K, GK, Cg, top, left;
  bool channels_last;
  const T *xp, *wr, *br, *term, *ws, *bs, *bias;

  // element offsets of pixel (b, y, x) channel c in xp (padded) and in out/grad (output-sized)
  int64_t at_xp(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((b * Hp + y) * Wp + x) * C + c : ((b * C + c) * Hp + y) * Wp + x;
  }
  int64_t at_out(int64_t b, int64_t c, int64_t y, int64_t x) const {
    return channels_last ? ((b * Ho + y) * Wo + x) * C + c : ((b * C + c) * Ho + y) * Wo + x;
  }
  int64_t tap_row(int64_t i, int64_t t) const { return i * sh + (t / kw) * dh; }
  int64_t tap_col(int64_t j, int64_t t) const { return j * sw + (t % kw) * dw; }
  bool pointwise_generator() const { return sh == 1 && sw == 1; }  // xbar is one pixel of xp
  // the generator's block for output (i, j): rows [r0, r1), columns [q0, q1) of xp
  void block(int64_t i, int64_t j, int64_t& r0, int64_t& r1, int64_t& q0, int64_t& q1) const {
    r0 = i * sh + top, q0 = j * sw + left;
    r1 = std::min(r0 + sh, Hp), q1 = std::min(q0 + sw, Wp);
  }
  // rows of xp that output row i touches (taps and generator block): [i*sh, i*sh + reach)
  int64_t reach() const { return std::max((kh - 1) * dh + 1, top + sh); }
  T term_at(int64_t r, int64_t i, int64_t j) const { return term ? term[(r * Ho + i) * Wo + j] : T(0); }
};

template <typename T>
Problem<T> problem(const Tensor& xp, const Tensor& wr, const Tensor& br, const c10::optional<Tensor>& term,
                   const Tensor& ws, const Tensor& bs, const c10::optional<Tensor>& bias,
                   at::IntArrayRef geometry, bool channels_last) {
  TORCH_CHECK(geometry.size() == 7, "geometry: expected [kh, kw, sh, sw, dh, dw, G]");
  Problem<T> p;
  p.kh = geometry[0], p.kw = geometry[1], p.sh = geometry[2], p.sw = geometry[3];
  p.dh = geometry[4], p.dw = geometry[5], p.G = geometry[6];
  TORCH_CHECK(xp.dim() == 4, "xp: expected a 4-d tensor");
  p.B = xp.size(0), p.C = xp.size(1), p.Hp = xp.size(2), p.Wp = xp.size(3);
  TORCH_CHECK(std::min({p.kh, p.kw, p.sh, p.sw, p.dh, p.dw, p.G}) >= 1, "geometry: expected positive values");
  p.Ho = (p.Hp - p.dh * (p.kh - 1) - 1) / p.sh + 1, p.Wo = (p.Wp - p.dw * (p.kw - 1) - 1) / p.sw + 1;
  p.R = wr.size(0), p.K = p.kh * p.kw, p.GK = p.G * p.K, p.Cg = p.C / p.G;
  p.top = p.dh * (p.kh - 1) / 2, p.left = p.dw * (p.kw - 1) / 2;
  p.channels_last = channels_last;
  auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(xp.is_contiguous(format), "xp: expected a tensor contiguous in the given layout");
  TORCH_CHECK(p.Hp >= p.dh * (p.kh - 1) + 1 && p.Wp >= p.dw * (p.kw - 1) + 1 && p.C % p.G == 0,
              "xp: smaller than the dilated kernel, or channels not divisible by the groups");
  TORCH_CHECK(wr.dim() == 2 && wr.size(1) == p.C && br.numel() == p.R, "wr, br: expected (R, C) and (R)");
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == p.GK && ws.size(1) == p.R && bs.numel() == p.GK,
              "ws, bs: expected (G*kh*kw, R) and (G*kh*kw)");
  for (const Tensor* t : {&wr, &br, &ws, &bs})
    TORCH_CHECK(t->scalar_type() == xp.scalar_type() && t->is_contiguous(), "weights: expected xp's dtype");
  p.xp = xp.data_ptr<T>(), p.wr = wr.data_ptr<T>(), p.br = br.data_ptr<T>();
  p.ws = ws.data_ptr<T>(), p.bs = bs.data_ptr<T>();
  p.term = nullptr, p.bias = nullptr;
  if (term.has_value()) {
    TORCH_CHECK(term->sizes() == at::IntArrayRef({p.R, p.Ho, p.Wo}) && term->is_contiguous() &&
                    term->scalar_type() == xp.scalar_type(),
                "term: expected a contiguous (R, H_out, W_out) in xp's dtype");
    p.term = term->data_ptr<T>();
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == p.C && bias->is_contiguous() && bias->scalar_type() == xp.scalar_type(),
                "bias: expected (C) in xp's dtype");
    p.bias = bias->data_ptr<T>();
  }
  return p;
}

// The weight gradients in double, canonical layouts: wr (R x C), br, ws transposed (R x GK), bs, bias.
struct Totals {
  std::vector<double> wr, br, ws, bs, bias;
  template <typename T>
  explicit Totals(const Problem<T>& p) : wr(p.R * p.C), br(p.R), ws(p.R * p.GK), bs(p.GK), bias(p.C) {}
  void add(const Totals& other) {
    for (auto [sum, part] : {std::pair{&wr, &other.wr}, {&br, &other.br}, {&ws, &other.ws},
                             {&bs, &other.bs}, {&bias, &other.bias}})
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
  std::vector<T> xbar, pre, k, scratch;  // per row: Wo x C (strided only), Wo x R (before the ReLU), Wo x GK
  std::vector<T> wrt, wst;               // wr transposed (C x R), ws transposed (R x GK)
  Sums<T> sums;

  explicit LoopNHWC(const Problem<T>& problem) : p(problem), sums(problem) {
    wrt.resize(p.C * p.R), wst.resize(p.R * p.GK);
    for (int64_t r = 0; r < p.R; ++r) {
      for (int64_t c = 0; c < p.C; ++c) wrt[c * p.R + r] = p.wr[r * p.C + c];
      for (int64_t t = 0; t < p.GK; ++t) wst[r * p.GK + t] = p.ws[t * p.R + r];
    }
  }
  const T* xb(int64_t b, int64_t i, int64_t j) const {
    return p.pointwise_generator() ? p.xp + p.at_xp(b, 0, i + p.top, j + p.left) : xbar.data() + j * p.C;
  }
  void generate(int64_t b, int64_t i) {
    xbar.assign(p.pointwise_generator() ? 0 : p.Wo * p.C, T(0)), pre.resize(p.Wo * p.R);
    k.resize(p.Wo * p.GK);
    for (int64_t j = 0; j < p.Wo; ++j) {
      if (!p.pointwise_generator()) {
        int64_t r0, r1, q0, q1;
        p.block(i, j, r0, r1, q0, q1);
        T scale = T(1) / T((r1 - r0) * (q1 - q0));
        for (int64_t y = r0; y < r1; ++y)
          for (int64_t x = q0; x < q1; ++x) axpy(p.C, scale, p.xp + p.at_xp(b, 0, y, x), xbar.data() + j * p.C);
      }
      const T* x = xb(b, i, j);
      T* h = pre.data() + j * p.R;
      for (int64_t r = 0; r < p.R; ++r) h[r] = p.br[r] + p.term_at(r, i, j);
      for (int64_t c = 0; c < p.C; ++c) axpy(p.R, x[c], wrt.data() + c * p.R, h);
      T* kj = k.data() + j * p.GK;
      std::copy(p.bs, p.bs + p.GK, kj);
      for (int64_t r = 0; r < p.R; ++r)
        if (h[r] > 0) axpy(p.GK, h[r], wst.data() + r * p.GK, kj);
    }
  }
  void forward(int64_t b, int64_t i, T* out) {
    generate(b, i);
    for (int64_t j = 0; j < p.Wo; ++j) {
      T* o = out + p.at_out(b, 0, i, j);
      for (int64_t c = 0; c < p.C; ++c) o[c] = p.bias ? p.bias[c] : T(0);
      for (int64_t t = 0; t < p.GK; ++t) {
        int64_t g = t / p.K, tap = t % p.K;
        axpy(p.Cg, k[j * p.GK + t], p.xp + p.at_xp(b, g * p.Cg, p.tap_row(i, tap), p.tap_col(j, tap)),
             o + g * p.Cg);
      }
    }
  }
  void backward(int64_t b, int64_t i, const T* grad, T* gxp, T* dterm) {
    generate(b, i);
    const int64_t C = p.C, R = p.R, GK = p.GK, Cg = p.Cg;
    scratch.resize(GK + R + C);
    T *dk = scratch.data(), *dpre = dk + GK, *dxb = dpre + R;
    for (int64_t j = 0; j < p.Wo; ++j) {
      const T* gj = grad + p.at_out(b, 0, i, j);
      for (int64_t t = 0; t < GK; ++t) {
        int64_t g = t / p.K, tap = t % p.K, at = p.at_xp(b, g * Cg, p.tap_row(i, tap), p.tap_col(j, tap));
        dk[t] = dot(Cg, gj + g * Cg, p.xp + at);
        axpy(Cg, k[j * GK + t], gj + g * Cg, gxp + at);
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
      const T* x = xb(b, i, j);
      std::fill(dxb, dxb + C, T(0));
      for (int64_t r = 0; r < R; ++r) {
        axpy(C, dpre[r], x, sums.wr.data() + r * C);
        axpy(C, dpre[r], p.wr + r * C, dxb);
      }
      int64_t r0, r1, q0, q1;
      p.block(i, j, r0, r1, q0, q1);
      T scale = T(1) / T((r1 - r0) * (q1 - q0));
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t x = q0; x < q1; ++x) axpy(C, scale, dxb, gxp + p.at_xp(b, 0, y, x));
    }
  }
  void flush(Totals& totals) { sums.flush(totals); }
};

// ---- channels_last, groups of 16*m channels: explicit vectors of 16 channels ----

constexpr int64_t L = 16;  // lanes of a vector: one group of 16 channels
constexpr int P = 4;       // pixels per pass, for independent chains of multiply-adds
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

// (not memcpy: a vector type aliases only its element type, so other loads need not be repeated after a store)
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

// out[a*width + e] += sum over n of left[n*step + a] * right[n*width + e], for a < rows, e < width (lanes)
template <typename T>
void accumulate_outer(int64_t count, int64_t rows, const T* left, int64_t step, const T* right, int64_t width,
                      T* out) {
  constexpr int64_t A = 8;  // rows per pass: A accumulators per vector of `right`
  for (int64_t e = 0; e < width; e += L) {
    int64_t a = 0;
    for (; a + A <= rows; a += A) {
      Vec<T> acc[A];
      for (int64_t q = 0; q < A; ++q) acc[q] = load(out + (a + q) * width + e);
      for (int64_t n = 0; n < count; ++n) {
        Vec<T> r = load(right + n * width + e);
        for (int64_t q = 0; q < A; ++q) acc[q] += left[n * step + a + q] * r;
      }
      for (int64_t q = 0; q < A; ++q) store(out + (a + q) * width + e, acc[q]);
    }
    for (; a < rows; ++a) {
      Vec<T> acc = load(out + a * width + e);
      for (int64_t n = 0; n < count; ++n) acc += left[n * step + a] * load(right + n * width + e);
      store(out + a * width + e, acc);
    }
  }
}

template <typename T>
struct VecNHWC {
  using V = Vec<T>;
  const Problem<T>& p;
  const int64_t RP, GKP, M;  // R and GK padded to whole vectors; vectors per group
  // weights, zero-padded: wr transposed (C x RP), br (RP), ws transposed (R x GKP), bs (GKP), ws (GK x RP)
  std::vector<T> wrt, br, wst, bs, wsp;
  std::vector<int64_t> taps, groups;  // kernel t of the GK: its tap's offset in xp + its group's first
                                      // channel; that channel
  // per row: xbar (Wo x C, strided only), pre-ReLU and ReLU (Wo x RP), kernels and their gradients
  // (Wo x GKP), the pre-ReLU gradient (Wo x RP)
  std::vector<T> xbar, pre, h, k, dk, dpre;
  // gradient sums of the rows so far: wr transposed (C x RP), br (RP), ws transposed (R x GKP), bs, bias
  std::vector<T> swrt, sbr, swst, sbs, sbias;

  explicit VecNHWC(const Problem<T>& problem)
      : p(problem), RP(lanes_for(problem.R)), GKP(lanes_for(problem.GK)), M(problem.Cg / L) {
    const int64_t C = p.C, R = p.R, GK = p.GK;
    wrt.assign(C * RP, T(0)), br.assign(RP, T(0)), wst.assign(R * GKP, T(0)), bs.assign(GKP, T(0));
    wsp.assign(GK * RP, T(0));
    for (int64_t r = 0; r < R; ++r) {
      br[r] = p.br[r];
      for (int64_t c = 0; c < C; ++c) wrt[c * RP + r] = p.wr[r * C + c];
      for (int64_t t = 0; t < GK; ++t) wst[r * GKP + t] = wsp[t * RP + r] = p.ws[t * R + r];
    }
    std::copy(p.bs, p.bs + GK, bs.begin());
    for (int64_t t = 0; t < GK; ++t) {
      groups.push_back((t / p.K) * p.Cg);
      taps.push_back(p.at_xp(0, groups.back(), p.tap_row(0, t % p.K), p.tap_col(0, t % p.K)));
    }
    pre.resize(p.Wo * RP), h.resize(p.Wo * RP), k.resize(p.Wo * GKP), dpre.resize(p.Wo * RP);
    dk.assign(p.Wo * GKP, T(0));  // lanes past GK stay zero
    xbar.resize(p.pointwise_generator() ? 0 : p.Wo * C);
    swrt.assign(C * RP, T(0)), sbr.assign(RP, T(0)), swst.assign(R * GKP, T(0)), sbs.assign(GKP, T(0));
    sbias.assign(C, T(0));
  }

  const T* window(int64_t b, int64_t i, int64_t j) const { return p.xp + p.at_xp(b, 0, i * p.sh, j * p.sw); }
  const T* xb(int64_t b, int64_t i, int64_t j) const {
    return p.pointwise_generator() ? p.xp + p.at_xp(b, 0, i + p.top, j + p.left) : xbar.data() + j * p.C;
  }

  void mean_block(int64_t b, int64_t i, int64_t j) {
    int64_t r0, r1, q0, q1;
    p.block(i, j, r0, r1, q0, q1);
    T scale = T(1) / T((r1 - r0) * (q1 - q0));
    for (int64_t e = 0; e < p.C; e += L) {
      V sum{};
      for (int64_t y = r0; y < r1; ++y)
        for (int64_t x = q0; x < q1; ++x) sum += load(p.xp + p.at_xp(b, e, y, x));
      store(xbar.data() + j * p.C + e, sum * scale);
    }
  }

  // pre, h and k of pixels j, ..., j + N - 1
  template <int N>
  void generate_pixels(int64_t b, int64_t i, int64_t j) {
    const T* x[N];
    for (int q = 0; q < N; ++q) x[q] = xb(b, i, j + q);
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

  void generate(int64_t b, int64_t i) {
    if (!p.pointwise_generator())
      for (int64_t j = 0; j < p.Wo; ++j) mean_block(b, i, j);
    int64_t j = 0;
    for (; j + P <= p.Wo; j += P) generate_pixels<P>(b, i, j);
    for (; j < p.Wo; ++j) generate_pixels<1>(b, i, j);
  }

  template <int N>
  void aggregate_pixels(int64_t b, int64_t i, int64_t j, T* out) {
    const T* w[N];
    for (int q = 0; q < N; ++q) w[q] = window(b, i, j + q);
    for (int64_t c = 0; c < p.C; c += L) {
      int64_t g = c / p.Cg;
      V acc[N];
      for (int q = 0; q < N; ++q) acc[q] = p.bias ? load(p.bias + c) : V{};
      for (int64_t t = g * p.K; t < (g + 1) * p.K; ++t) {
        int64_t at = taps[t] + c - g * p.Cg;
        for (int q = 0; q < N; ++q) acc[q] += k[(j + q) * GKP + t] * load(w[q] + at);
      }
      for (int q = 0; q < N; ++q) store(out + p.at_out(b, c, i, j + q), acc[q]);
    }
  }

  void forward(int64_t b, int64_t i, T* out) {
    generate(b, i);
    int64_t j = 0;
    for (; j + P <= p.Wo; j += P) aggregate_pixels<P>(b, i, j, out);
    for (; j < p.Wo; ++j) aggregate_pixels<1>(b, i, j, out);
  }

  // dk of pixel j (its kernels' gradients), and the aggregation's share of xp's gradient
  void kernel_gradients(int64_t b, int64_t i, int64_t j, const T* grad, T* gxp) {
    const T* x = window(b, i, j);
    T* gx = gxp + (x - p.xp);
    const T *gj = grad + p.at_out(b, 0, i, j), *kj = k.data() + j * GKP;
    const int64_t GK = p.GK, vectors = M;
    const int64_t *tap = taps.data(), *group = groups.data();
    for (int64_t t0 = 0; t0 < GK; t0 += L) {
      V parts[L];
      for (int64_t q = 0; q < L; ++q) {
        int64_t t = t0 + q;
        parts[q] = V{};
        if (t >= GK) continue;
        for (int64_t m = 0; m < vectors; ++m) {
          int64_t at = tap[t] + m * L;
          V gv = load(gj + group[t] + m * L);
          parts[q] += gv * load(x + at);
          store(gx + at, load(gx + at) + kj[t] * gv);
        }
      }
      store(dk.data() + j * GKP + t0, totals<T>(parts));
    }
  }

  // dpre of pixels j, ..., j + N - 1 (from dk), and the generator's share of xp's gradient
  template <int N>
  void generator_gradients(int64_t b, int64_t i, int64_t j, T* gxp, T* dterm) {
    const int64_t C = p.C, R = p.R, GK = p.GK;
    for (int64_t e = 0; e < RP; e += L) {
      V acc[N] = {};
      for (int64_t t = 0; t < GK; ++t) {
        V w = load(wsp.data() + t * RP + e);
        for (int q = 0; q < N; ++q) acc[q] += dk[(j + q) * GKP + t] * w;
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
        V share = acc[q] * (T(1) / T((r1 - r0) * (q1 - q0)));
        for (int64_t y = r0; y < r1; ++y)
          for (int64_t x = q0; x < q1; ++x) {
            T* to = gxp + p.at_xp(b, e, y, x);
            store(to, load(to) + share);
          }
      }
    }
  }

  void backward(int64_t b, int64_t i, const T* grad, T* gxp, T* dterm) {
    generate(b, i);
    const int64_t C = p.C, R = p.R, Wo = p.Wo;
    for (int64_t j = 0; j < Wo; ++j) kernel_gradients(b, i, j, grad, gxp);
    int64_t j = 0;
    for (; j + P <= Wo; j += P) generator_gradients<P>(b, i, j, gxp, dterm);
    for (; j < Wo; ++j) generator_gradients<1>(b, i, j, gxp, dterm);
    // the row's weight gradients: sums over its pixels of outer products
    accumulate_outer(Wo, C, xb(b, i, 0), C, dpre.data(), RP, swrt.data());  // xbar: C apart (sw = 1)
    accumulate_outer(Wo, R, h.data(), RP, dk.data(), GKP, swst.data());
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
    for (int64_t e = 0; e < GKP; e += L) {
      V acc = load(sbs.data() + e);
      for (int64_t j = 0; j < Wo; ++j) acc += load(dk.data() + j * GKP + e);
      store(sbs.data() + e, acc);
    }
  }

  void flush(Totals& totals) {
    const int64_t C = p.C, R = p.R, GK = p.GK;
    for (int64_t r = 0; r < R; ++r) {
      totals.br[r] += sbr[r];
      for (int64_t c = 0; c < C; ++c) totals.wr[r * C + c] += swrt[c * RP + r];
      for (int64_t t = 0; t < GK; ++t) totals.ws[r * GK + t] += swst[r * GKP + t];
    }
    for (int64_t t = 0; t < GK; ++t) totals.bs[t] += sbs[t];
    for (int64_t c = 0; c < C; ++c) totals.bias[c] += sbias[c];
    for (auto* v : {&swrt, &sbr, &swst, &sbs, &sbias}) std::fill(v->begin(), v->end(), T(0));
  }
};

// ---- NCHW: loops vectorised over a row's pixels ----

template <typename T>
struct LoopNCHW {
  const Problem<T>& p;
  std::vector<T> xbar, pre, k, scratch;  // per row: C x Wo (strided only), R x Wo (before the ReLU), GK x Wo
  Sums<T> sums;

  explicit LoopNCHW(const Problem<T>& problem) : p(problem), sums(problem) {}
  const T* xb(int64_t b, int64_t i, int64_t c) const {
    return p.pointwise_generator() ? p.xp + p.at_xp(b, c, i + p.top, p.left) : xbar.data() + c * p.Wo;
  }
  void generate(int64_t b, int64_t i) {
    const int64_t Wo = p.Wo;
    xbar.resize(p.pointwise_generator() ? 0 : p.C * Wo), pre.resize(p.R * Wo), k.resize(p.GK * Wo);
    if (!p.pointwise_generator()) {
      for (int64_t j = 0; j < Wo; ++j) {
        int64_t r0, r1, q0, q1;
        p.block(i, j, r0, r1, q0, q1);
        T scale = T(1) / T((r1 - r0) * (q1 - q0));
        for (int64_t c = 0; c < p.C; ++c) {
          T sum = 0;
          for (int64_t y = r0; y < r1; ++y)
            for (int64_t x = q0; x < q1; ++x) sum += p.xp[p.at_xp(b, c, y, x)];
          xbar[c * Wo + j] = sum * scale;
        }
      }
    }
    for (int64_t r = 0; r < p.R; ++r) {
      T* h = pre.data() + r * Wo;
      for (int64_t j = 0; j < Wo; ++j) h[j] = p.br[r] + p.term_at(r, i, j);
      for (int64_t c = 0; c < p.C; ++c) axpy(Wo, p.wr[r * p.C + c], xb(b, i, c), h);
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
    const int64_t Wo = p.Wo, sw = p.sw;
    for (int64_t c = 0; c < p.C; ++c) {
      T* __restrict o = out + p.at_out(b, c, i, 0);
      std::fill(o, o + Wo, p.bias ? p.bias[c] : T(0));
      const int64_t g = c / p.Cg;
      for (int64_t t = 0; t < p.K; ++t) {
        const T* __restrict kt = k.data() + (g * p.K + t) * Wo;
        const T* __restrict x = p.xp + p.at_xp(b, c, p.tap_row(i, t), p.tap_col(0, t));
        if (sw == 1) {
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j) o[j] += kt[j] * x[j];
        } else {
          for (int64_t j = 0; j < Wo; ++j) o[j] += kt[j] * x[j * sw];
        }
      }
    }
  }
  void backward(int64_t b, int64_t i, const T* grad, T* gxp, T* dterm) {
    generate(b, i);
    const int64_t Wo = p.Wo, sw = p.sw, R = p.R;
    scratch.assign((p.GK + R + 1) * Wo, T(0));
    T *dk = scratch.data(), *dpre = dk + p.GK * Wo, *dxb = dpre + R * Wo;
    for (int64_t c = 0; c < p.C; ++c) {
      const T* __restrict gc = grad + p.at_out(b, c, i, 0);
      sums.bias[c] += total(Wo, gc);
      const int64_t g = c / p.Cg;
      for (int64_t t = 0; t < p.K; ++t) {
        int64_t at = p.at_xp(b, c, p.tap_row(i, t), p.tap_col(0, t));
        const T* __restrict x = p.xp + at;
        T* __restrict gx = gxp + at;
        const T* __restrict kt = k.data() + (g * p.K + t) * Wo;
        T* __restrict dkt = dk + (g * p.K + t) * Wo;
        if (sw == 1) {
#pragma omp simd
          for (int64_t j = 0; j < Wo; ++j) {
            dkt[j] += gc[j] * x[j];
            gx[j] += kt[j] * gc[j];
          }
        } else {
          for (int64_t j = 0; j < Wo; ++j) {
            dkt[j] += gc[j] * x[j * sw];
            gx[j * sw] += kt[j] * gc[j];
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
    for (int64_t c = 0; c < p.C; ++c) {
      const T* x = xb(b, i, c);
      std::fill(dxb, dxb + Wo, T(0));
      for (int64_t r = 0; r < R; ++r) {
        sums.wr[r * p.C + c] += dot(Wo, dpre + r * Wo, x);
        axpy(Wo, p.wr[r * p.C + c], dpre + r * Wo, dxb);
      }
      if (p.pointwise_generator()) {
        axpy(Wo, T(1), dxb, gxp + p.at_xp(b, c, i + p.top, p.left));
        continue;
      }
      for (int64_t j = 0; j < Wo; ++j) {
        int64_t r0, r1, q0, q1;
        p.block(i, j, r0, r1, q0, q1);
        T share = dxb[j] / T((r1 - r0) * (q1 - q0));
        for (int64_t y = r0; y < r1; ++y)
          for (int64_t x = q0; x < q1; ++x) gxp[p.at_xp(b, c, y, x)] += share;
      }
    }
  }
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
void backward_rows(const Problem<T>& p, const T* grad, T* gxp, T* dterm, Totals& totals) {
  // blocks of `height` output rows: block n scatters into xp rows [n*height*sh, ((n+1)*height - 1)*sh +
  // reach), which end before block n+2's first row, (n+2)*height*sh
  const int64_t height = std::max<int64_t>(4, (p.reach() + p.sh - 1) / p.sh);
  const int64_t blocks = (p.Ho + height - 1) / height, pairs = (blocks + 1) / 2;
  std::mutex lock;
  for (int64_t parity = 0; parity < 2; ++parity) {
    at::parallel_for(0, p.B * pairs, 1, [&](int64_t begin, int64_t end) {
      Rows rows(p);
      Totals mine(p);
      for (int64_t task = begin; task < end; ++task) {
        int64_t b = task / pairs, n = 2 * (task % pairs) + parity;
        for (int64_t i = n * height; i < std::min((n + 1) * height, p.Ho); ++i)
          rows.backward(b, i, grad, gxp, dterm);
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

Tensor forward(const Tensor& xp, const Tensor& wr, const Tensor& br, const c10::optional<Tensor>& term,
               const Tensor& ws, const Tensor& bs, const c10::optional<Tensor>& bias, at::IntArrayRef geometry,
               bool channels_last) {
  Tensor out;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "posconv_involution_forward", [&] {
    using T = scalar_t;
    auto p = problem<T>(xp, wr, br, term, ws, bs, bias, geometry, channels_last);
    auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    out = at::empty({p.B, p.C, p.Ho, p.Wo}, xp.options().memory_format(format));
    with_rows(p, [&](auto* kind) {
      forward_rows<T, std::remove_pointer_t<decltype(kind)>>(p, out.data_ptr<T>());
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Tensor& grad, const Tensor& xp, const Tensor& wr, const Tensor& br, const c10::optional<Tensor>& term,
    const Tensor& ws, const Tensor& bs, bool has_bias, at::IntArrayRef geometry, bool channels_last) {
  Tensor gxp, gwr, gbr, gterm, gws, gbs, gbias;
  AT_DISPATCH_FLOATING_TYPES(xp.scalar_type(), "posconv_involution_backward", [&] {
    using T = scalar_t;
    auto p = problem<T>(xp, wr, br, term, ws, bs, c10::nullopt, geometry, channels_last);
    auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
    TORCH_CHECK(grad.sizes() == at::IntArrayRef({p.B, p.C, p.Ho, p.Wo}) && grad.is_contiguous(format) &&
                    grad.scalar_type() == xp.scalar_type(),
                "grad: expected the output's shape, layout and dtype");
    auto options = xp.options();
    gxp = at::empty(xp.sizes(), options.memory_format(format)).zero_();  // (at::zeros drops the format)
    gterm = term.has_value() ? at::empty({p.B, p.R, p.Ho, p.Wo}, options) : at::empty({0}, options);
    T* dterm = term.has_value() ? gterm.data_ptr<T>() : nullptr;
    Totals totals(p);
    with_rows(p, [&](auto* kind) {
      backward_rows<T, std::remove_pointer_t<decltype(kind)>>(p, grad.data_ptr<T>(), gxp.data_ptr<T>(), dterm,
                                                              totals);
    });
    gwr = at::empty({p.R, p.C}, options), gbr = at::empty({p.R}, options);
    gws = at::empty({p.GK, p.R}, options), gbs = at::empty({p.GK}, options);
    gbias = has_bias ? at::empty({p.C}, options) : at::empty({0}, options);
    T *dwr = gwr.data_ptr<T>(), *dws = gws.data_ptr<T>();
    for (int64_t r = 0; r < p.R; ++r) {
      for (int64_t c = 0; c < p.C; ++c) dwr[r * p.C + c] = T(totals.wr[r * p.C + c]);
      for (int64_t t = 0; t < p.GK; ++t) dws[t * p.R + r] = T(totals.ws[r * p.GK + t]);
    }
    std::copy(totals.br.begin(), totals.br.end(), gbr.data_ptr<T>());
    std::copy(totals.bs.begin(), totals.bs.end(), gbs.data_ptr<T>());
    if (has_bias) std::copy(totals.bias.begin(), totals.bias.end(), gbias.data_ptr<T>());
  });
  return {gxp, gwr, gbr, gterm, gws, gbs, gbias};
}

}  // namespace

TORCH_LIBRARY(posconv_involution, m) {
  m.def(
      "forward(Tensor xp, Tensor wr, Tensor br, Tensor? term, Tensor ws, Tensor bs, Tensor? bias, "
      "int[] geometry, bool channels_last) -> Tensor");
  m.def(
      "backward(Tensor grad, Tensor xp, Tensor wr, Tensor br, Tensor? term, Tensor ws, Tensor bs, "
      "bool has_bias, int[] geometry, bool channels_last) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(posconv_involution, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
