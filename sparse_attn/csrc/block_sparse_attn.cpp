// Block-sparse flash attention on the CPU: forward, dQ and dK/dV, walking a `BlockLayout` directly.
//
// Algorithm
//   Forward, one task per (batch, query head, query block): the row's kept key blocks (full and partial
//   merged in key order) are taken in runs of consecutive blocks, up to kRunWidth keys. Per run:
//   S = Q K^T (one GEMM over the whole run), scale, mask (a partial block's bit-packed tile, the key
//   mask; full blocks get no mask work), online softmax with a running row max and sum, O += P V (one
//   GEMM). A sliding-window row is one run, so the GEMMs are as wide as SDPA's own.
//   Backward in two passes, FlashAttention-2 style, recomputing P from the saved logsumexp:
//   - dQ, one task per (batch, query head, query block), over runs of key blocks:
//     dP = dO V^T, dS = P (dP - delta), dQ += dS K;
//   - dK/dV, one task per (batch, KV head, key block), over runs of the layout's column (query blocks)
//     for every query head of the group: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//   Every task writes only its own rows: no atomics, and the result does not depend on the thread
//   count or on which thread ran which task.
//
// Score modifiers (sparse_attn/score_mods.py): softcap, ALiBi and rel_bias are applied to a row of the
// score tile right after the GEMM, in one vectorized pass that also scales (full and partial blocks
// alike, before the mask). ALiBi's |j - qpos| comes from the row's first relative position; rel_bias is
// contiguous along a query row's keys (`rel_bias[h, j - i + Sq - 1]`), and along a key row's queries in
// its copy reversed along the diagonals. The backward keeps tanh of the softcapped row to apply its
// derivative to dS; d_rel_bias is the per-diagonal sum of dS before that derivative: each dQ task adds
// each run's dS into its own slice of partial sums (m + w - 1 diagonals per run, so the memory follows
// the kept blocks), and the slices are then added per head in task order, in double: deterministic
// for any thread count. Every kernel is instantiated with and without modifiers; without them the code
// is the modifier-free one.
//
// Inputs (prepared by sparse_attn/backends/cpu_kernel.py): q, k, v, dO in their storage type S (float,
// double for gradcheck, bf16 or fp16) with a contiguous last dimension, any other strides; scores,
// softmax, accumulators and lse in T = acc_t<S> (float, or double); keys hidden by the key mask zeroed in
// K and V (such a key may hold NaN), their scores set to -inf here. Per-batch layouts (documents, varlen,
// top-k) are walked like shared ones: batch element b, head h reads layout sequence Layout::seq(b, h).
// A row whose scores are NaN stays NaN (nan_max; the tile mask is a select, not an added -inf).
//
// GEMMs (see gemm()): fp32/fp64 through the BLAS PyTorch links (sgemm_/dgemm_, as SDPA's CPU kernel calls
// it), which reads transposed operands in place (oneDNN's brgemm, with K^T copied, was slower there);
// bf16/fp16 through torch's at::native::cpublas::brgemm with fp32 accumulation, P and dS rounded to S
// first, B^T operands copied once per call. The build's ISA (flags chosen by cpu_kernel.py: AVX-512,
// AVX2 or none) sets the width of ATen's Vectorized element-wise passes.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <type_traits>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

namespace {

using at::vec::Vectorized;

// The BLAS PyTorch links (MKL on x86 wheels, OpenBLAS elsewhere), through its Fortran interface, the
// same calls `at::native::cpublas::gemm` makes for SDPA. Weak: where it is absent, a plain loop runs.
extern "C" {
void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
// MKL: this thread's MKL thread count (0 restores the global one).
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // (the lower-case name takes an int*)
// OpenMP: this thread's team size for parallel regions it opens (torch's intra-op pool is OpenMP here).
void omp_set_num_threads(int n) __attribute__((weak));
int omp_get_max_threads() __attribute__((weak));
}

using at::BFloat16;
using at::Half;

// Accumulation type of a storage type: float for float, bf16 and fp16; double for double.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;
template <typename S>
constexpr bool kLowPrecision = std::is_same_v<S, BFloat16> || std::is_same_v<S, Half>;

template <typename S, typename T>
void loop_gemm(bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B,
               int64_t ldb, T* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j) {
      T c = add ? C[i * ldc + j] : T(0);
      for (int64_t k = 0; k < K; ++k)
        c += static_cast<T>(A[i * lda + k]) * static_cast<T>(trans_b ? B[j * ldb + k] : B[k * ldb + j]);
      C[i * ldc + j] = c;
    }
}

// C[M, N] (+)= A[M, K] op(B), all row-major with leading dimensions in elements; op(B) is B [K, N], or
// with `trans_b` the transpose of B stored [N, K] (so K^T, V^T, Q^T, dO^T need no copy in fp32). A and B
// are in the storage type S, C in its accumulation type.
// - fp32 / fp64: the BLAS's sgemm_/dgemm_. Row-major C is column-major C^T = op(B)^T A^T, hence the
//   swapped operands.
// - bf16 / fp16 (products summed in fp32, as SDPA's matmuls): torch's batch-reduce GEMM
//   `at::native::cpublas::brgemm`, the building block of torch's own CPU flash attention. It reaches
//   oneDNN (AVX512-BF16 / AVX512-FP16 instructions where the CPU has them, AVX-512 or AVX2 otherwise). It
//   takes no transposed operand: the callers pass B^T copies made once per call (`gemm_abt`).
template <typename S, typename T>
inline void gemm(bool trans_b, int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const S* B,
                 int64_t ldb, T* C, int64_t ldc, bool add) {
  if constexpr (kLowPrecision<S>) {
    TORCH_CHECK(!trans_b, "internal: low-precision GEMMs take B^T copies");
    return at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
  } else {
    const char tb = trans_b ? 'T' : 'N', ta = 'N';
    const int m = N, n = M, k = K, lb = ldb, la = lda, lc = ldc;
    const T alpha = 1, beta = add ? 1 : 0;
    if constexpr (std::is_same_v<S, float>) {
      if (sgemm_) return sgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    } else {
      if (dgemm_) return dgemm_(&tb, &ta, &m, &n, &k, &alpha, B, &lb, A, &la, &beta, C, &lc);
    }
  }
  loop_gemm(trans_b, M, N, K, A, lda, B, ldb, C, ldc, add);
}

// [B, H, D, S]: the transpose of a [B, H, S, D] tensor, made contiguous (low precision only; see gemm).
template <typename S>
struct Transposed {
  const S* ptr = nullptr;
  int64_t sb = 0, sh = 0, ld = 0;
  Transposed() = default;
  explicit Transposed(const at::Tensor& t)
      : ptr(t.data_ptr<S>()), sb(t.stride(0)), sh(t.stride(1)), ld(t.stride(2)) {}
  // Column s (position s of the sequence) of batch b, head h.
  const S* at(int64_t b, int64_t h, int64_t s) const { return ptr + b * sb + h * sh + s; }
};

// dst[r, :n] = src[r, :n] for m rows (leading dimension ld), converted to S: P and dS rounded to the
// input precision before their GEMMs, as SDPA does. Returns dst (src itself when S is T).
template <typename S, typename T>
inline const S* to_storage(const T* src, S* dst, int64_t m, int64_t n, int64_t ld) {
  if constexpr (std::is_same_v<S, T>) {
    return src;
  } else {
    for (int64_t r = 0; r < m; ++r) at::vec::convert(src + r * ld, dst + r * ld, n);
    return dst;
  }
}

// dst[:n] = src[:n] * a, converted to S (an output row).
template <typename S, typename T>
inline void store_row(const T* src, S* dst, int64_t n, T a) {
  using V = Vectorized<T>;
  if constexpr (std::is_same_v<S, T>) {
    int64_t c = 0;
    for (; c + V::size() <= n; c += V::size()) (V::loadu(src + c) * V(a)).store(dst + c);
    for (; c < n; ++c) dst[c] = src[c] * a;
  } else {
    T tmp[256];
    for (int64_t c0 = 0; c0 < n; c0 += 256) {
      const int64_t len = std::min<int64_t>(256, n - c0);
      for (int64_t c = 0; c < len; ++c) tmp[c] = src[c0 + c] * a;
      at::vec::convert(tmp, dst + c0, len);
    }
  }
}

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// tanh in float: a rational approximation (Eigen's fast tanh: odd degree-13 over even degree-6 polynomial,
// within 7 ulp, 4e-7 absolute), about 3x faster than ATen's (Sleef, 1 ulp), whose cost would double the
// forward's element-wise work under a softcap. Double keeps ATen's.
inline Vectorized<float> vtanh(const Vectorized<float>& x) {
  using V = Vectorized<float>;
  using at::vec::fmadd;
  const V y = at::vec::clamp(x, V(-7.90531110763549805f), V(7.90531110763549805f));
  const V y2 = y * y;
  V p = fmadd(y2, V(-2.76076847742355e-16f), V(2.00018790482477e-13f));
  p = fmadd(y2, p, V(-8.60467152213735e-11f));
  p = fmadd(y2, p, V(5.12229709037114e-08f));
  p = fmadd(y2, p, V(1.48572235717979e-05f));
  p = fmadd(y2, p, V(6.37261928875436e-04f));
  p = fmadd(y2, p, V(4.89352455891786e-03f));
  V r = fmadd(y2, V(1.19825839466702e-06f), V(1.18534705686654e-04f));
  r = fmadd(y2, r, V(2.26843463243900e-03f));
  r = fmadd(y2, r, V(4.89352518554385e-03f));
  // Below 4e-4, tanh(x) rounds to x.
  return V::blendv((p * y) / r, x, x.abs() < V(0.0004f));
}
inline Vectorized<double> vtanh(const Vectorized<double>& x) { return x.tanh(); }

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// max that propagates NaN (std::max(a, NaN) is a): a row whose scores are NaN must give NaN, as the
// reference and SDPA do, never an empty row.
template <typename T>
inline T nan_max(T a, T b) {
  return (a != a || b != b) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
}

// The max (NaN if any lane is NaN) and the sum of a vector's lanes.
template <typename T>
inline T lanes_max(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T out = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) out = nan_max(out, lanes[i]);
  return out;
}
template <typename T>
inline T lanes_sum(const Vectorized<T>& v) {
  T lanes[Vectorized<T>::size()];
  v.store(lanes);
  T out = lanes[0];
  for (int i = 1; i < Vectorized<T>::size(); ++i) out += lanes[i];
  return out;
}

// Element-wise passes over one row of scores (at most a block wide, so it stays in L1), vectorized with
// ATen's Vectorized<T> and a masked tail.

// x *= a.
template <typename T>
inline void scale_by(T* x, int64_t n, T a) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * V(a)).store(x + c);
  if (c < n) (V::loadu(x + c, n - c) * V(a)).store(x + c, n - c);
}

// max(x).
template <typename T>
inline T max_of(const T* x, int64_t n) {
  using V = Vectorized<T>;
  V m(neg_inf<T>());
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) m = at::vec::maximum(m, V::loadu(x + c));
  T out = lanes_max(m);
  for (; c < n; ++c) out = nan_max(out, x[c]);
  return out;
}

// x *= a; returns max(x) (one pass).
template <typename T>
inline T scale_max_(T* x, int64_t n, T a) {
  using V = Vectorized<T>;
  V m(neg_inf<T>());
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    V y = V::loadu(x + c) * V(a);
    y.store(x + c);
    m = at::vec::maximum(m, y);
  }
  T out = lanes_max(m);
  for (; c < n; ++c) out = nan_max(out, x[c] *= a);
  return out;
}

// x = exp(x - m); returns the sum.
template <typename T>
inline T exp_sum(T* x, int64_t n, T m) {
  using V = Vectorized<T>;
  V acc(T(0));
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    V p = vexp(V::loadu(x + c) - V(m));
    p.store(x + c);
    acc = acc + p;
  }
  T sum = lanes_sum(acc);
  for (; c < n; ++c) sum += (x[c] = std::exp(x[c] - m));
  return sum;
}

// x = exp(x * a - m[c]) (a row of P^T: the logsumexp varies along it).
template <typename T>
inline void scale_sub_exp(T* x, int64_t n, T a, const T* m) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) vexp(V::loadu(x + c) * V(a) - V::loadu(m + c)).store(x + c);
  for (; c < n; ++c) x[c] = std::exp(x[c] * a - m[c]);
}

// ds = p (ds - delta) a, with delta one value (`delta_step` 0) or one per element (1).
template <typename T>
inline void dsoftmax(T* ds, const T* p, int64_t n, const T* delta, int64_t delta_step, T a) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V d = delta_step ? V::loadu(delta + c) : V(*delta);
    (V::loadu(p + c) * (V::loadu(ds + c) - d) * V(a)).store(ds + c);
  }
  for (; c < n; ++c) ds[c] = p[c] * (ds[c] - delta[c * delta_step]) * a;
}

// ds *= (1 - th^2) a: the softcap derivative (th = tanh of the capped score) and the scale.
template <typename T>
inline void softcap_grad_(T* ds, const T* th, int64_t n, T a) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V t = V::loadu(th + c);
    (V::loadu(ds + c) * (V(T(1)) - t * t) * V(a)).store(ds + c);
  }
  for (; c < n; ++c) ds[c] *= (T(1) - th[c] * th[c]) * a;
}

// dst += src.
template <typename T>
inline void add_to(T* dst, const T* src, int64_t n) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(dst + c) + V::loadu(src + c)).store(dst + c);
  for (; c < n; ++c) dst[c] += src[c];
}

// The score modifiers of one call, in T (see the header and sparse_attn/score_mods.py).
template <typename T>
struct Mods {
  T cap = 0;                      // softcap c, 0 for none
  const T* slopes = nullptr;      // ALiBi [1 or B, Hq], or null
  int64_t slopes_b = 0;           // the slopes' batch stride: 0 when they are shared
  const T* rel = nullptr;         // rel_bias [Hq, Sq + Skv - 1], or null
  const T* rel_rev = nullptr;     // rel_bias reversed along its last dimension (the dK/dV pass), or null
  int64_t diags = 0;              // Sq + Skv - 1
  bool any() const { return cap != 0 || slopes != nullptr || rel != nullptr; }
  T slope(int64_t b, int64_t h) const { return slopes ? slopes[b * slopes_b + h] : T(0); }
  // rel_bias of head h from diagonal d = j - i + Sq - 1 on, along increasing keys j.
  const T* bias(int64_t h, int64_t d) const { return rel ? rel + h * diags + d : nullptr; }
  // rel_bias of head h from diagonal d on, along increasing queries i (decreasing diagonals).
  const T* bias_rev(int64_t h, int64_t d) const {
    return rel_rev ? rel_rev + h * diags + (diags - 1 - d) : nullptr;
  }
};

// One row of the score tile, scaled and modified in place: x = cap * tanh(scale x / cap) (tanh kept in
// `th` when given), then -slope |rel0 + dir c| (ALiBi; dir 1 along a query row's keys, -1 along a key
// row's queries), then bias[c]. Returns the row's max.
template <typename T>
inline T modify_row_(T* x, int64_t n, T scale, T cap, T* th, T slope, int64_t rel0, int64_t dir,
                     const T* bias) {
  using V = Vectorized<T>;
  const T inv_cap = cap != 0 ? T(1) / cap : T(0);
  const V iota = V::arange(T(0), static_cast<T>(dir));
  auto apply = [&](V y, int64_t c, int64_t lanes) {
    y = y * V(scale);
    if (cap != 0) {
      const V t = vtanh(y * V(inv_cap));
      if (th) t.store(th + c, lanes);
      y = t * V(cap);
    }
    if (slope != 0) y = y - V(slope) * (V(static_cast<T>(rel0 + dir * c)) + iota).abs();
    if (bias) y = y + V::loadu(bias + c, lanes);
    return y;
  };
  V m(neg_inf<T>());
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) {
    const V y = apply(V::loadu(x + c), c, V::size());
    y.store(x + c);
    m = at::vec::maximum(m, y);
  }
  T out = lanes_max(m);
  if (c < n) {
    apply(V::loadu(x + c, n - c), c, n - c).store(x + c, n - c);
    for (; c < n; ++c) out = nan_max(out, x[c]);
  }
  return out;
}

// For each bit of a byte, the masks that keep a score (bit 1) or make it -inf (bit 0) as bit operations
// x = (x & keep) | hide, 8 columns at a time. A select, not an addition of -inf: a NaN score of an invisible
// pair must become -inf, as in the reference (NaN - inf is NaN).
template <typename T>
struct TileSelect {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  U keep[256][8], hide[256][8];
  TileSelect() {
    const T ninf = neg_inf<T>();
    U ninf_bits;
    std::memcpy(&ninf_bits, &ninf, sizeof(U));
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) {
        const bool on = (b >> k) & 1;
        keep[b][k] = on ? ~U(0) : U(0);
        hide[b][k] = on ? U(0) : ninf_bits;
      }
  }
};

// x[c] = -inf where bit c of the packed tile row `bits` is 0 (bits beyond the sequence are 0 too).
template <typename T>
inline void mask_tile_(T* x, int64_t n, const int32_t* bits) {
  using U = typename TileSelect<T>::U;
  static const TileSelect<T> lut;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    const uint32_t byte = (static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & 0xFFu;
    U lanes[8];
    std::memcpy(lanes, x + c, sizeof(lanes));
    for (int k = 0; k < 8; ++k) lanes[k] = (lanes[k] & lut.keep[byte][k]) | lut.hide[byte][k];
    std::memcpy(x + c, lanes, sizeof(lanes));
  }
  for (; c < n; ++c) x[c] = ((static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & 1u) ? x[c] : neg_inf<T>();
}

// x[c] = -inf where the key mask hides key c.
template <typename T>
inline void mask_keys_(T* x, int64_t n, const bool* real) {
  for (int64_t c = 0; c < n; ++c) x[c] = real[c] ? x[c] : neg_inf<T>();
}

// [B, H, S, D] with the last dimension contiguous: element strides of batch, head, sequence.
template <typename T>
struct Strided {
  T* ptr;
  int64_t sb, sh, ss;
  Strided(const at::Tensor& t)
      : ptr(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t s) const { return ptr + b * sb + h * sh + s * ss; }
};

// C[M, N] = A[M, K] X^T, where X^T's columns are rows s0.. s0 + N - 1 of X (batch b, head h): X read in
// place (trans_b) in fp32 / fp64, its transposed copy XT in bf16 / fp16.
template <typename S, typename T>
inline void gemm_abt(int64_t M, int64_t N, int64_t K, const S* A, int64_t lda, const Strided<S>& X,
                     const Transposed<S>& XT, int64_t b, int64_t h, int64_t s0, T* C, int64_t ldc) {
  if constexpr (kLowPrecision<S>) {
    gemm(false, M, N, K, A, lda, XT.at(b, h, s0), XT.ld, C, ldc, false);
  } else {
    gemm(true, M, N, K, A, lda, X.at(b, h, s0), X.ss, C, ldc, false);
  }
}

// The transposed copies of the low-precision path: `names` of `t` (the kernel's optional list), checked.
template <typename S>
std::vector<Transposed<S>> transposed_of(at::TensorList t, std::initializer_list<const at::Tensor*> of) {
  std::vector<Transposed<S>> out;
  if constexpr (!kLowPrecision<S>) return std::vector<Transposed<S>>(of.size());
  TORCH_CHECK(t.size() == of.size(), "the bf16/fp16 kernel takes ", of.size(), " transposed copies");
  size_t i = 0;
  for (const at::Tensor* x : of) {
    const auto& c = t[i++];
    TORCH_CHECK(c.dim() == 4 && c.size(0) == x->size(0) && c.size(1) == x->size(1) && c.size(2) == x->size(3) &&
                    c.size(3) == x->size(2) && c.stride(3) == 1 && c.scalar_type() == x->scalar_type(),
                "a transposed copy must be [B, H, D, S] with a contiguous last dimension");
    out.emplace_back(c);
  }
  return out;
}

// The layout's CSR lists (see sparse_attn/layout.py) and geometry.
struct Layout {
  int64_t heads, batch, q_len, kv_len, bq, bk, nqb, nkb, words, words_t;
  const int32_t *row_full_ptr, *row_full_idx, *row_part_ptr, *row_part_idx, *row_part_tile;
  const int32_t *col_full_ptr, *col_full_idx, *col_part_ptr, *col_part_idx, *col_part_tile;
  const int32_t *tiles, *tiles_t;

  Layout(at::TensorList t, at::IntArrayRef ints, const at::Tensor& tiles_t_) {
    // BlockLayout.flatten(): 11 int32 tensors and (q_len, kv_len, block_q, block_k, heads, batch or 0).
    TORCH_CHECK(t.size() == 11 && ints.size() == 6, "unexpected BlockLayout format: ", t.size(),
                " tensors and ", ints.size(), " ints");
    q_len = ints[0], kv_len = ints[1], bq = ints[2], bk = ints[3], heads = ints[4], batch = ints[5];
    nqb = (q_len + bq - 1) / bq;
    nkb = (kv_len + bk - 1) / bk;
    const int64_t seqs = std::max<int64_t>(batch, 1) * heads;
    TORCH_CHECK(t[0].dim() == 2 && t[0].size(0) == seqs && t[0].size(1) == nqb + 1 &&
                    t[5].dim() == 2 && t[5].size(0) == seqs && t[5].size(1) == nkb + 1,
                "BlockLayout row/column offsets must be [(batch or 1) * heads, blocks + 1]");
    for (const auto& x : t) TORCH_CHECK(x.scalar_type() == at::kInt && x.is_contiguous() && x.is_cpu(),
                                        "BlockLayout tensors must be contiguous int32 CPU tensors");
    words = (bk + 31) / 32;
    words_t = (bq + 31) / 32;
    const int32_t** fields[] = {&row_full_ptr, &row_full_idx, &row_part_ptr, &row_part_idx,
                                &row_part_tile, &col_full_ptr, &col_full_idx, &col_part_ptr,
                                &col_part_idx, &col_part_tile, &tiles};
    for (size_t i = 0; i < 11; ++i) *fields[i] = t[i].data_ptr<int32_t>();
    TORCH_CHECK(tiles_t_.scalar_type() == at::kInt && tiles_t_.is_contiguous(), "tiles_t must be contiguous int32");
    tiles_t = tiles_t_.data_ptr<int32_t>();
  }
  // The layout sequence of batch element b, query head h (see sparse_attn/layout.py).
  int64_t seq(int64_t b, int64_t h) const { return (batch ? b : 0) * heads + (heads == 1 ? 0 : h); }
};

// Runs f(task) for every task on torch's intra-op threads; tasks are handed out one at a time, the
// costliest first, so that threads finish together. f(task, scratch) owns its outputs.
template <typename F>
void run_tasks(const std::vector<int64_t>& order, F f) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    // Each worker's GEMMs run on that worker alone: MKL would otherwise start nested OpenMP teams whose
    // spinning threads starve the other workers (10x slower on a loaded 2-core machine).
    const int mkl_before = MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0;
    const int omp_before = omp_get_max_threads ? omp_get_max_threads() : 0;
    if (omp_set_num_threads) omp_set_num_threads(1);
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(order[i]);
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(mkl_before);
    if (omp_set_num_threads) omp_set_num_threads(omp_before);
  });
}

// Task ids 0..n-1 sorted by decreasing cost (stable: equal costs keep their order).
std::vector<int64_t> by_cost(const std::vector<int64_t>& cost) {
  std::vector<int64_t> order(cost.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return cost[a] > cost[b]; });
  return order;
}

// Blocks of row (layout head l, query block qb) or of column (l, key block kb).
inline int64_t count(const int32_t* ptr, int64_t n, int64_t l, int64_t i) {
  return ptr[l * (n + 1) + i + 1] - ptr[l * (n + 1) + i];
}

// One kept block of a row (a key block) or of a column (a query block), with its tile (null if full).
struct Kept {
  int64_t idx;
  const int32_t* tile;
};

// The kept blocks of CSR row i of layout head l, full and partial merged in ascending order.
inline void kept_blocks(std::vector<Kept>& out, int64_t n, int64_t l, int64_t i, const int32_t* full_ptr,
                        const int32_t* full_idx, const int32_t* part_ptr, const int32_t* part_idx,
                        const int32_t* part_tile, const int32_t* tiles, int64_t tile_words) {
  out.clear();
  int64_t f = full_ptr[l * (n + 1) + i], f_end = full_ptr[l * (n + 1) + i + 1];
  int64_t p = part_ptr[l * (n + 1) + i], p_end = part_ptr[l * (n + 1) + i + 1];
  while (f < f_end || p < p_end) {
    if (p == p_end || (f < f_end && full_idx[f] < part_idx[p])) {
      out.push_back({full_idx[f++], nullptr});
    } else {
      out.push_back({part_idx[p], tiles + static_cast<int64_t>(part_tile[p]) * tile_words});
      ++p;
    }
  }
}

// f(first, count) for each run of consecutive blocks of `kept`, at most `max_blocks` long: one run is
// one wide GEMM (a window row is a single run), which runs much closer to the CPU's peak than
// block-by-block GEMMs.
template <typename F>
inline void for_each_run(const std::vector<Kept>& kept, int64_t max_blocks, F f) {
  size_t s = 0;
  while (s < kept.size()) {
    size_t e = s + 1;
    while (e < kept.size() && static_cast<int64_t>(e - s) < max_blocks && kept[e].idx == kept[e - 1].idx + 1) ++e;
    f(s, static_cast<int64_t>(e - s));
    s = e;
  }
}

// Widest run, in keys (or queries for the dK/dV pass): a [block, 512] fp32 score tile is 128 KiB.
constexpr int64_t kRunWidth = 512;

template <typename T>
struct KeyMask {
  const bool* real = nullptr;        // [B, Skv], or null
  const bool* block_masked = nullptr;  // [B, nkb]: the block holds a masked key
  int64_t kv_len = 0, nkb = 0, bk = 0;
  const bool* keys(int64_t b, int64_t kb) const {
    return (real && block_masked[b * nkb + kb]) ? real + b * kv_len + kb * bk : nullptr;
  }
};

template <typename T>
KeyMask<T> key_mask_of(const std::optional<at::Tensor>& real, const std::optional<at::Tensor>& blocks,
                       const Layout& lay) {
  KeyMask<T> km;
  if (real.has_value() && real->defined()) {
    km.real = real->data_ptr<bool>();
    km.block_masked = blocks->data_ptr<bool>();
  }
  km.kv_len = lay.kv_len;
  km.nkb = lay.nkb;
  km.bk = lay.bk;
  return km;
}

// ---------------------------------------------------------------------------------------------------
// forward
// S: the storage type of q, k, v and out (float, double, bf16 or fp16); T = acc_t<S> for scores, softmax,
// accumulators and lse.
template <typename S, bool MODS, typename T = acc_t<S>>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const Transposed<S>& KT, const Layout& lay, const KeyMask<T>& km,
                                     double scale_arg, const Mods<T>& md) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = v.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nqb = lay.nqb;
  const int64_t run_max = std::max<int64_t>(1, kRunWidth / bk), W = run_max * bk;
  const T scale = static_cast<T>(scale_arg);
  auto out = at::empty({B, Hq, lay.q_len, D}, q.options());
  at::Tensor lse = at::empty({B, Hq, lay.q_len}, q.options().dtype(c10::CppTypeToScalarType<T>::value));
  const Strided<S> Q(q), K(k), V(v), O(out);
  T* L = lse.data_ptr<T>();

  std::vector<int64_t> cost(B * Hq * nqb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t l = lay.seq(t / (Hq * nqb), (t / nqb) % Hq), qb = t % nqb;
    cost[t] = count(lay.row_full_ptr, nqb, l, qb) + count(lay.row_part_ptr, nqb, l, qb);
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    thread_local std::vector<S> low;  // P in the storage type (bf16, fp16) for the P V GEMM
    thread_local std::vector<Kept> kept;
    scratch.resize(bq * W + bq * D + 2 * bq);
    if constexpr (kLowPrecision<S>) low.resize(bq * W);
    T* St = scratch.data();  // [bq, W] scores, then probabilities
    T* acc = St + bq * W;    // [bq, D] unnormalised output
    T* mx = acc + bq * D;    // [bq] running max (scaled scores)
    T* sum = mx + bq;        // [bq] running sum of exp
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb, g = h / group;
    const int64_t l = lay.seq(b, h), i0 = qb * bq, m = std::min(bq, lay.q_len - i0);
    std::fill(acc, acc + m * D, T(0));
    std::fill(mx, mx + m, neg_inf<T>());
    std::fill(sum, sum + m, T(0));
    const S* q_rows = Q.at(b, h, i0);
    const T slope = md.slope(b, h);
    kept_blocks(kept, nqb, l, qb, lay.row_full_ptr, lay.row_full_idx, lay.row_part_ptr, lay.row_part_idx,
                lay.row_part_tile, lay.tiles, bq * lay.words);
    for_each_run(kept, run_max, [&](size_t first, int64_t blocks) {
      const int64_t j0 = kept[first].idx * bk, w = std::min(blocks * bk, lay.kv_len - j0);
      gemm_abt(m, w, D, q_rows, Q.ss, K, KT, b, g, j0, St, W);
      bool masked = false;
      for (int64_t i = 0; i < blocks; ++i)
        masked |= kept[first + i].tile != nullptr || km.keys(b, kept[first + i].idx) != nullptr;
      for (int64_t r = 0; r < m; ++r) {
        T* s = St + r * W;
        T row_max = neg_inf<T>();
        if constexpr (MODS) {
          // Query row i sits at qpos = i + Skv - Sq; key j0 + c is on diagonal j0 + c - i + Sq - 1.
          const int64_t i = i0 + r;
          row_max = modify_row_(s, w, scale, md.cap, static_cast<T*>(nullptr), slope,
                                j0 - (i + lay.kv_len - lay.q_len), 1, md.bias(h, j0 - i + lay.q_len - 1));
        } else if (masked) {
          scale_by(s, w, scale);
        } else {
          row_max = scale_max_(s, w, scale);
        }
        if (masked) {
          for (int64_t i = 0; i < blocks; ++i) {
            const int64_t c0 = i * bk, n = std::min(bk, w - c0);
            if (const int32_t* tile = kept[first + i].tile) mask_tile_(s + c0, n, tile + r * lay.words);
            if (const bool* keys = km.keys(b, kept[first + i].idx)) mask_keys_(s + c0, n, keys);
          }
          row_max = max_of(s, w);
        }
        // NaN scores (a NaN query, NaN modifiers) keep the row NaN: nan_max, and no "empty" shortcut.
        const T new_max = nan_max(mx[r], row_max);
        if (new_max == neg_inf<T>()) {  // nothing visible yet: weights 0
          std::fill(s, s + w, T(0));
          continue;
        }
        const T corr = std::exp(mx[r] - new_max);
        sum[r] = sum[r] * corr + exp_sum(s, w, new_max);
        mx[r] = new_max;
        if (corr != T(1)) scale_by(acc + r * D, D, corr);
      }
      gemm(false, m, D, w, to_storage(St, low.data(), m, w, W), W, V.at(b, g, j0), V.ss, acc, D, true);
    });
    T* lse_rows = L + (b * Hq + h) * lay.q_len + i0;
    for (int64_t r = 0; r < m; ++r) {
      S* o = O.at(b, h, i0 + r);
      if (sum[r] > T(0) || sum[r] != sum[r]) {
        store_row(acc + r * D, o, D, T(1) / sum[r]);
        lse_rows[r] = mx[r] + std::log(sum[r]);
      } else {
        std::fill(o, o + D, S(0));
        lse_rows[r] = neg_inf<T>();
      }
    }
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------
// backward: lse has +inf on rows that see nothing (so P recomputes to 0), delta = rowsum(dO O) - dlse.
// d_rel_bias without atomics: where each dQ task's runs keep their partial sums of dS over diagonals. A
// run of rows i0..i0+m-1 and keys j0..j0+w-1 covers the m + w - 1 diagonals j - i + Sq - 1 from
// j0 - (i0 + m - 1) + Sq - 1 on; row r adds its dS at offset m - 1 - r.
struct DiagonalParts {
  std::vector<int64_t> task_first;      // [tasks + 1]: each task's first run
  std::vector<int64_t> offset, diag, len;  // per run: where its sums start, first diagonal, count
  int64_t total = 0;
};

// The runs of every dQ task (b, h, qb), in task order, exactly as the dQ pass walks them.
DiagonalParts diagonal_parts(const Layout& lay, int64_t B, int64_t Hq, int64_t run_max) {
  DiagonalParts parts;
  std::vector<Kept> kept;
  const int64_t nqb = lay.nqb;
  parts.task_first.reserve(B * Hq * nqb + 1);
  for (int64_t t = 0; t < B * Hq * nqb; ++t) {
    parts.task_first.push_back(static_cast<int64_t>(parts.offset.size()));
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb, i0 = qb * lay.bq;
    const int64_t m = std::min(lay.bq, lay.q_len - i0);
    kept_blocks(kept, nqb, lay.seq(b, h), qb, lay.row_full_ptr, lay.row_full_idx, lay.row_part_ptr,
                lay.row_part_idx, lay.row_part_tile, lay.tiles, lay.bq * lay.words);
    for_each_run(kept, run_max, [&](size_t first, int64_t blocks) {
      const int64_t j0 = kept[first].idx * lay.bk, w = std::min(blocks * lay.bk, lay.kv_len - j0);
      parts.offset.push_back(parts.total);
      parts.diag.push_back(j0 - (i0 + m - 1) + lay.q_len - 1);
      parts.len.push_back(m + w - 1);
      parts.total += m + w - 1;
    });
  }
  parts.task_first.push_back(static_cast<int64_t>(parts.offset.size()));
  return parts;
}

// [Hq, Sq + Skv - 1]: the partial sums added per head over batches and tasks in a fixed order, in double.
template <typename T>
at::Tensor reduce_diagonals(const DiagonalParts& parts, const T* sums, int64_t B, int64_t Hq, int64_t nqb,
                            int64_t diags, const at::TensorOptions& options) {
  auto out = at::empty({Hq, diags}, options);
  T* o = out.data_ptr<T>();
  at::parallel_for(0, Hq, 1, [&](int64_t h0, int64_t h1) {
    std::vector<double> acc(diags);
    for (int64_t h = h0; h < h1; ++h) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t qb = 0; qb < nqb; ++qb) {
          const int64_t t = (b * Hq + h) * nqb + qb;
          for (int64_t run = parts.task_first[t]; run < parts.task_first[t + 1]; ++run) {
            const T* src = sums + parts.offset[run];
            double* dst = acc.data() + parts.diag[run];
            for (int64_t x = 0; x < parts.len[run]; ++x) dst[x] += src[x];
          }
        }
      for (int64_t d = 0; d < diags; ++d) o[h * diags + d] = static_cast<T>(acc[d]);
    }
  });
  return out;
}

// {dq}, and d_rel_bias [Hq, Sq + Skv - 1] after it when the modifiers have a rel_bias.
template <typename S, bool MODS, typename T = acc_t<S>>
std::vector<at::Tensor> backward_dq_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                         const at::Tensor& dout, const at::Tensor& lse,
                                         const at::Tensor& delta, const Transposed<S>& KT,
                                         const Transposed<S>& VT, const Layout& lay, const KeyMask<T>& km,
                                         double scale_arg, const Mods<T>& md) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nqb = lay.nqb;
  const int64_t run_max = std::max<int64_t>(1, kRunWidth / bk), W = run_max * bk;
  const T scale = static_cast<T>(scale_arg);
  auto dq = at::empty({B, Hq, lay.q_len, D}, q.options());
  const Strided<S> Q(q), K(k), V(v), DO(dout), DQ(dq);
  const T *LSE = lse.data_ptr<T>(), *DELTA = delta.data_ptr<T>();
  // d_rel_bias: every task's partial sums (zeroed by the task that owns them).
  const bool rel_grad = MODS && md.rel != nullptr;
  DiagonalParts parts;
  std::unique_ptr<T[]> sums;
  if (rel_grad) {
    parts = diagonal_parts(lay, B, Hq, run_max);
    sums.reset(new T[parts.total]);
  }

  std::vector<int64_t> cost(B * Hq * nqb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t l = lay.seq(t / (Hq * nqb), (t / nqb) % Hq), qb = t % nqb;
    cost[t] = count(lay.row_full_ptr, nqb, l, qb) + count(lay.row_part_ptr, nqb, l, qb);
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    thread_local std::vector<S> low;  // dS in the storage type (bf16, fp16) for the dS K GEMM
    thread_local std::vector<Kept> kept;
    scratch.resize(2 * bq * W + bq * D + (MODS ? W : 0));
    if constexpr (kLowPrecision<S>) low.resize(bq * W);
    T* P = scratch.data();  // [bq, W]
    T* dS = P + bq * W;     // [bq, W]
    T* acc = dS + bq * W;   // [bq, D]
    T* th = acc + bq * D;   // [W] tanh of one softcapped row (with modifiers)
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb, g = h / group;
    const int64_t l = lay.seq(b, h), i0 = qb * bq, m = std::min(bq, lay.q_len - i0);
    std::fill(acc, acc + m * D, T(0));
    const T* lse_rows = LSE + (b * Hq + h) * lay.q_len + i0;
    const T* delta_rows = DELTA + (b * Hq + h) * lay.q_len + i0;
    const T slope = md.slope(b, h);
    int64_t run = rel_grad ? parts.task_first[t] : 0;
    kept_blocks(kept, nqb, l, qb, lay.row_full_ptr, lay.row_full_idx, lay.row_part_ptr, lay.row_part_idx,
                lay.row_part_tile, lay.tiles, bq * lay.words);
    for_each_run(kept, run_max, [&](size_t first, int64_t blocks) {
      const int64_t j0 = kept[first].idx * bk, w = std::min(blocks * bk, lay.kv_len - j0);
      T* diag_sums = nullptr;
      if (rel_grad) {
        diag_sums = sums.get() + parts.offset[run++];
        std::fill(diag_sums, diag_sums + m + w - 1, T(0));
      }
      gemm_abt(m, w, D, Q.at(b, h, i0), Q.ss, K, KT, b, g, j0, P, W);
      gemm_abt(m, w, D, DO.at(b, h, i0), DO.ss, V, VT, b, g, j0, dS, W);
      for (int64_t r = 0; r < m; ++r) {
        T* p = P + r * W;
        T* ds = dS + r * W;
        if constexpr (MODS) {
          const int64_t i = i0 + r;
          modify_row_(p, w, scale, md.cap, th, slope, j0 - (i + lay.kv_len - lay.q_len), 1,
                      md.bias(h, j0 - i + lay.q_len - 1));
        } else {
          scale_by(p, w, scale);
        }
        for (int64_t i = 0; i < blocks; ++i) {
          const int64_t c0 = i * bk, n = std::min(bk, w - c0);
          if (const int32_t* tile = kept[first + i].tile) mask_tile_(p + c0, n, tile + r * lay.words);
          if (const bool* keys = km.keys(b, kept[first + i].idx)) mask_keys_(p + c0, n, keys);
        }
        exp_sum(p, w, lse_rows[r]);
        if constexpr (MODS) {
          if (md.cap == 0 && !diag_sums) {
            dsoftmax(ds, p, w, delta_rows + r, 0, scale);
          } else {
            // dS of the modified score (rel_bias' gradient), then through the softcap and the scale.
            dsoftmax(ds, p, w, delta_rows + r, 0, T(1));
            if (diag_sums) add_to(diag_sums + (m - 1 - r), ds, w);
            if (md.cap != 0) {
              softcap_grad_(ds, th, w, scale);
            } else {
              scale_by(ds, w, scale);
            }
          }
        } else {
          dsoftmax(ds, p, w, delta_rows + r, 0, scale);
        }
      }
      gemm(false, m, D, w, to_storage(dS, low.data(), m, w, W), W, K.at(b, g, j0), K.ss, acc, D, true);
    });
    for (int64_t r = 0; r < m; ++r) store_row(acc + r * D, DQ.at(b, h, i0 + r), D, T(1));
  });
  if (!rel_grad) return {dq};
  return {dq, reduce_diagonals<T>(parts, sums.get(), B, Hq, nqb, md.diags, lse.options())};
}

template <typename S, bool MODS, typename T = acc_t<S>>
std::vector<at::Tensor> backward_dkdv_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& dout, const at::Tensor& lse,
                                           const at::Tensor& delta, const Transposed<S>& QT,
                                           const Transposed<S>& DOT, const Layout& lay,
                                           const KeyMask<T>& km, double scale_arg, const Mods<T>& md) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nkb = lay.nkb;
  const int64_t run_max = std::max<int64_t>(1, kRunWidth / bq), W = run_max * bq;
  const T scale = static_cast<T>(scale_arg);
  auto dk = at::empty({B, Hkv, lay.kv_len, D}, q.options());
  auto dv = at::empty({B, Hkv, lay.kv_len, D}, q.options());
  const Strided<S> Q(q), K(k), V(v), DO(dout), DK(dk), DV(dv);
  const T *LSE = lse.data_ptr<T>(), *DELTA = delta.data_ptr<T>();

  std::vector<int64_t> cost(B * Hkv * nkb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t b = t / (Hkv * nkb), g = (t / nkb) % Hkv, kb = t % nkb;
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const int64_t l = lay.seq(b, h);
      cost[t] += count(lay.col_full_ptr, nkb, l, kb) + count(lay.col_part_ptr, nkb, l, kb);
    }
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    thread_local std::vector<S> low;  // P^T and dS^T in the storage type (bf16, fp16) for their GEMMs
    thread_local std::vector<Kept> kept;
    scratch.resize(2 * bk * W + 2 * bk * D + (MODS ? W : 0));
    if constexpr (kLowPrecision<S>) low.resize(2 * bk * W);
    T* P = scratch.data();     // [bk, W]: P^T
    T* dS = P + bk * W;        // [bk, W]: dS^T
    T* dk_acc = dS + bk * W;   // [bk, D]
    T* dv_acc = dk_acc + bk * D;
    T* th = dv_acc + bk * D;   // [W] tanh of one softcapped row (with modifiers)
    const int64_t b = t / (Hkv * nkb), g = (t / nkb) % Hkv, kb = t % nkb;
    const int64_t j0 = kb * bk, n = std::min(bk, lay.kv_len - j0);
    std::fill(dk_acc, dk_acc + n * D, T(0));
    std::fill(dv_acc, dv_acc + n * D, T(0));
    const bool* keys = km.keys(b, kb);
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const T* lse_h = LSE + (b * Hq + h) * lay.q_len;
      const T* delta_h = DELTA + (b * Hq + h) * lay.q_len;
      const T slope = md.slope(b, h);
      kept_blocks(kept, nkb, lay.seq(b, h), kb, lay.col_full_ptr, lay.col_full_idx, lay.col_part_ptr,
                  lay.col_part_idx, lay.col_part_tile, lay.tiles_t, bk * lay.words_t);
      for_each_run(kept, run_max, [&](size_t first, int64_t blocks) {
        const int64_t i0 = kept[first].idx * bq, w = std::min(blocks * bq, lay.q_len - i0);
        gemm_abt(n, w, D, K.at(b, g, j0), K.ss, Q, QT, b, h, i0, P, W);
        gemm_abt(n, w, D, V.at(b, g, j0), V.ss, DO, DOT, b, h, i0, dS, W);
        bool tiled = false;
        for (int64_t i = 0; i < blocks; ++i) tiled |= kept[first + i].tile != nullptr;
        for (int64_t j = 0; j < n; ++j) {
          T* p = P + j * W;
          T* ds = dS + j * W;
          if (keys && !keys[j]) {  // a masked key: no weight, no gradient
            std::fill(p, p + w, T(0));
            std::fill(ds, ds + w, T(0));
            continue;
          }
          if constexpr (MODS) {
            // Key jj against queries i0 + c: rel = jj - (i0 + c + Skv - Sq), diagonal jj - i0 - c + Sq - 1.
            const int64_t jj = j0 + j;
            modify_row_(p, w, scale, md.cap, th, slope, jj - (i0 + lay.kv_len - lay.q_len), -1,
                        md.bias_rev(h, jj - i0 + lay.q_len - 1));
          } else if (tiled) {  // masked after scaling, so that a negative scale cannot turn -inf into +inf
            scale_by(p, w, scale);
          }
          if (MODS || tiled) {
            for (int64_t i = 0; i < blocks && tiled; ++i) {
              const int64_t c0 = i * bq;
              if (const int32_t* tile = kept[first + i].tile)
                mask_tile_(p + c0, std::min(bq, w - c0), tile + j * lay.words_t);
            }
            scale_sub_exp(p, w, T(1), lse_h + i0);
          } else {
            scale_sub_exp(p, w, scale, lse_h + i0);
          }
          if (MODS && md.cap != 0) {
            dsoftmax(ds, p, w, delta_h + i0, 1, T(1));
            softcap_grad_(ds, th, w, scale);
          } else {
            dsoftmax(ds, p, w, delta_h + i0, 1, scale);
          }
        }
        gemm(false, n, D, w, to_storage(P, low.data(), n, w, W), W, DO.at(b, h, i0), DO.ss, dv_acc, D, true);
        gemm(false, n, D, w, to_storage(dS, low.data() + (kLowPrecision<S> ? bk * W : 0), n, w, W), W,
             Q.at(b, h, i0), Q.ss, dk_acc, D, true);
      });
    }
    for (int64_t j = 0; j < n; ++j) {
      store_row(dk_acc + j * D, DK.at(b, g, j0 + j), D, T(1));
      store_row(dv_acc + j * D, DV.at(b, g, j0 + j), D, T(1));
    }
  });
  return {dk, dv};
}

// The modifiers in T, checked against the problem: softcap 0 for none; slopes [1 or B, Hq]; rel_bias and
// its reverse [Hq, Sq + Skv - 1], contiguous.
template <typename T>
Mods<T> mods_of(double softcap, const std::optional<at::Tensor>& slopes, const std::optional<at::Tensor>& rel,
                const std::optional<at::Tensor>& rel_rev, const at::Tensor& q, const Layout& lay) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  const int64_t B = q.size(0), Hq = q.size(1);
  Mods<T> md;
  TORCH_CHECK(softcap >= 0 && std::isfinite(softcap), "softcap must be finite and >= 0 (0: none)");
  md.cap = static_cast<T>(softcap);
  md.diags = lay.q_len + lay.kv_len - 1;
  if (slopes.has_value() && slopes->defined()) {
    TORCH_CHECK(slopes->scalar_type() == dtype && slopes->is_contiguous() && slopes->dim() == 2 &&
                    (slopes->size(0) == 1 || slopes->size(0) == B) && slopes->size(1) == Hq,
                "alibi_slopes must be contiguous [1 or B, Hq] in the kernel's accumulation dtype");
    md.slopes = slopes->data_ptr<T>();
    md.slopes_b = slopes->size(0) == 1 ? 0 : Hq;
  }
  auto check_bias = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.dim() == 2 && t.size(0) == Hq &&
                    t.size(1) == md.diags,
                name, " must be contiguous [Hq, Sq + Skv - 1] in the kernel's accumulation dtype");
    return t.data_ptr<T>();
  };
  if (rel.has_value() && rel->defined()) md.rel = check_bias(*rel, "rel_bias");
  if (rel_rev.has_value() && rel_rev->defined()) {
    TORCH_CHECK(md.rel != nullptr, "rel_bias_rev needs rel_bias");
    md.rel_rev = check_bias(*rel_rev, "rel_bias_rev");
  }
  return md;
}

template <typename S, typename T = acc_t<S>>
std::vector<at::Tensor> forward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                      const Layout& lay, const std::optional<at::Tensor>& key_mask,
                                      const std::optional<at::Tensor>& block_masked, double scale,
                                      double softcap, const std::optional<at::Tensor>& slopes,
                                      const std::optional<at::Tensor>& rel, at::TensorList transposed) {
  const auto km = key_mask_of<T>(key_mask, block_masked, lay);
  const auto md = mods_of<T>(softcap, slopes, rel, std::nullopt, q, lay);
  const auto tr = transposed_of<S>(transposed, {&k});
  return md.any() ? forward_impl<S, true>(q, k, v, tr[0], lay, km, scale, md)
                  : forward_impl<S, false>(q, k, v, tr[0], lay, km, scale, md);
}

// {dq, dk, dv}, and d_rel_bias after them when there is a rel_bias.
template <typename S, typename T = acc_t<S>>
std::vector<at::Tensor> backward_typed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta,
                                       const Layout& lay, const std::optional<at::Tensor>& key_mask,
                                       const std::optional<at::Tensor>& block_masked, double scale,
                                       double softcap, const std::optional<at::Tensor>& slopes,
                                       const std::optional<at::Tensor>& rel,
                                       const std::optional<at::Tensor>& rel_rev, at::TensorList transposed) {
  constexpr auto acc = c10::CppTypeToScalarType<T>::value;
  TORCH_CHECK(lse.scalar_type() == acc && delta.scalar_type() == acc,
              "lse and delta must be in the kernel's accumulation dtype");
  const auto km = key_mask_of<T>(key_mask, block_masked, lay);
  const auto md = mods_of<T>(softcap, slopes, rel, rel_rev, q, lay);
  const auto tr = transposed_of<S>(transposed, {&q, &k, &v, &dout});
  std::vector<at::Tensor> dq, dkdv;
  if (md.any()) {
    TORCH_CHECK(md.rel == nullptr || md.rel_rev != nullptr, "the backward needs rel_bias_rev with rel_bias");
    dq = backward_dq_impl<S, true>(q, k, v, dout, lse, delta, tr[1], tr[2], lay, km, scale, md);
    dkdv = backward_dkdv_impl<S, true>(q, k, v, dout, lse, delta, tr[0], tr[3], lay, km, scale, md);
  } else {
    dq = backward_dq_impl<S, false>(q, k, v, dout, lse, delta, tr[1], tr[2], lay, km, scale, md);
    dkdv = backward_dkdv_impl<S, false>(q, k, v, dout, lse, delta, tr[0], tr[3], lay, km, scale, md);
  }
  std::vector<at::Tensor> out{dq[0], dkdv[0], dkdv[1]};
  if (dq.size() > 1) out.push_back(dq[1]);
  return out;
}

// q, k, v (and dout) share one dtype, float32, float64, bfloat16 or float16, and are [B, H, S, D] with a
// contiguous last dimension; a per-batch layout has B elements.
void check_inputs(std::initializer_list<std::pair<const at::Tensor*, const char*>> tensors, const Layout& lay) {
  const at::Tensor& q = *tensors.begin()->first;
  for (auto& [t, name] : tensors) {
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, name, " must be 4-D with a contiguous last dimension");
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), name, " must have q's dtype");
  }
  TORCH_CHECK(lay.batch == 0 || lay.batch == q.size(0), "a per-batch layout of ", lay.batch,
              " elements for a batch of ", q.size(0));
}

// Runs f.template operator()<S>() for q's storage type S.
template <typename F>
std::vector<at::Tensor> by_dtype(const at::Tensor& q, F f) {
  switch (q.scalar_type()) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(BFloat16{});
    case at::kHalf: return f(Half{});
    default: TORCH_CHECK(false, "the CPU kernel takes float32, float64, bfloat16 or float16, got ", q.scalar_type());
  }
}

// Modifiers: softcap (0 for none), alibi_slopes, rel_bias (None for none), in the accumulation dtype
// (float64 for float64 inputs, else float32). `transposed`: bf16/fp16 only, [K^T] ([B, Hkv, D, Skv],
// contiguous last dimension); empty otherwise.
std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                at::TensorList layout, at::IntArrayRef ints, const at::Tensor& tiles_t,
                                const std::optional<at::Tensor>& key_mask,
                                const std::optional<at::Tensor>& block_masked, double scale, double softcap,
                                const std::optional<at::Tensor>& alibi_slopes,
                                const std::optional<at::Tensor>& rel_bias, at::TensorList transposed) {
  const Layout lay(layout, ints, tiles_t);
  check_inputs({{&q, "q"}, {&k, "k"}, {&v, "v"}}, lay);
  return by_dtype(q, [&](auto s) {
    return forward_typed<decltype(s)>(q, k, v, lay, key_mask, block_masked, scale, softcap, alibi_slopes,
                                      rel_bias, transposed);
  });
}

// As forward, and rel_bias_rev: rel_bias reversed along its last dimension (given with rel_bias); lse and
// delta in the accumulation dtype; `transposed`: bf16/fp16 only, [Q^T, K^T, V^T, dO^T].
std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& dout, const at::Tensor& lse, const at::Tensor& delta,
                                 at::TensorList layout, at::IntArrayRef ints, const at::Tensor& tiles_t,
                                 const std::optional<at::Tensor>& key_mask,
                                 const std::optional<at::Tensor>& block_masked, double scale, double softcap,
                                 const std::optional<at::Tensor>& alibi_slopes,
                                 const std::optional<at::Tensor>& rel_bias,
                                 const std::optional<at::Tensor>& rel_bias_rev, at::TensorList transposed) {
  const Layout lay(layout, ints, tiles_t);
  check_inputs({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}}, lay);
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "lse and delta must be contiguous");
  return by_dtype(q, [&](auto s) {
    return backward_typed<decltype(s)>(q, k, v, dout, lse, delta, lay, key_mask, block_masked, scale, softcap,
                                       alibi_slopes, rel_bias, rel_bias_rev, transposed);
  });
}

}  // namespace

// Registered as torch.ops.<SPARSE_ATTN_NAMESPACE>.{forward,backward}, one namespace per ISA build (the
// builds may be loaded side by side); no pybind11: the build stays short.
#ifndef SPARSE_ATTN_NAMESPACE
#define SPARSE_ATTN_NAMESPACE sparse_attn_cpu
#endif
#define SPARSE_ATTN_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
SPARSE_ATTN_LIBRARY(SPARSE_ATTN_NAMESPACE, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
