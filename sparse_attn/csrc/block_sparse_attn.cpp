// Block-sparse flash attention on the CPU: forward, dQ and dK/dV, walking a `BlockLayout` directly.
//
// Algorithm
//   Forward, one task per (batch, query head, query block): for each key block the layout keeps in that
//   row, S = Q K^T (one GEMM), scale, mask (a partial block's bit-packed tile; the key mask), online
//   softmax with a running row max and row sum, O += P V (one GEMM). Full blocks get no tile work.
//   Backward in two passes, FlashAttention-2 style, recomputing P from the saved logsumexp:
//   - dQ, one task per (batch, query head, query block): dP = dO V^T, dS = P (dP - delta), dQ += dS K;
//   - dK/dV, one task per (batch, KV head, key block), walking the layout's columns for every query head
//     of the group: S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q.
//   Every task writes only its own rows, so there are no atomics and the result does not depend on the
//   thread count or on which thread ran which task.
//
// Inputs (prepared by sparse_attn/backends/cpu_kernel.py): everything in the accumulation type `acc_t`
// (float, or double for gradcheck), last dimension contiguous; K^T, V^T, Q^T and dO^T pre-transposed per
// block (``[B, H, nblocks, D, block]``, zero padded) so that every GEMM reads plain row-major operands;
// key-masked keys zeroed in K and V (a masked key may hold NaN) and their scores masked to -inf here.
//
// GEMMs: float through `at::native::cpublas::brgemm` (oneDNN's JIT micro-kernel where the CPU allows,
// else the BLAS PyTorch links); double through a plain loop (small gradcheck sizes only).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

namespace {

using at::vec::Vectorized;

// C[M, N] (+)= A[M, K] B[K, N], row-major, leading dimensions in elements.
inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool add) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, /*is_vnni=*/false);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B,
                 int64_t ldb, double* C, int64_t ldc, bool add) {
  for (int64_t i = 0; i < M; ++i) {
    double* c = C + i * ldc;
    if (!add) std::fill(c, c + N, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = A[i * lda + k];
      const double* b = B + k * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

inline Vectorized<float> vexp(const Vectorized<float>& x) { return x.exp_u20(); }
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// y[0:n] = x[0:n] * a (+ b), vectorized with a tail.
template <typename T>
inline void scale_add(T* x, int64_t n, T a, T b) {
  using V = Vectorized<T>;
  int64_t c = 0;
  for (; c + V::size() <= n; c += V::size()) (V::loadu(x + c) * V(a) + V(b)).store(x + c);
  if (c < n) (V::loadu(x + c, n - c) * V(a) + V(b)).store(x + c, n - c);
}

template <typename T>
inline T row_max(const T* x, int64_t n) {
  T m = neg_inf<T>();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, x[c]);
  return m;
}

// x = exp(x - m) in place; returns the sum.
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
  T sum = at::vec::vec_reduce_all<T>([](V& a, V& b) { return a + b; }, acc);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] - m);
    sum += x[c];
  }
  return sum;
}

// x[c] = -inf where bit c of the packed row `bits` is 0.
template <typename T>
inline void apply_tile(T* x, int64_t n, const int32_t* bits) {
  for (int64_t c = 0; c < n; ++c) {
    const bool visible = (static_cast<uint32_t>(bits[c >> 5]) >> (c & 31)) & 1u;
    x[c] = visible ? x[c] : neg_inf<T>();
  }
}

// x[c] = -inf where the key mask hides key c.
template <typename T>
inline void apply_key_mask(T* x, int64_t n, const bool* real) {
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

// The layout's CSR lists (see sparse_attn/layout.py) and geometry.
struct Layout {
  int64_t heads, q_len, kv_len, bq, bk, nqb, nkb, words, words_t;
  const int32_t *row_full_ptr, *row_full_idx, *row_part_ptr, *row_part_idx, *row_part_tile;
  const int32_t *col_full_ptr, *col_full_idx, *col_part_ptr, *col_part_idx, *col_part_tile;
  const int32_t *tiles, *tiles_t;

  Layout(at::TensorList t, at::IntArrayRef ints, const at::Tensor& tiles_t_)
      : heads(ints[4]), q_len(ints[0]), kv_len(ints[1]), bq(ints[2]), bk(ints[3]) {
    nqb = (q_len + bq - 1) / bq;
    nkb = (kv_len + bk - 1) / bk;
    words = (bk + 31) / 32;
    words_t = (bq + 31) / 32;
    const int32_t** fields[] = {&row_full_ptr, &row_full_idx, &row_part_ptr, &row_part_idx,
                                &row_part_tile, &col_full_ptr, &col_full_idx, &col_part_ptr,
                                &col_part_idx, &col_part_tile, &tiles};
    for (size_t i = 0; i < 11; ++i) *fields[i] = t[i].data_ptr<int32_t>();
    tiles_t = tiles_t_.data_ptr<int32_t>();
  }
  // Layout head of query head h.
  int64_t head(int64_t h) const { return heads == 1 ? 0 : h; }
};

// Runs f(task) for every task on torch's intra-op threads; tasks are handed out one at a time, the
// costliest first, so that threads finish together. f(task, scratch) owns its outputs.
template <typename F>
void run_tasks(const std::vector<int64_t>& order, F f) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(order.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(order[i]);
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
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
template <typename T>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                                     const Layout& lay, const KeyMask<T>& km, double scale_) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = v.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nqb = lay.nqb;
  const T scale = static_cast<T>(scale_);
  auto out = at::empty({B, Hq, lay.q_len, D}, q.options());
  auto lse = at::empty({B, Hq, lay.q_len}, q.options());
  const Strided<T> Q(q), V(v), O(out);
  const T* KT = kt.data_ptr<T>();  // [B, Hkv, nkb, D, bk]
  T* L = lse.data_ptr<T>();

  std::vector<int64_t> cost(B * Hq * nqb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t l = lay.head((t / nqb) % Hq), qb = t % nqb;
    cost[t] = count(lay.row_full_ptr, nqb, l, qb) + count(lay.row_part_ptr, nqb, l, qb);
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    scratch.resize(bq * bk + bq * D + 2 * bq);
    T* S = scratch.data();       // [bq, bk] scores, then probabilities
    T* acc = S + bq * bk;        // [bq, D] unnormalised output
    T* mx = acc + bq * D;        // [bq] running max (scaled scores)
    T* sum = mx + bq;            // [bq] running sum of exp
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb, g = h / group;
    const int64_t l = lay.head(h), i0 = qb * bq, m = std::min(bq, lay.q_len - i0);
    std::fill(acc, acc + m * D, T(0));
    std::fill(mx, mx + m, neg_inf<T>());
    std::fill(sum, sum + m, T(0));
    const T* q_rows = Q.at(b, h, i0);
    auto visit = [&](int64_t kb, const int32_t* tile) {
      const int64_t j0 = kb * bk, n = std::min(bk, lay.kv_len - j0);
      gemm(m, n, D, q_rows, Q.ss, KT + ((b * Hkv + g) * lay.nkb + kb) * D * bk, bk, S, bk, false);
      const bool* keys = km.keys(b, kb);
      for (int64_t r = 0; r < m; ++r) {
        T* s = S + r * bk;
        scale_add(s, n, scale, T(0));
        if (tile) apply_tile(s, n, tile + r * lay.words);
        if (keys) apply_key_mask(s, n, keys);
        const T new_max = std::max(mx[r], row_max(s, n));
        if (new_max == neg_inf<T>()) {  // nothing visible yet: weights 0
          std::fill(s, s + n, T(0));
          continue;
        }
        const T corr = std::exp(mx[r] - new_max);
        sum[r] = sum[r] * corr + exp_sum(s, n, new_max);
        mx[r] = new_max;
        if (corr != T(1)) scale_add(acc + r * D, D, corr, T(0));
      }
      gemm(m, D, n, S, bk, V.at(b, g, j0), V.ss, acc, D, true);
    };
    for (int64_t e = lay.row_full_ptr[l * (nqb + 1) + qb]; e < lay.row_full_ptr[l * (nqb + 1) + qb + 1]; ++e)
      visit(lay.row_full_idx[e], nullptr);
    for (int64_t e = lay.row_part_ptr[l * (nqb + 1) + qb]; e < lay.row_part_ptr[l * (nqb + 1) + qb + 1]; ++e)
      visit(lay.row_part_idx[e], lay.tiles + (int64_t)lay.row_part_tile[e] * bq * lay.words);
    T* lse_rows = L + (b * Hq + h) * lay.q_len + i0;
    for (int64_t r = 0; r < m; ++r) {
      T* o = O.at(b, h, i0 + r);
      if (sum[r] > T(0)) {
        const T inv = T(1) / sum[r];
        std::copy(acc + r * D, acc + (r + 1) * D, o);
        scale_add(o, D, inv, T(0));
        lse_rows[r] = mx[r] + std::log(sum[r]);
      } else {
        std::fill(o, o + D, T(0));
        lse_rows[r] = neg_inf<T>();
      }
    }
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------------
// backward: lse has +inf on rows that see nothing (so P recomputes to 0), delta = rowsum(dO O) - dlse.
template <typename T>
at::Tensor backward_dq_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& kt,
                            const at::Tensor& vt, const at::Tensor& dout, const at::Tensor& lse,
                            const at::Tensor& delta, const Layout& lay, const KeyMask<T>& km, double scale_) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nqb = lay.nqb;
  const T scale = static_cast<T>(scale_);
  auto dq = at::empty({B, Hq, lay.q_len, D}, q.options());
  const Strided<T> Q(q), K(k), DO(dout), DQ(dq);
  const T *KT = kt.data_ptr<T>(), *VT = vt.data_ptr<T>();
  const T *LSE = lse.data_ptr<T>(), *DELTA = delta.data_ptr<T>();

  std::vector<int64_t> cost(B * Hq * nqb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t l = lay.head((t / nqb) % Hq), qb = t % nqb;
    cost[t] = count(lay.row_full_ptr, nqb, l, qb) + count(lay.row_part_ptr, nqb, l, qb);
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    scratch.resize(2 * bq * bk + bq * D);
    T* P = scratch.data();   // [bq, bk]
    T* dS = P + bq * bk;     // [bq, bk]
    T* acc = dS + bq * bk;   // [bq, D]
    const int64_t b = t / (Hq * nqb), h = (t / nqb) % Hq, qb = t % nqb, g = h / group;
    const int64_t l = lay.head(h), i0 = qb * bq, m = std::min(bq, lay.q_len - i0);
    std::fill(acc, acc + m * D, T(0));
    const T* lse_rows = LSE + (b * Hq + h) * lay.q_len + i0;
    const T* delta_rows = DELTA + (b * Hq + h) * lay.q_len + i0;
    auto visit = [&](int64_t kb, const int32_t* tile) {
      const int64_t j0 = kb * bk, n = std::min(bk, lay.kv_len - j0);
      const int64_t blk = ((b * Hkv + g) * lay.nkb + kb) * D * bk;
      gemm(m, n, D, Q.at(b, h, i0), Q.ss, KT + blk, bk, P, bk, false);
      gemm(m, n, D, DO.at(b, h, i0), DO.ss, VT + blk, bk, dS, bk, false);
      const bool* keys = km.keys(b, kb);
      for (int64_t r = 0; r < m; ++r) {
        T* p = P + r * bk;
        T* ds = dS + r * bk;
        scale_add(p, n, scale, T(0));
        if (tile) apply_tile(p, n, tile + r * lay.words);
        if (keys) apply_key_mask(p, n, keys);
        exp_sum(p, n, lse_rows[r]);
        // dS = P (dP - delta) * scale, folded into one pass.
        for (int64_t c = 0; c < n; ++c) ds[c] = p[c] * (ds[c] - delta_rows[r]) * scale;
      }
      gemm(m, D, n, dS, bk, K.at(b, g, j0), K.ss, acc, D, true);
    };
    for (int64_t e = lay.row_full_ptr[l * (nqb + 1) + qb]; e < lay.row_full_ptr[l * (nqb + 1) + qb + 1]; ++e)
      visit(lay.row_full_idx[e], nullptr);
    for (int64_t e = lay.row_part_ptr[l * (nqb + 1) + qb]; e < lay.row_part_ptr[l * (nqb + 1) + qb + 1]; ++e)
      visit(lay.row_part_idx[e], lay.tiles + (int64_t)lay.row_part_tile[e] * bq * lay.words);
    for (int64_t r = 0; r < m; ++r) std::copy(acc + r * D, acc + (r + 1) * D, DQ.at(b, h, i0 + r));
  });
  return dq;
}

template <typename T>
std::vector<at::Tensor> backward_dkdv_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& qt, const at::Tensor& dout,
                                           const at::Tensor& dot, const at::Tensor& lse,
                                           const at::Tensor& delta, const Layout& lay,
                                           const KeyMask<T>& km, double scale_) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const int64_t group = Hq / Hkv, bq = lay.bq, bk = lay.bk, nkb = lay.nkb, nqb = lay.nqb;
  const T scale = static_cast<T>(scale_);
  auto dk = at::empty({B, Hkv, lay.kv_len, D}, q.options());
  auto dv = at::empty({B, Hkv, lay.kv_len, D}, q.options());
  const Strided<T> Q(q), K(k), V(v), DO(dout), DK(dk), DV(dv);
  const T *QT = qt.data_ptr<T>(), *DOT = dot.data_ptr<T>();  // [B, Hq, nqb, D, bq]
  const T *LSE = lse.data_ptr<T>(), *DELTA = delta.data_ptr<T>();

  std::vector<int64_t> cost(B * Hkv * nkb);
  for (int64_t t = 0; t < (int64_t)cost.size(); ++t) {
    const int64_t g = (t / nkb) % Hkv, kb = t % nkb;
    for (int64_t h = g * group; h < (g + 1) * group; ++h)
      cost[t] += count(lay.col_full_ptr, nkb, lay.head(h), kb) + count(lay.col_part_ptr, nkb, lay.head(h), kb);
  }
  run_tasks(by_cost(cost), [&](int64_t t) {
    thread_local std::vector<T> scratch;
    scratch.resize(2 * bk * bq + 2 * bk * D);
    T* P = scratch.data();     // [bk, bq]: P^T
    T* dS = P + bk * bq;       // [bk, bq]: dS^T
    T* dk_acc = dS + bk * bq;  // [bk, D]
    T* dv_acc = dk_acc + bk * D;
    const int64_t b = t / (Hkv * nkb), g = (t / nkb) % Hkv, kb = t % nkb;
    const int64_t j0 = kb * bk, n = std::min(bk, lay.kv_len - j0);
    std::fill(dk_acc, dk_acc + n * D, T(0));
    std::fill(dv_acc, dv_acc + n * D, T(0));
    const bool* keys = km.keys(b, kb);
    for (int64_t h = g * group; h < (g + 1) * group; ++h) {
      const int64_t l = lay.head(h);
      const T* lse_h = LSE + (b * Hq + h) * lay.q_len;
      const T* delta_h = DELTA + (b * Hq + h) * lay.q_len;
      auto visit = [&](int64_t qb, const int32_t* tile) {
        const int64_t i0 = qb * bq, m = std::min(bq, lay.q_len - i0);
        const int64_t blk = ((b * Hq + h) * nqb + qb) * D * bq;
        gemm(n, m, D, K.at(b, g, j0), K.ss, QT + blk, bq, P, bq, false);
        gemm(n, m, D, V.at(b, g, j0), V.ss, DOT + blk, bq, dS, bq, false);
        for (int64_t j = 0; j < n; ++j) {
          T* p = P + j * bq;
          T* ds = dS + j * bq;
          if (keys && !keys[j]) {
            std::fill(p, p + m, T(0));
            std::fill(ds, ds + m, T(0));
            continue;
          }
          scale_add(p, m, scale, T(0));
          if (tile) apply_tile(p, m, tile + j * lay.words_t);
          for (int64_t i = 0; i < m; ++i) p[i] -= lse_h[i0 + i];
          exp_sum(p, m, T(0));
          for (int64_t i = 0; i < m; ++i) ds[i] = p[i] * (ds[i] - delta_h[i0 + i]) * scale;
        }
        gemm(n, D, m, P, bq, DO.at(b, h, i0), DO.ss, dv_acc, D, true);
        gemm(n, D, m, dS, bq, Q.at(b, h, i0), Q.ss, dk_acc, D, true);
      };
      for (int64_t e = lay.col_full_ptr[l * (nkb + 1) + kb]; e < lay.col_full_ptr[l * (nkb + 1) + kb + 1]; ++e)
        visit(lay.col_full_idx[e], nullptr);
      for (int64_t e = lay.col_part_ptr[l * (nkb + 1) + kb]; e < lay.col_part_ptr[l * (nkb + 1) + kb + 1]; ++e)
        visit(lay.col_part_idx[e], lay.tiles_t + (int64_t)lay.col_part_tile[e] * bk * lay.words_t);
    }
    for (int64_t j = 0; j < n; ++j) {
      std::copy(dk_acc + j * D, dk_acc + (j + 1) * D, DK.at(b, g, j0 + j));
      std::copy(dv_acc + j * D, dv_acc + (j + 1) * D, DV.at(b, g, j0 + j));
    }
  });
  return {dk, dv};
}

void check_float_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be 4-D with a contiguous last dimension");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& v,
                                at::TensorList layout, at::IntArrayRef ints,
                                const at::Tensor& tiles_t, const std::optional<at::Tensor>& key_mask,
                                const std::optional<at::Tensor>& block_masked, double scale) {
  check_float_rows(q, "q");
  check_float_rows(v, "v");
  TORCH_CHECK(kt.is_contiguous(), "kt must be contiguous");
  const Layout lay(layout, ints, tiles_t);
  if (q.scalar_type() == at::kDouble)
    return forward_impl<double>(q, kt, v, lay, key_mask_of<double>(key_mask, block_masked, lay), scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat, "the CPU kernel computes in float32 or float64");
  return forward_impl<float>(q, kt, v, lay, key_mask_of<float>(key_mask, block_masked, lay), scale);
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& qt, const at::Tensor& kt, const at::Tensor& vt,
                                 const at::Tensor& dout, const at::Tensor& dot, const at::Tensor& lse,
                                 const at::Tensor& delta, at::TensorList layout, at::IntArrayRef ints, const at::Tensor& tiles_t,
                                 const std::optional<at::Tensor>& key_mask,
                                 const std::optional<at::Tensor>& block_masked, double scale) {
  for (auto& [t, name] : {std::pair{q, "q"}, {k, "k"}, {v, "v"}, {dout, "dout"}}) check_float_rows(t, name);
  TORCH_CHECK(qt.is_contiguous() && kt.is_contiguous() && vt.is_contiguous() && dot.is_contiguous(),
              "transposed blocks must be contiguous");
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "lse and delta must be contiguous");
  const Layout lay(layout, ints, tiles_t);
  if (q.scalar_type() == at::kDouble) {
    auto km = key_mask_of<double>(key_mask, block_masked, lay);
    auto dq = backward_dq_impl<double>(q, k, kt, vt, dout, lse, delta, lay, km, scale);
    auto dkdv = backward_dkdv_impl<double>(q, k, v, qt, dout, dot, lse, delta, lay, km, scale);
    return {dq, dkdv[0], dkdv[1]};
  }
  TORCH_CHECK(q.scalar_type() == at::kFloat, "the CPU kernel computes in float32 or float64");
  auto km = key_mask_of<float>(key_mask, block_masked, lay);
  auto dq = backward_dq_impl<float>(q, k, kt, vt, dout, lse, delta, lay, km, scale);
  auto dkdv = backward_dkdv_impl<float>(q, k, v, qt, dout, dot, lse, delta, lay, km, scale);
  return {dq, dkdv[0], dkdv[1]};
}

}  // namespace

// Registered as torch.ops.sparse_attn_cpu.{forward,backward} (no pybind11: the build stays short).
TORCH_LIBRARY(sparse_attn_cpu, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
