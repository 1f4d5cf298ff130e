// CPU kernels for the value lookup of product-key memory layers (memray.kernels, backend "cpp").
//
// Built on first use by torch.utils.cpp_extension.load (see cpu_ext.py) and registered as
// torch.ops.memray_cpu_bag.*. Only <torch/library.h> and <ATen/Parallel.h> are included: they
// parse in ~3 s, where <torch/extension.h> (pybind11 and the whole C++ API) takes ~20 s.
//
// Every output buffer is allocated by the caller (kernels/_alloc.py), so NaN-poisoning tests
// see any element these kernels fail to write.
//
// The lookup is memory bound: a step gathers nnz rows of a table far larger than any cache.
// The backward therefore visits each *touched row* once, in sorted row order, and produces in
// that single visit both the row's table gradient (sum over its entries of w[e] * grad_out of
// the entry's bag) and every entry's weight gradient (<table row, grad_out of the entry's
// bag>). grad_out ([bags, D], a few MB) stays in cache; the table is read once per touched
// row, and each output row is owned by one thread: no atomics, deterministic results.

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

using at::ScalarType;
using at::Tensor;

// Widening loads: bf16 -> fp32 is a shift; doing it by hand keeps the loops vectorisable.
template <typename A, typename T>
inline A widen(T x) {
  return static_cast<A>(x);
}
template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <>
inline double widen<double, c10::BFloat16>(c10::BFloat16 x) {
  return static_cast<double>(widen<float, c10::BFloat16>(x));
}

// Narrowing stores round exactly as torch's own dtype conversion does (via fp32 for bf16).
template <typename T, typename A>
inline T narrow(A x) {
  return static_cast<T>(x);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float x) {
  return c10::BFloat16(x);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16, double>(double x) {
  return c10::BFloat16(static_cast<float>(x));
}

// Dot products keep kLanes independent partial sums, which lets the compiler vectorise them
// without reassociation flags (and fixes the summation order: results are deterministic).
constexpr int64_t kLanes = 16;

template <typename A>
inline A sum_lanes(const A* part, A tail) {
  A total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += part[j];
  return total + tail;
}

// returns <row, g>
template <typename A>
inline A dot(const A* __restrict__ row, const A* __restrict__ g, int64_t D) {
  A part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) part[j] += row[d + j] * g[d + j];
  }
  A tail = 0;
  for (; d < D; ++d) tail += row[d] * g[d];
  return sum_lanes(part, tail);
}

// acc += w * x, widening x to the accumulation type.
template <typename A, typename T>
inline void axpy(A* __restrict__ acc, A w, const T* __restrict__ x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) acc[d] += w * widen<A>(x[d]);
}

// acc += w * g and returns <row, g>: one pass over g serves both gradients.
template <typename A>
inline A dot_axpy(const A* __restrict__ row, const A* __restrict__ g, A w, A* __restrict__ acc, int64_t D) {
  A part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      part[j] += row[d + j] * g[d + j];
      acc[d + j] += w * g[d + j];
    }
  }
  A tail = 0;
  for (; d < D; ++d) {
    tail += row[d] * g[d];
    acc[d] += w * g[d];
  }
  return sum_lanes(part, tail);
}

// Prefetches into L2 (locality hint 2): a non-temporal (L1-only) prefetch of whole 1 KB rows
// overflows the L1 fill buffers and measured ~1.4x slower in the backward.
inline void prefetch_row(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 2);
}

// Rows are prefetched this many entries ahead (across bag boundaries); 2 to 8 measured alike.
constexpr int64_t kPrefetchAhead = 4;

// out[b] = sum_{e in [offsets[b], offsets[b+1])} w[e] * table[indices[e]]
template <typename T, typename A>
void forward_kernel(const int64_t* indices, const A* weights, const T* table, int64_t stride_t, int64_t num_rows,
                    const int64_t* offsets, int64_t num_bags, int64_t D, A* out, int64_t stride_o,
                    std::atomic<int64_t>* bad_index) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  // 16 bags of 128 entries per task keeps both threads busy on small batches too.
  at::parallel_for(0, num_bags, 16, [&](int64_t b0, int64_t b1) {
    const int64_t last = offsets[b1];  // this task's entries are [offsets[b0], last)
    for (int64_t b = b0; b < b1; ++b) {
      A* __restrict__ o = out + b * stride_o;  // [D]
      for (int64_t d = 0; d < D; ++d) o[d] = 0;
      for (int64_t e = offsets[b]; e < offsets[b + 1]; ++e) {
        if (e + kPrefetchAhead < last) {
          const int64_t ahead = indices[e + kPrefetchAhead];
          if (ahead >= 0 && ahead < num_rows) prefetch_row(table + ahead * stride_t, row_bytes);
        }
        const int64_t row = indices[e];
        if (row < 0 || row >= num_rows) {
          bad_index->store(row, std::memory_order_relaxed);
          continue;
        }
        axpy(o, weights[e], table + row * stride_t, D);
      }
    }
  });
}

// For each touched row u (entries order[seg[u]] .. order[seg[u+1]-1], all reading rows[u]).
// grad_out rows ([bags, D], a few MB) stay cache resident, so only table rows are prefetched.
//   grad_weights[e]  = <table[rows[u]], grad_out[bag[e]]>     (kWeights)
//   sink(u, acc)     with acc = sum_e w[e] * grad_out[bag[e]]  (kTable: the row's gradient)
// The sink either stores the row's gradient or applies an optimizer rule to the row in place:
// all entries of a row are visited before its sink runs, so every weight gradient reads the row
// as it was before the update.
template <typename T, typename A, bool kWeights, bool kTable, typename Sink>
void backward_kernel(const A* grad_out, int64_t stride_g, const int64_t* bag_ids, const A* weights, const T* table,
                     int64_t stride_t, const int64_t* order, const int64_t* seg, const int64_t* rows,
                     int64_t num_unique, int64_t D, A* grad_weights, Sink&& sink) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, num_unique, 64, [&](int64_t u0, int64_t u1) {
    constexpr bool kWiden = !std::is_same_v<T, A>;
    std::vector<A> row_buf(kWeights && kWiden ? D : 0);  // the table row, widened
    std::vector<A> acc(kTable ? D : 0);                  // the row's gradient being summed
    const A* r = row_buf.data();
    A* __restrict__ a = acc.data();
    for (int64_t u = u0; u < u1; ++u) {
      if (kWeights) {
        if (u + kPrefetchAhead < u1) prefetch_row(table + rows[u + kPrefetchAhead] * stride_t, row_bytes);
        const T* t = table + rows[u] * stride_t;
        if constexpr (kWiden) {
          A* __restrict__ widened = row_buf.data();
          for (int64_t d = 0; d < D; ++d) widened[d] = widen<A>(t[d]);
        } else {
          r = t;
        }
      }
      if (kTable) std::fill(acc.begin(), acc.end(), A(0));
      for (int64_t k = seg[u]; k < seg[u + 1]; ++k) {
        const int64_t e = order[k];
        const A* g = grad_out + bag_ids[e] * stride_g;  // [D]
        if (kWeights && kTable) {
          grad_weights[e] = dot_axpy(r, g, weights[e], a, D);
        } else if (kWeights) {
          grad_weights[e] = dot(r, g, D);
        } else {
          axpy(a, weights[e], g, D);
        }
      }
      if (kTable) sink(u, static_cast<const A*>(a));
    }
  });
}

// ---- optimizer rules for one touched row -------------------------------------------------------
//
// rule(r, w, g, D) updates table row r (at w) with its fp32 gradient g. rows[] are unique, so
// each row has one writer (no atomics). The same rule objects serve the optimizer step over
// precomputed row gradients and the lookup's backward that updates rows as it sums them.

// Exact row-wise Adagrad. With g' = g + wd * w:
//   sum_sq[r] += mean(g'^2);   w_r -= lr * g' / (sqrt(sum_sq[r]) + eps)
// The unfused torch sequence reads and writes [U, D] temporaries five times; this reads the
// gradient once and the row twice (both from cache), and writes the row once.
struct AdagradRule {
  float* sum_sq;
  float lr, eps, wd;

  template <typename T>
  void operator()(int64_t r, T* __restrict__ w, const float* __restrict__ g, int64_t D) const {
    float part[kLanes] = {};
    int64_t d = 0;
    for (; d + kLanes <= D; d += kLanes) {
      for (int64_t j = 0; j < kLanes; ++j) {
        const float gd = g[d + j] + wd * widen<float>(w[d + j]);
        part[j] += gd * gd;
      }
    }
    float tail = 0;
    for (; d < D; ++d) {
      const float gd = g[d] + wd * widen<float>(w[d]);
      tail += gd * gd;
    }
    const float acc = sum_sq[r] + sum_lanes(part, tail) / static_cast<float>(D);
    sum_sq[r] = acc;
    const float scale = lr / (std::sqrt(acc) + eps);
    for (d = 0; d < D; ++d) {
      const float w_old = widen<float>(w[d]);
      w[d] = narrow<T>(w_old - scale * (g[d] + wd * w_old));
    }
  }
};

// Lazy Adam / AdamW, moments stored as S. Per row r:
// t = ++row_step[r]; g' = g + wd * w (L2) or w *= 1 - lr * wd (decoupled);
// m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2 (stored rounded to S; the update uses the
// fp32 values); w -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps * sqrt(1 - b2^t)).
template <typename S>
struct AdamRule {
  S* exp_avg;
  S* exp_avg_sq;
  int64_t stride_s;
  int32_t* row_step;
  double lr, beta1, beta2, eps, wd;
  bool decoupled;

  template <typename T>
  void operator()(int64_t r, T* __restrict__ w, const float* __restrict__ g, int64_t D) const {
    const float b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
    const float l2 = decoupled ? 0.0f : static_cast<float>(wd);
    const float shrink = decoupled ? static_cast<float>(1.0 - lr * wd) : 1.0f;
    const int32_t t = ++row_step[r];
    const double bias1 = 1.0 - std::pow(beta1, t), bias2_sqrt = std::sqrt(1.0 - std::pow(beta2, t));
    const float step = static_cast<float>(lr * bias2_sqrt / bias1);
    const float eps_t = static_cast<float>(eps * bias2_sqrt);
    S* __restrict__ m = exp_avg + r * stride_s;
    S* __restrict__ v = exp_avg_sq + r * stride_s;
    for (int64_t d = 0; d < D; ++d) {
      float w_old = widen<float>(w[d]);
      const float gd = g[d] + l2 * w_old;
      w_old *= shrink;
      const float md = widen<float>(m[d]) + (1.0f - b1) * (gd - widen<float>(m[d]));
      const float vd = b2 * widen<float>(v[d]) + (1.0f - b2) * gd * gd;
      m[d] = narrow<S>(md);
      v[d] = narrow<S>(vd);
      w[d] = narrow<T>(w_old - step * md / (std::sqrt(vd) + eps_t));
    }
  }
};

// SGD: w -= lr * (g + wd * w).
struct SgdRule {
  float lr, wd;

  template <typename T>
  void operator()(int64_t, T* __restrict__ w, const float* __restrict__ g, int64_t D) const {
    for (int64_t d = 0; d < D; ++d) {
      const float w_old = widen<float>(w[d]);
      w[d] = narrow<T>(w_old - lr * (g[d] + wd * w_old));
    }
  }
};

// Applies rule to each touched row u with its gradient grads[u], in parallel, with the rows a
// few steps ahead prefetched.
template <typename T, typename Rule>
void row_update_kernel(T* table, int64_t stride_t, const int64_t* rows, const float* grads, int64_t stride_g,
                       int64_t num_unique, int64_t D, const Rule& rule) {
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, num_unique, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (u + kPrefetchAhead < u1) prefetch_row(table + rows[u + kPrefetchAhead] * stride_t, row_bytes);
      rule(rows[u], table + rows[u] * stride_t, grads + u * stride_g, D);
    }
  });
}

// ----------------------------------------------------------------------------------------------
// Op wrappers: argument checks, then dispatch on (table dtype, accumulation dtype).
// ----------------------------------------------------------------------------------------------

// An optional output's (or input's) data, or nullptr when it is absent.
template <typename S>
S* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<S>() : nullptr;
}

void check_1d(const Tensor& t, ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

void check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && (t.size(1) <= 1 || t.stride(1) == 1), name, " must be 2-D with unit stride along D");
}

ScalarType acc_type(const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == ScalarType::Float || t.scalar_type() == ScalarType::Double,
              "accumulation dtype must be float32 or float64, got ", t.scalar_type());
  return t.scalar_type();
}

// Calls fn(T*, A*) with the typed null pointers matching the (table, accumulation) dtypes.
template <typename Fn>
void dispatch(ScalarType table_dtype, ScalarType acc_dtype, Fn&& fn) {
  const bool f64 = acc_dtype == ScalarType::Double;
  switch (table_dtype) {
    case ScalarType::Float:
      return f64 ? fn((float*)nullptr, (double*)nullptr) : fn((float*)nullptr, (float*)nullptr);
    case ScalarType::Double:
      TORCH_CHECK(f64, "a float64 table needs float64 accumulation");
      return fn((double*)nullptr, (double*)nullptr);
    case ScalarType::BFloat16:
      return f64 ? fn((c10::BFloat16*)nullptr, (double*)nullptr) : fn((c10::BFloat16*)nullptr, (float*)nullptr);
    default:
      TORCH_CHECK(false, "table dtype must be float32, float64 or bfloat16, got ", table_dtype);
  }
}

void bag_forward(const Tensor& indices, const Tensor& weights, const Tensor& table, const Tensor& offsets,
                 const Tensor& out) {
  check_1d(indices, ScalarType::Long, "indices");
  check_1d(offsets, ScalarType::Long, "offsets");
  check_rows(table, "table");
  check_rows(out, "out");
  const ScalarType acc = acc_type(out);
  check_1d(weights, acc, "weights");
  const int64_t num_bags = offsets.numel() - 1, D = table.size(1);
  TORCH_CHECK(num_bags >= 0 && out.size(0) == num_bags && out.size(1) == D, "out must be [bags, D]");
  TORCH_CHECK(weights.numel() == indices.numel(), "weights and indices differ in length");
  // An out-of-range index is recorded (any one of them) and reported after the parallel loop.
  std::atomic<int64_t> bad_index{INT64_MIN};
  dispatch(table.scalar_type(), acc, [&](auto* t_tag, auto* a_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    forward_kernel<T, A>(indices.data_ptr<int64_t>(), weights.data_ptr<A>(), table.data_ptr<T>(), table.stride(0),
                         table.size(0), offsets.data_ptr<int64_t>(), num_bags, D, out.data_ptr<A>(), out.stride(0),
                         &bad_index);
  });
  const int64_t bad = bad_index.load();
  TORCH_CHECK_INDEX(bad == INT64_MIN, "index ", bad, " is out of range for a table of ", table.size(0), " rows");
}

// The kernels index raw memory, so every index they follow is checked before they run.
void check_range(const Tensor& t, int64_t limit, const char* name) {
  const int64_t* p = t.data_ptr<int64_t>();
  const int64_t n = t.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(p[i] >= 0 && p[i] < limit, name, "[", i, "] = ", p[i], " is out of range [0, ", limit, ")");
  }
}

// Checks of the backward's CSR inputs (every index a kernel follows is range-checked).
void check_backward(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights, const Tensor& table,
                    const Tensor& order, const Tensor& seg, const Tensor& rows,
                    const std::optional<Tensor>& grad_weights) {
  check_rows(grad_out, "grad_out");
  check_rows(table, "table");
  check_1d(bag_ids, ScalarType::Long, "bag_ids");
  check_1d(order, ScalarType::Long, "order");
  check_1d(seg, ScalarType::Long, "seg");
  check_1d(rows, ScalarType::Long, "rows");
  const ScalarType acc = acc_type(grad_out);
  check_1d(weights, acc, "weights");
  const int64_t nnz = order.numel(), num_unique = rows.numel(), D = table.size(1);
  TORCH_CHECK(grad_out.size(1) == D, "grad_out and table differ in D");
  TORCH_CHECK(bag_ids.numel() == nnz && weights.numel() == nnz, "bag_ids, weights and order differ in length");
  TORCH_CHECK(seg.numel() == num_unique + 1, "seg must be [unique rows + 1]");
  if (grad_weights) check_1d(*grad_weights, acc, "grad_weights");
  if (grad_weights) TORCH_CHECK(grad_weights->numel() == nnz, "grad_weights must be [nnz]");
  check_range(rows, table.size(0), "rows");
  check_range(bag_ids, grad_out.size(0), "bag_ids");
  check_range(order, nnz, "order");
  const int64_t* s = seg.data_ptr<int64_t>();
  for (int64_t u = 0; u < num_unique; ++u) {
    TORCH_CHECK(s[u] <= s[u + 1], "seg must be non-decreasing");
  }
  TORCH_CHECK(num_unique == 0 || (s[0] >= 0 && s[num_unique] <= nnz), "seg must lie within [0, nnz]");
}

// Runs backward_kernel with the weights' gradient when grad_weights is given.
template <typename T, typename A, bool kTable, typename Sink>
void run_backward(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights, const Tensor& table,
                  const Tensor& order, const Tensor& seg, const Tensor& rows, const std::optional<Tensor>& grad_weights,
                  Sink&& sink) {
  A* gw = data_or_null<A>(grad_weights);
  auto run = [&](auto kernel) {
    kernel(grad_out.data_ptr<A>(), grad_out.stride(0), bag_ids.data_ptr<int64_t>(), weights.data_ptr<A>(),
           table.data_ptr<T>(), table.stride(0), order.data_ptr<int64_t>(), seg.data_ptr<int64_t>(),
           rows.data_ptr<int64_t>(), rows.numel(), table.size(1), gw, sink);
  };
  if (gw) {
    run(backward_kernel<T, A, true, kTable, Sink&>);
  } else if (kTable) {
    run(backward_kernel<T, A, false, kTable, Sink&>);
  }
}

void bag_backward(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights, const Tensor& table,
                  const Tensor& order, const Tensor& seg, const Tensor& rows, const std::optional<Tensor>& grad_weights,
                  const std::optional<Tensor>& row_grads) {
  check_backward(grad_out, bag_ids, weights, table, order, seg, rows, grad_weights);
  const int64_t D = table.size(1);
  if (row_grads) {
    check_rows(*row_grads, "row_grads");
    TORCH_CHECK(row_grads->scalar_type() == table.scalar_type(), "row_grads must have the table's dtype");
    TORCH_CHECK(row_grads->size(0) == rows.numel() && row_grads->size(1) == D, "row_grads must be [unique rows, D]");
  }
  dispatch(table.scalar_type(), acc_type(grad_out), [&](auto* t_tag, auto* a_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    using A = std::remove_pointer_t<decltype(a_tag)>;
    if (row_grads) {
      T* out = row_grads->data_ptr<T>();
      const int64_t stride_r = row_grads->stride(0);
      auto store = [&](int64_t u, const A* a) {
        T* o = out + u * stride_r;
        for (int64_t d = 0; d < D; ++d) o[d] = narrow<T>(a[d]);
      };
      run_backward<T, A, true>(grad_out, bag_ids, weights, table, order, seg, rows, grad_weights, store);
    } else {
      auto none = [](int64_t, const A*) {};
      run_backward<T, A, false>(grad_out, bag_ids, weights, table, order, seg, rows, grad_weights, none);
    }
  });
}

// Checks shared by the fused optimizer updates; returns the unique, increasing rows.
const int64_t* check_row_update(const Tensor& table, const Tensor& rows) {
  check_rows(table, "table");
  check_1d(rows, ScalarType::Long, "rows");
  TORCH_CHECK(table.scalar_type() == ScalarType::Float || table.scalar_type() == ScalarType::BFloat16,
              "fused row updates take float32 or bfloat16 tables, got ", table.scalar_type());
  check_range(rows, table.size(0), "rows");
  const int64_t* r = rows.data_ptr<int64_t>();
  for (int64_t u = 1; u < rows.numel(); ++u) {
    TORCH_CHECK(r[u - 1] < r[u], "rows must be strictly increasing (unique)");
  }
  return r;
}

// Where a rule's updates come from: precomputed row gradients (an optimizer step), or the
// lookup's backward summing them row by row (the update fused into the backward). The backward
// form also writes the weights' gradient and each row gradient's squared norm (row_sq [U]).
struct RowGradients {
  // step form
  const Tensor* row_grads = nullptr;
  // backward form
  const Tensor *grad_out = nullptr, *bag_ids = nullptr, *weights = nullptr, *order = nullptr, *seg = nullptr;
  const std::optional<Tensor>* grad_weights = nullptr;
  const std::optional<Tensor>* row_sq = nullptr;
};

template <typename Rule>
void apply_rule(const Tensor& table, const Tensor& rows, const RowGradients& src, const Rule& rule) {
  const int64_t* r = check_row_update(table, rows);
  const int64_t num_unique = rows.numel(), D = table.size(1);
  if (src.row_grads) {
    const Tensor& g = *src.row_grads;
    check_rows(g, "row_grads");
    TORCH_CHECK(g.scalar_type() == ScalarType::Float, "row_grads must be float32");
    TORCH_CHECK(g.size(0) == num_unique && g.size(1) == D, "row_grads must be [rows, D]");
  } else {
    check_backward(*src.grad_out, *src.bag_ids, *src.weights, table, *src.order, *src.seg, rows, *src.grad_weights);
    TORCH_CHECK(src.grad_out->scalar_type() == ScalarType::Float, "a fused backward update accumulates in float32");
    if (*src.row_sq) {
      check_1d(**src.row_sq, ScalarType::Float, "row_sq");
      TORCH_CHECK((*src.row_sq)->numel() == num_unique, "row_sq must be [unique rows]");
    }
  }
  auto run = [&](auto* t_tag) {
    using T = std::remove_pointer_t<decltype(t_tag)>;
    T* w = table.data_ptr<T>();
    const int64_t stride_t = table.stride(0);
    if (src.row_grads) {
      return row_update_kernel(w, stride_t, r, src.row_grads->data_ptr<float>(), src.row_grads->stride(0),
                               num_unique, D, rule);
    }
    float* sq = *src.row_sq ? (*src.row_sq)->data_ptr<float>() : nullptr;
    auto update = [&](int64_t u, const float* a) {
      if (sq) sq[u] = dot(a, a, D);
      rule(r[u], w + r[u] * stride_t, a, D);
    };
    run_backward<T, float, true>(*src.grad_out, *src.bag_ids, *src.weights, table, *src.order, *src.seg, rows,
                                 *src.grad_weights, update);
  };
  if (table.scalar_type() == ScalarType::Float) return run((float*)nullptr);
  run((c10::BFloat16*)nullptr);
}

AdagradRule adagrad_rule(const Tensor& table, const Tensor& sum_sq, double lr, double eps, double weight_decay) {
  check_1d(sum_sq, ScalarType::Float, "sum_sq");
  TORCH_CHECK(sum_sq.numel() == table.size(0), "sum_sq must have one entry per table row");
  return AdagradRule{sum_sq.data_ptr<float>(), static_cast<float>(lr), static_cast<float>(eps),
                     static_cast<float>(weight_decay)};
}

// Calls fn(rule) with the lazy Adam rule for the moments' dtype.
template <typename Fn>
void with_adam_rule(const Tensor& table, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_step,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled, Fn&& fn) {
  TORCH_CHECK(exp_avg.sizes() == table.sizes() && exp_avg_sq.sizes() == table.sizes(), "moments must be [N, D]");
  TORCH_CHECK(exp_avg.is_contiguous() && exp_avg_sq.is_contiguous() && exp_avg.scalar_type() == exp_avg_sq.scalar_type(),
              "moments must be contiguous and of one dtype");
  check_1d(row_step, ScalarType::Int, "row_step");
  TORCH_CHECK(row_step.numel() == table.size(0), "row_step must have one entry per table row");
  auto make = [&](auto* s_tag) {
    using S = std::remove_pointer_t<decltype(s_tag)>;
    fn(AdamRule<S>{exp_avg.data_ptr<S>(), exp_avg_sq.data_ptr<S>(), exp_avg.stride(0), row_step.data_ptr<int32_t>(),
                   lr, beta1, beta2, eps, weight_decay, decoupled});
  };
  switch (exp_avg.scalar_type()) {
    case ScalarType::Float:
      return make((float*)nullptr);
    case ScalarType::BFloat16:
      return make((c10::BFloat16*)nullptr);
    default:
      TORCH_CHECK(false, "moments must be float32 or bfloat16, got ", exp_avg.scalar_type());
  }
}

SgdRule sgd_rule(double lr, double weight_decay) {
  return SgdRule{static_cast<float>(lr), static_cast<float>(weight_decay)};
}

RowGradients step_source(const Tensor& row_grads) {
  RowGradients src;
  src.row_grads = &row_grads;
  return src;
}

RowGradients backward_source(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights,
                             const Tensor& order, const Tensor& seg, const std::optional<Tensor>& grad_weights,
                             const std::optional<Tensor>& row_sq) {
  RowGradients src;
  src.grad_out = &grad_out;
  src.bag_ids = &bag_ids;
  src.weights = &weights;
  src.order = &order;
  src.seg = &seg;
  src.grad_weights = &grad_weights;
  src.row_sq = &row_sq;
  return src;
}

void rowwise_adagrad(const Tensor& table, const Tensor& sum_sq, const Tensor& rows, const Tensor& row_grads,
                     double lr, double eps, double weight_decay) {
  apply_rule(table, rows, step_source(row_grads), adagrad_rule(table, sum_sq, lr, eps, weight_decay));
}

void lazy_adam(const Tensor& table, const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_step,
               const Tensor& rows, const Tensor& row_grads, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool decoupled) {
  with_adam_rule(table, exp_avg, exp_avg_sq, row_step, lr, beta1, beta2, eps, weight_decay, decoupled,
                 [&](const auto& rule) { apply_rule(table, rows, step_source(row_grads), rule); });
}

void sgd(const Tensor& table, const Tensor& rows, const Tensor& row_grads, double lr, double weight_decay) {
  apply_rule(table, rows, step_source(row_grads), sgd_rule(lr, weight_decay));
}

// The lookup's backward with the optimizer step fused into it: each touched row is read once
// (for the weights' gradient and the rule) and written once, and its gradient never leaves the
// thread's buffer. Same arguments as bag_backward, then the rule's state and hyperparameters.
void bag_backward_rowwise_adagrad(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights,
                                  const Tensor& table, const Tensor& order, const Tensor& seg, const Tensor& rows,
                                  const std::optional<Tensor>& grad_weights, const std::optional<Tensor>& row_sq,
                                  const Tensor& sum_sq, double lr, double eps, double weight_decay) {
  apply_rule(table, rows, backward_source(grad_out, bag_ids, weights, order, seg, grad_weights, row_sq),
             adagrad_rule(table, sum_sq, lr, eps, weight_decay));
}

void bag_backward_lazy_adam(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights, const Tensor& table,
                            const Tensor& order, const Tensor& seg, const Tensor& rows,
                            const std::optional<Tensor>& grad_weights, const std::optional<Tensor>& row_sq,
                            const Tensor& exp_avg, const Tensor& exp_avg_sq, const Tensor& row_step, double lr,
                            double beta1, double beta2, double eps, double weight_decay, bool decoupled) {
  const RowGradients src = backward_source(grad_out, bag_ids, weights, order, seg, grad_weights, row_sq);
  with_adam_rule(table, exp_avg, exp_avg_sq, row_step, lr, beta1, beta2, eps, weight_decay, decoupled,
                 [&](const auto& rule) { apply_rule(table, rows, src, rule); });
}

void bag_backward_sgd(const Tensor& grad_out, const Tensor& bag_ids, const Tensor& weights, const Tensor& table,
                      const Tensor& order, const Tensor& seg, const Tensor& rows,
                      const std::optional<Tensor>& grad_weights, const std::optional<Tensor>& row_sq, double lr,
                      double weight_decay) {
  apply_rule(table, rows, backward_source(grad_out, bag_ids, weights, order, seg, grad_weights, row_sq),
             sgd_rule(lr, weight_decay));
}

// ---- product-key search: the selection ---------------------------------------------------------
//
// For each row (a token and head) of half scores [rows, 2, n_keys]: each half's top-k1 keys, then
// the top-knn of the k1 x k1 sums, best first. Order everywhere: higher score first, ties to the
// lower index (key index within a half, slot index i * n_keys + j for the sums), the order of a
// brute-force search over all n_keys**2 slots. Replaces three torch.topk calls (a full pass each
// and a sort) by a bound on each half's k1-th score and on the knn-th sum, found cheaply, and a
// sort of the few keys and sums at or above it.

// Insertion into a short sorted list: the general path (any k, NaN anywhere).
template <typename S>
inline void top_keys_insert(const S* s, int64_t n, int64_t k, S* best, int64_t* index) {
  int64_t filled = 0;
  for (int64_t i = 0; i < n; ++i) {
    const S v = s[i] == s[i] ? s[i] : -std::numeric_limits<S>::infinity();  // NaN ranks as -inf
    if (filled == k && !(v > best[k - 1])) continue;  // not better than the k-th (ties: lower index kept)
    int64_t pos = filled < k ? filled++ : k - 1;
    while (pos > 0 && v > best[pos - 1]) {
      best[pos] = best[pos - 1];
      index[pos] = index[pos - 1];
      --pos;
    }
    best[pos] = v;
    index[pos] = i;
  }
}

template <typename S>
struct SelectScratch {
  std::vector<S> maxima, values, padded;
  std::vector<int32_t> passed, order;
  std::vector<int64_t> slot;
  std::vector<int32_t> a, b;
};

// The order of m numbers (no NaN) by (value desc, position asc): order[r] = position of rank r.
template <typename S>
inline void order_by_sorting(const S* v, int64_t m, int32_t* order) {
  for (int64_t p = 0; p < m; ++p) order[p] = static_cast<int32_t>(p);
  std::stable_sort(order, order + m, [v](int32_t x, int32_t y) { return v[x] > v[y]; });
}

template <typename S>
inline void order_by_value(const S* v, int64_t m, int32_t* order, SelectScratch<S>&) {
  order_by_sorting(v, m, order);
}

// The k-th largest of v (no NaN, at least k numbers); reorders v.
template <typename S>
inline S kth_by_selection(std::vector<S>& v, int64_t k) {
  std::nth_element(v.begin(), v.begin() + (k - 1), v.end(), std::greater<S>());
  return v[k - 1];
}

template <typename S>
inline S kth_largest(std::vector<S>& v, int64_t k, SelectScratch<S>&) {
  return kth_by_selection(v, k);
}

// Indices i in [begin, n), ascending, with s[i] >= bar, written to `out`; returns how many.
template <typename S>
inline int64_t keys_at_least_scalar(const S* s, int64_t begin, int64_t n, S bar, int32_t* out) {
  int64_t count = 0;
  for (int64_t i = begin; i < n; ++i) {
    out[count] = static_cast<int32_t>(i);
    count += s[i] >= bar;  // branch-free; NaN compares false
  }
  return count;
}

template <typename S>
inline int64_t keys_at_least(const S* s, int64_t n, S bar, int32_t* out) {
  return keys_at_least_scalar(s, 0, n, bar, out);
}

#if defined(__AVX2__)
// Float specialisations, 8 lanes at a time and without data-dependent branches: sorting or
// selecting among a few dozen floats is otherwise mostly mispredicted branches. The selection
// makes each of these calls twice per token and head.

// Above these many numbers the O(m^2 / 8) compares of counting ranks cost more than a sort
// (ordering a search's candidates) or than nth_element (finding a bound: it needs no order).
constexpr int64_t kMaxCounted = 256, kMaxCountedKth = 64;

// For each 8-bit mask, the lanes of its set bits packed low: a compress is one permute.
struct LaneTable {
  alignas(32) int32_t lanes[256][8];
  LaneTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int filled = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (mask & (1 << lane)) lanes[mask][filled++] = lane;
      }
      while (filled < 8) lanes[mask][filled++] = 0;
    }
  }
};
const LaneTable kPacked;

// Ranks in the order (value desc, position asc) of the 8 numbers in lanes `vi`, at positions
// i0 .. i0 + 7 of v[0..m): how many of v[0..m) are above each, plus those equal to it at a lower
// position. Vectorised over the 8 numbers, one broadcast per v[j]; a compare is -1 or 0.
inline __m256i ranks_of(const float* v, int64_t m, __m256 vi, int64_t i0) {
  __m256i rank = _mm256_setzero_si256();
  const int64_t lo = std::min(i0, m), hi = std::min(i0 + 8, m);
  for (int64_t j = 0; j < lo; ++j) {  // lower positions count when at or above
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(v[j]), vi, _CMP_GE_OQ)));
  }
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t j = lo; j < hi; ++j) {  // within the block: at or above for the lanes past j
    const __m256 vj = _mm256_set1_ps(v[j]);
    const __m256i past = _mm256_cmpgt_epi32(lane, _mm256_set1_epi32(static_cast<int32_t>(j - i0)));
    const __m256 hit = _mm256_blendv_ps(_mm256_cmp_ps(vj, vi, _CMP_GT_OQ), _mm256_cmp_ps(vj, vi, _CMP_GE_OQ),
                                        _mm256_castsi256_ps(past));
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(hit));
  }
  for (int64_t j = hi; j < m; ++j) {  // higher positions count when above
    rank = _mm256_sub_epi32(rank, _mm256_castps_si256(_mm256_cmp_ps(_mm256_set1_ps(v[j]), vi, _CMP_GT_OQ)));
  }
  return rank;
}

template <>
inline void order_by_value<float>(const float* v, int64_t m, int32_t* order, SelectScratch<float>& w) {
  if (m > kMaxCounted) return order_by_sorting(v, m, order);
  w.padded.assign(v, v + m);  // whole vectors to load; the padding's ranks are not used
  w.padded.resize((m + 7) / 8 * 8, 0.0f);
  alignas(32) int32_t ranks[8];
  for (int64_t i0 = 0; i0 < m; i0 += 8) {
    _mm256_store_si256(reinterpret_cast<__m256i*>(ranks), ranks_of(v, m, _mm256_loadu_ps(w.padded.data() + i0), i0));
    for (int64_t p = i0; p < std::min(i0 + 8, m); ++p) order[ranks[p - i0]] = static_cast<int32_t>(p);
  }
}

// The number of rank k - 1, found by counting (ranks are distinct) rather than by
// nth_element's unpredictable branches.
template <>
inline float kth_largest<float>(std::vector<float>& v, int64_t k, SelectScratch<float>&) {
  const auto m = static_cast<int64_t>(v.size());
  if (m > kMaxCountedKth) return kth_by_selection(v, k);
  // padded with -inf at the highest positions: below every number, the rank k - 1 stays put
  v.resize((m + 7) / 8 * 8, -std::numeric_limits<float>::infinity());
  const __m256i want = _mm256_set1_epi32(static_cast<int32_t>(k - 1));
  __m256 found = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t i0 = 0; i0 < static_cast<int64_t>(v.size()); i0 += 8) {
    const __m256 vi = _mm256_loadu_ps(v.data() + i0);
    const __m256i is_kth = _mm256_cmpeq_epi32(ranks_of(v.data(), static_cast<int64_t>(v.size()), vi, i0), want);
    found = _mm256_max_ps(found, _mm256_blendv_ps(found, vi, _mm256_castsi256_ps(is_kth)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, found);
  return *std::max_element(lanes, lanes + 8);
}

template <>
inline int64_t keys_at_least<float>(const float* s, int64_t n, float bar, int32_t* out) {
  const __m256 b = _mm256_set1_ps(bar);
  int64_t count = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const auto mask = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(s + i), b, _CMP_GE_OQ)));
    const __m256i lanes = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPacked.lanes[mask]));
    // all 8 lanes stored, the passing ones first: out[count, count + 8) lies within out[0, i + 8)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + count),
                        _mm256_add_epi32(lanes, _mm256_set1_epi32(static_cast<int32_t>(i))));
    count += __builtin_popcount(mask);
  }
  return count + keys_at_least_scalar(s, i, n, bar, out + count);
}
#endif

// A half's top k keys, best first. View the keys as rows of C columns (C a multiple of 8, at
// least 2k): the k-th largest of the C column maxima bounds the k-th score from below (k
// columns hold a key at least that high). The column maxima take one vectorised pass (a NaN
// never wins a `>`, so it is skipped), the keys at or above the bound a second (a few times k of
// n for any smooth distribution of scores), and ordering those by (score desc, index asc) gives
// the top k in the insertion path's order. Keys past the last whole row belong to no column but
// are scanned all the same. The insertion path serves halves shorter than C and those where
// fewer than k keys pass (NaN or -inf nearly everywhere).
template <typename S>
inline void top_keys(const S* s, int64_t n, int64_t k, S* best, int64_t* index, SelectScratch<S>& w) {
  const int64_t columns = std::max<int64_t>(8, (2 * k + 7) / 8 * 8), rows = n / columns;
  if (rows < 1 || n > std::numeric_limits<int32_t>::max()) return top_keys_insert(s, n, k, best, index);
  w.maxima.assign(columns, -std::numeric_limits<S>::infinity());
  S* m = w.maxima.data();
  for (int64_t r = 0; r < rows; ++r) {
    const S* line = s + r * columns;
    for (int64_t c = 0; c < columns; ++c) m[c] = line[c] > m[c] ? line[c] : m[c];  // vectorises to max
  }
  const S bar = kth_largest(w.maxima, k, w);
  w.passed.resize(n);
  const int64_t count = keys_at_least(s, n, bar, w.passed.data());
  if (count < k) return top_keys_insert(s, n, k, best, index);
  w.values.resize(count);
  w.order.resize(count);
  for (int64_t p = 0; p < count; ++p) w.values[p] = s[w.passed[p]];
  order_by_value(w.values.data(), count, w.order.data(), w);  // passed is ascending: ties to the lower key
  for (int64_t r = 0; r < k; ++r) {
    best[r] = w.values[w.order[r]];
    index[r] = w.passed[w.order[r]];
  }
}

// The best knn of the k1 x k1 sums s1[a] + s2[b] of two lists sorted best first (a NaN sum,
// inf - inf, ranks as -inf), ordered by (sum desc, slot asc), slot = i1[a] * n_keys + i2[b];
// writes each one's (a, b). The pairs with (a + 1)(b + 1) <= knn number at least knn (where
// there are that many: otherwise every pair is a candidate), so their knn-th best sum bounds the
// knn-th best of all from below. Every pair at or above that bound is collected (a line of sums
// never rises: float addition is monotone, and so is the NaN-as--inf mapping), ordered by sum,
// and equal sums put in slot order.
template <typename S>
inline void top_sums(const S* s1, const int64_t* i1, const S* s2, const int64_t* i2, int64_t k1, int64_t knn,
                     int64_t n_keys, int32_t* a_of, int32_t* b_of, SelectScratch<S>& w) {
  auto sum = [&](int64_t a, int64_t b) {
    const S v = s1[a] + s2[b];
    return v == v ? v : -std::numeric_limits<S>::infinity();
  };
  w.maxima.clear();
  for (int64_t a = 0; a < k1 && a < knn; ++a) {
    for (int64_t b = 0; b < k1 && (a + 1) * (b + 1) <= knn; ++b) w.maxima.push_back(sum(a, b));
  }
  const S bound = static_cast<int64_t>(w.maxima.size()) >= knn ? kth_largest(w.maxima, knn, w)
                                                                : -std::numeric_limits<S>::infinity();
  w.values.clear();
  w.slot.clear();
  w.a.clear();
  w.b.clear();
  for (int64_t a = 0; a < k1; ++a) {
    if (sum(a, 0) < bound) break;  // every later line starts lower still
    for (int64_t b = 0; b < k1; ++b) {
      const S v = sum(a, b);
      if (v < bound) break;
      w.values.push_back(v);
      w.slot.push_back(i1[a] * n_keys + i2[b]);
      w.a.push_back(static_cast<int32_t>(a));
      w.b.push_back(static_cast<int32_t>(b));
    }
  }
  const auto m = static_cast<int64_t>(w.values.size());
  w.order.resize(m);
  int32_t* order = w.order.data();
  order_by_value(w.values.data(), m, order, w);
  // runs of equal sums into slot order (collection order is not slot order); a run that starts
  // before knn decides which pairs are kept
  for (int64_t r = 0; r < knn;) {
    int64_t end = r + 1;
    while (end < m && w.values[order[end]] == w.values[order[r]]) ++end;
    if (end - r > 1) {
      std::sort(order + r, order + end, [&](int32_t x, int32_t y) { return w.slot[x] < w.slot[y]; });
    }
    r = end;
  }
  for (int64_t k = 0; k < knn; ++k) {
    a_of[k] = w.a[order[k]];
    b_of[k] = w.b[order[k]];
  }
}

template <typename S>
void pk_select_kernel(const S* scores, int64_t rows, int64_t heads, int64_t stride_t, int64_t stride_h,
                      int64_t stride_half, int64_t n_keys, int64_t k1, int64_t knn, int64_t* out1, int64_t* out2,
                      S* out_scores) {
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<S> s1(k1), s2(k1);
    std::vector<int64_t> i1(k1), i2(k1);
    std::vector<int32_t> a_of(knn), b_of(knn);
    SelectScratch<S> scratch;
    for (int64_t r = r0; r < r1; ++r) {
      const S* row = scores + (r / heads) * stride_t + (r % heads) * stride_h;  // row r = token * heads + head
      const S* other = row + stride_half;
      top_keys(row, n_keys, k1, s1.data(), i1.data(), scratch);
      top_keys(other, n_keys, k1, s2.data(), i2.data(), scratch);
      top_sums(s1.data(), i1.data(), s2.data(), i2.data(), k1, knn, n_keys, a_of.data(), b_of.data(), scratch);
      for (int64_t k = 0; k < knn; ++k) {
        out1[r * knn + k] = i1[a_of[k]];
        out2[r * knn + k] = i2[b_of[k]];
        // the sum of the two stored half scores (not the NaN-masked copy): what a gather gives
        if (out_scores != nullptr) out_scores[r * knn + k] = row[i1[a_of[k]]] + other[i2[b_of[k]]];
      }
    }
  });
}

// scores: [tokens, heads, 2, n_keys] with any strides but a contiguous last dimension (a matmul's
// output viewed in that order needs no copy); outputs [tokens * heads, knn], row = token * heads + head.
void pk_select(const Tensor& scores, int64_t knn, const Tensor& out1, const Tensor& out2,
               const std::optional<Tensor>& out_scores) {
  TORCH_CHECK(scores.dim() == 4 && scores.size(2) == 2 && scores.stride(3) == 1,
              "scores must be [tokens, heads, 2, n_keys] with a contiguous last dimension");
  const int64_t heads = scores.size(1), rows = scores.size(0) * heads, n_keys = scores.size(3);
  const int64_t k1 = std::min(knn, n_keys);
  TORCH_CHECK(knn >= 1 && knn <= k1 * k1, "knn must be in [1, min(knn, n_keys)**2]");
  for (const Tensor* out : {&out1, &out2}) {
    TORCH_CHECK(out->scalar_type() == ScalarType::Long && out->is_contiguous() && out->numel() == rows * knn,
                "outputs must be contiguous int64 [rows, knn]");
  }
  if (out_scores.has_value()) {
    TORCH_CHECK(out_scores->scalar_type() == scores.scalar_type() && out_scores->is_contiguous() &&
                    out_scores->numel() == rows * knn,
                "out_scores must be contiguous [rows, knn] of the scores' dtype");
  }
  const int64_t st = scores.stride(0), sh = scores.stride(1), s2 = scores.stride(2);
  if (scores.scalar_type() == ScalarType::Float) {
    pk_select_kernel<float>(scores.data_ptr<float>(), rows, heads, st, sh, s2, n_keys, k1, knn,
                            out1.data_ptr<int64_t>(), out2.data_ptr<int64_t>(),
                            data_or_null<float>(out_scores));
  } else {
    TORCH_CHECK(scores.scalar_type() == ScalarType::Double, "scores must be float32 or float64");
    pk_select_kernel<double>(scores.data_ptr<double>(), rows, heads, st, sh, s2, n_keys, k1, knn,
                             out1.data_ptr<int64_t>(), out2.data_ptr<int64_t>(),
                             data_or_null<double>(out_scores));
  }
}

// ---- product-key search: the backward of the selected scores ----------------------------------
//
// score[t, h, k] = <q[t, h, 0], keys[h, 0, first[t, h, k]]> + <q[t, h, 1], keys[h, 1, second[t, h, k]]>
// for the knn selected slots only, so its backward touches knn sub-keys per token, head and half
// instead of all n_keys: dq is a sum of knn sub-key rows per token and half (parallel over
// tokens), dkeys a sum of query halves per selected sub-key. dkeys is split into units (head,
// half, block of keys); each unit scans every token in order and owns its rows: no atomics, and
// the result does not depend on the thread count.

template <typename S>
void pk_score_backward_kernel(const S* q, const S* keys, const int64_t* first, const int64_t* second,
                              const S* grad, int64_t tokens, int64_t heads, int64_t n_keys, int64_t half,
                              int64_t knn, S* dq, S* dkeys) {
  const int64_t rows = tokens * heads;
  if (dq != nullptr) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t h = r % heads;
        S* d0 = dq + r * 2 * half;
        S* d1 = d0 + half;
        std::fill(d0, d0 + 2 * half, S(0));
        const S* k0 = keys + (h * 2) * n_keys * half;
        const S* k1 = k0 + n_keys * half;
        for (int64_t k = 0; k < knn; ++k) {
          const S g = grad[r * knn + k];
          const S* a = k0 + first[r * knn + k] * half;
          const S* b = k1 + second[r * knn + k] * half;
          for (int64_t d = 0; d < half; ++d) {
            d0[d] += g * a[d];
            d1[d] += g * b[d];
          }
        }
      }
    });
  }
  if (dkeys == nullptr) return;
  const int64_t lines = heads * 2;
  const int64_t blocks = std::min<int64_t>(n_keys, std::max<int64_t>(1, (2 * at::get_num_threads() + lines - 1) / lines));
  const int64_t per = (n_keys + blocks - 1) / blocks;
  at::parallel_for(0, lines * blocks, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t line = u / blocks, h = line / 2, side = line % 2;
      const int64_t lo = (u % blocks) * per, hi = std::min(n_keys, lo + per);
      if (lo >= hi) continue;
      S* dk = dkeys + line * n_keys * half;
      std::fill(dk + lo * half, dk + hi * half, S(0));
      const int64_t* index = side == 0 ? first : second;
      for (int64_t t = 0; t < tokens; ++t) {
        const int64_t r = t * heads + h;
        const S* qv = q + (r * 2 + side) * half;
        for (int64_t k = 0; k < knn; ++k) {
          const int64_t key = index[r * knn + k];
          if (key < lo || key >= hi) continue;
          const S g = grad[r * knn + k];
          S* row = dk + key * half;
          for (int64_t d = 0; d < half; ++d) row[d] += g * qv[d];
        }
      }
    }
  });
}

void pk_score_backward(const Tensor& q, const Tensor& keys, const Tensor& first, const Tensor& second,
                       const Tensor& grad, const std::optional<Tensor>& dq, const std::optional<Tensor>& dkeys) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 2 && q.is_contiguous(), "q must be contiguous [tokens, heads, 2, half]");
  const int64_t tokens = q.size(0), heads = q.size(1), half = q.size(3);
  TORCH_CHECK(keys.dim() == 4 && keys.size(0) == heads && keys.size(1) == 2 && keys.size(3) == half &&
                  keys.is_contiguous() && keys.scalar_type() == q.scalar_type(),
              "keys must be contiguous [heads, 2, n_keys, half] of q's dtype");
  const int64_t n_keys = keys.size(2);
  TORCH_CHECK(grad.dim() == 3 && grad.size(0) == tokens && grad.size(1) == heads && grad.is_contiguous() &&
                  grad.scalar_type() == q.scalar_type(),
              "grad must be contiguous [tokens, heads, knn] of q's dtype");
  const int64_t knn = grad.size(2);
  for (const Tensor* index : {&first, &second}) {
    TORCH_CHECK(index->scalar_type() == ScalarType::Long && index->is_contiguous() && index->sizes() == grad.sizes(),
                "indices must be contiguous int64 [tokens, heads, knn]");
  }
  if (dq.has_value()) TORCH_CHECK(dq->sizes() == q.sizes() && dq->is_contiguous() && dq->scalar_type() == q.scalar_type(), "dq must be like q");
  if (dkeys.has_value()) TORCH_CHECK(dkeys->sizes() == keys.sizes() && dkeys->is_contiguous() && dkeys->scalar_type() == q.scalar_type(), "dkeys must be like keys");
  if (q.scalar_type() == ScalarType::Float) {
    pk_score_backward_kernel<float>(q.data_ptr<float>(), keys.data_ptr<float>(), first.data_ptr<int64_t>(),
                                    second.data_ptr<int64_t>(), grad.data_ptr<float>(), tokens, heads, n_keys, half,
                                    knn, data_or_null<float>(dq),
                                    data_or_null<float>(dkeys));
  } else {
    TORCH_CHECK(q.scalar_type() == ScalarType::Double, "q must be float32 or float64");
    pk_score_backward_kernel<double>(q.data_ptr<double>(), keys.data_ptr<double>(), first.data_ptr<int64_t>(),
                                     second.data_ptr<int64_t>(), grad.data_ptr<double>(), tokens, heads, n_keys,
                                     half, knn, data_or_null<double>(dq),
                                     data_or_null<double>(dkeys));
  }
}

// ---- the memory layer's query and sub-key norms -----------------------------------------------
//
// x [outer, groups, inner, d], contiguous; each row of d numbers belongs to group
// g = (row / inner) % groups. Per row, optionally a LayerNorm over d with a per-group affine
// (ln_weight, ln_bias [groups, d]), then optionally an RMS norm of each of `splits` equal
// segments, times a per-group gain [groups, d] and `scale`:
//   y = (x - mean) / sqrt(var + ln_eps) * w + b        (or y = x)
//   z = y / sqrt(mean(y_seg^2) + rms_eps) * gain * scale (or z = y)
// For queries: [tokens, heads, 1, k_dim], two segments (the halves); for sub-keys: [1, heads * 2,
// n_keys, half], one. One pass over each row instead of a dozen elementwise passes over the whole
// tensor; the backward recomputes the row's statistics from x (it is in cache). Parameter
// gradients are summed per block of kNormBlock rows and the blocks in order: the same result
// for any thread count.

constexpr int64_t kNormBlock = 128;

template <typename S>
struct NormRow {
  const S *w, *b, *gain;  // this row's group's slices, or nullptr
  int64_t d, splits;
  S scale, ln_eps, rms_eps;

  // the LayerNorm affine of group g (the gain stays whole: callers index it per segment)
  NormRow of_group(int64_t g) const {
    NormRow p = *this;
    p.w = w ? w + g * d : nullptr;
    p.b = b ? b + g * d : nullptr;
    return p;
  }
};

template <typename S>
inline S sum_of(const S* x, int64_t n) {
  S part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) part[j] += x[i + j];
  }
  S tail = 0;
  for (; i < n; ++i) tail += x[i];
  return sum_lanes(part, tail);
}

// The LayerNorm's normalised row xhat (into `xhat`) and 1 / std; y = xhat * w + b into `y`.
template <typename S>
inline S norm_layer(const S* x, const NormRow<S>& p, S* xhat, S* y) {
  const int64_t d = p.d;
  if (p.w == nullptr) {
    std::copy(x, x + d, y);
    return S(1);
  }
  const S mean = sum_of(x, d) / S(d);
  for (int64_t i = 0; i < d; ++i) xhat[i] = x[i] - mean;
  const S rstd = S(1) / std::sqrt(dot(xhat, xhat, d) / S(d) + p.ln_eps);
  for (int64_t i = 0; i < d; ++i) {
    xhat[i] *= rstd;
    y[i] = xhat[i] * p.w[i] + p.b[i];
  }
  return rstd;
}

template <typename S>
void row_norm_forward_kernel(const S* x, int64_t rows, int64_t groups, int64_t inner, const NormRow<S>& shape, S* out) {
  const int64_t d = shape.d, seg = d / shape.splits;
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    std::vector<S> xhat(d), y(d);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = (r / inner) % groups;
      const NormRow<S> p = shape.of_group(g);
      norm_layer(x + r * d, p, xhat.data(), y.data());
      S* z = out + r * d;
      if (shape.gain == nullptr) {
        std::copy(y.begin(), y.end(), z);
        continue;
      }
      const S* gain = shape.gain + g * d;
      for (int64_t s = 0; s < d; s += seg) {
        const S rr = S(1) / std::sqrt(dot(y.data() + s, y.data() + s, seg) / S(seg) + shape.rms_eps);
        for (int64_t i = s; i < s + seg; ++i) z[i] = y[i] * rr * gain[i] * shape.scale;
      }
    }
  });
}

// dx, and the parameters' gradients per block of rows (partials [blocks, groups, d] each).
template <typename S>
void row_norm_backward_kernel(const S* grad, const S* x, int64_t rows, int64_t groups, int64_t inner,
                              const NormRow<S>& shape, S* dx, S* dw_part, S* db_part, S* dgain_part) {
  const int64_t d = shape.d, seg = d / shape.splits;
  const int64_t blocks = (rows + kNormBlock - 1) / kNormBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<S> xhat(d), y(d), dy(d);
    for (int64_t k = k0; k < k1; ++k) {
      S* dw = dw_part ? dw_part + k * groups * d : nullptr;
      S* db = db_part ? db_part + k * groups * d : nullptr;
      S* dgain = dgain_part ? dgain_part + k * groups * d : nullptr;
      for (S* part : {dw, db, dgain}) {
        if (part != nullptr) std::fill(part, part + groups * d, S(0));
      }
      for (int64_t r = k * kNormBlock; r < std::min(rows, (k + 1) * kNormBlock); ++r) {
        const int64_t g = (r / inner) % groups;
        const NormRow<S> p = shape.of_group(g);
        const S rstd = norm_layer(x + r * d, p, xhat.data(), y.data());
        const S* dz = grad + r * d;
        if (shape.gain == nullptr) {
          std::copy(dz, dz + d, dy.begin());
        } else {
          // z = y * rr * u, u = gain * scale: dy = rr * u * dz - rr^3 / seg * y * <u * dz, y>
          const S* gain = shape.gain + g * d;
          S* dgain_g = dgain ? dgain + g * d : nullptr;
          for (int64_t s = 0; s < d; s += seg) {
            const S rr = S(1) / std::sqrt(dot(y.data() + s, y.data() + s, seg) / S(seg) + shape.rms_eps);
            S* __restrict__ u = dy.data() + s;
            const S* __restrict__ ys = y.data() + s;
            const S* __restrict__ dzs = dz + s;
            const S* __restrict__ gs = gain + s;
            for (int64_t i = 0; i < seg; ++i) u[i] = dzs[i] * gs[i] * shape.scale;  // u * dz
            const S c = rr * rr * rr * dot(u, ys, seg) / S(seg);
            if (dgain_g != nullptr) {
              S* __restrict__ dgs = dgain_g + s;
              const S f = rr * shape.scale;
              for (int64_t i = 0; i < seg; ++i) dgs[i] += dzs[i] * ys[i] * f;
            }
            for (int64_t i = 0; i < seg; ++i) u[i] = rr * u[i] - c * ys[i];
          }
        }
        S* dxr = dx + r * d;
        if (p.w == nullptr) {
          std::copy(dy.begin(), dy.end(), dxr);
          continue;
        }
        // y = xhat * w + b: dxhat = dy * w; dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        S* __restrict__ g_dy = dy.data();
        const S* __restrict__ xh = xhat.data();
        if (dw != nullptr) {
          S* __restrict__ dw_g = dw + g * d;
          for (int64_t i = 0; i < d; ++i) dw_g[i] += g_dy[i] * xh[i];
        }
        if (db != nullptr) {
          S* __restrict__ db_g = db + g * d;
          for (int64_t i = 0; i < d; ++i) db_g[i] += g_dy[i];
        }
        for (int64_t i = 0; i < d; ++i) g_dy[i] *= p.w[i];  // dxhat
        const S mean_dxhat = sum_of(g_dy, d) / S(d);
        const S mean_dxhat_xhat = dot(g_dy, xh, d) / S(d);
        for (int64_t i = 0; i < d; ++i) dxr[i] = rstd * (g_dy[i] - mean_dxhat - xh[i] * mean_dxhat_xhat);
      }
    }
  });
}

template <typename S>
NormRow<S> norm_row(const Tensor& x, const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                    const std::optional<Tensor>& gain, int64_t groups, int64_t splits, double scale, double ln_eps,
                    double rms_eps) {
  const int64_t d = x.size(-1);
  TORCH_CHECK(x.is_contiguous() && x.numel() % (groups * d) == 0, "x must be contiguous [outer, groups, inner, d]");
  TORCH_CHECK(splits >= 1 && d % splits == 0, "d must split into `splits` equal segments");
  TORCH_CHECK(ln_weight.has_value() == ln_bias.has_value(), "ln_weight and ln_bias come together");
  for (const auto* t : {&ln_weight, &ln_bias, &gain}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous() && (*t)->numel() == groups * d,
                  "parameters must be contiguous [groups, d] of x's dtype");
    }
  }
  return NormRow<S>{data_or_null<S>(ln_weight), data_or_null<S>(ln_bias), data_or_null<S>(gain), d, splits, S(scale),
                   S(ln_eps), S(rms_eps)};
}

void row_norm_forward(const Tensor& x, int64_t groups, int64_t inner, int64_t splits,
                      const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                      const std::optional<Tensor>& gain, double scale, double ln_eps, double rms_eps,
                      const Tensor& out) {
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type(),
              "out must be contiguous like x");
  const int64_t rows = x.numel() / x.size(-1);
  if (x.scalar_type() == ScalarType::Float) {
    auto p = norm_row<float>(x, ln_weight, ln_bias, gain, groups, splits, scale, ln_eps, rms_eps);
    row_norm_forward_kernel<float>(x.data_ptr<float>(), rows, groups, inner, p, out.data_ptr<float>());
  } else {
    TORCH_CHECK(x.scalar_type() == ScalarType::Double, "x must be float32 or float64");
    auto p = norm_row<double>(x, ln_weight, ln_bias, gain, groups, splits, scale, ln_eps, rms_eps);
    row_norm_forward_kernel<double>(x.data_ptr<double>(), rows, groups, inner, p, out.data_ptr<double>());
  }
}

// dw/db/dgain_part: [blocks, groups, d] with blocks = ceil(rows / row_norm_block()), or None
void row_norm_backward(const Tensor& grad, const Tensor& x, int64_t groups, int64_t inner, int64_t splits,
                       const std::optional<Tensor>& ln_weight, const std::optional<Tensor>& ln_bias,
                       const std::optional<Tensor>& gain, double scale, double ln_eps, double rms_eps,
                       const Tensor& dx, const std::optional<Tensor>& dw_part, const std::optional<Tensor>& db_part,
                       const std::optional<Tensor>& dgain_part) {
  const int64_t rows = x.numel() / x.size(-1), d = x.size(-1);
  const int64_t blocks = (rows + kNormBlock - 1) / kNormBlock;
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "grad must be contiguous like x");
  TORCH_CHECK(dx.is_contiguous() && dx.sizes() == x.sizes() && dx.scalar_type() == x.scalar_type(),
              "dx must be contiguous like x");
  for (const auto* t : {&dw_part, &db_part, &dgain_part}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->scalar_type() == x.scalar_type() && (*t)->is_contiguous() &&
                      (*t)->numel() == blocks * groups * d,
                  "parameter gradients must be contiguous [blocks, groups, d] of x's dtype");
    }
  }
  auto run = [&](auto zero) {
    using S = decltype(zero);
    auto p = norm_row<S>(x, ln_weight, ln_bias, gain, groups, splits, scale, ln_eps, rms_eps);
    row_norm_backward_kernel<S>(grad.data_ptr<S>(), x.data_ptr<S>(), rows, groups, inner, p, dx.data_ptr<S>(),
                                data_or_null<S>(dw_part), data_or_null<S>(db_part), data_or_null<S>(dgain_part));
  };
  if (x.scalar_type() == ScalarType::Float) {
    run(0.0f);
  } else {
    TORCH_CHECK(x.scalar_type() == ScalarType::Double, "x must be float32 or float64");
    run(0.0);
  }
}

int64_t row_norm_block() { return kNormBlock; }

}  // namespace


// The namespace is a macro so that a second build (other ISA flags, for benchmarks) can be
// loaded beside the default one; the extra macro level expands it before TORCH_LIBRARY pastes it.
#ifndef MEMRAY_CPU_BAG_NS
#define MEMRAY_CPU_BAG_NS memray_cpu_bag
#endif
#define MEMRAY_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)

MEMRAY_TORCH_LIBRARY(MEMRAY_CPU_BAG_NS, m) {
  m.def("bag_forward(Tensor indices, Tensor weights, Tensor table, Tensor offsets, Tensor(a!) out) -> ()",
        &bag_forward);
  m.def(
      "bag_backward(Tensor grad_out, Tensor bag_ids, Tensor weights, Tensor table, Tensor order, Tensor seg, "
      "Tensor rows, Tensor(a!)? grad_weights, Tensor(b!)? row_grads) -> ()",
      &bag_backward);
  m.def(
      "rowwise_adagrad(Tensor(a!) table, Tensor(b!) sum_sq, Tensor rows, Tensor row_grads, float lr, float eps, "
      "float weight_decay) -> ()",
      &rowwise_adagrad);
  m.def(
      "lazy_adam(Tensor(a!) table, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) row_step, Tensor rows, "
      "Tensor row_grads, float lr, float beta1, float beta2, float eps, float weight_decay, bool decoupled) -> ()",
      &lazy_adam);
  m.def("sgd(Tensor(a!) table, Tensor rows, Tensor row_grads, float lr, float weight_decay) -> ()", &sgd);
  m.def(
      "bag_backward_rowwise_adagrad(Tensor grad_out, Tensor bag_ids, Tensor weights, Tensor(a!) table, "
      "Tensor order, Tensor seg, Tensor rows, Tensor(b!)? grad_weights, Tensor(c!)? row_sq, Tensor(d!) sum_sq, "
      "float lr, float eps, float weight_decay) -> ()",
      &bag_backward_rowwise_adagrad);
  m.def(
      "bag_backward_lazy_adam(Tensor grad_out, Tensor bag_ids, Tensor weights, Tensor(a!) table, Tensor order, "
      "Tensor seg, Tensor rows, Tensor(b!)? grad_weights, Tensor(c!)? row_sq, Tensor(d!) exp_avg, "
      "Tensor(e!) exp_avg_sq, Tensor(f!) row_step, float lr, float beta1, float beta2, float eps, "
      "float weight_decay, bool decoupled) -> ()",
      &bag_backward_lazy_adam);
  m.def(
      "bag_backward_sgd(Tensor grad_out, Tensor bag_ids, Tensor weights, Tensor(a!) table, Tensor order, "
      "Tensor seg, Tensor rows, Tensor(b!)? grad_weights, Tensor(c!)? row_sq, float lr, float weight_decay) -> ()",
      &bag_backward_sgd);
  m.def("pk_select(Tensor scores, int knn, Tensor(a!) out1, Tensor(b!) out2, Tensor(c!)? out_scores) -> ()",
        &pk_select);
  m.def(
      "pk_score_backward(Tensor q, Tensor keys, Tensor first, Tensor second, Tensor grad, Tensor(a!)? dq, "
      "Tensor(b!)? dkeys) -> ()",
      &pk_score_backward);
  m.def(
      "row_norm_forward(Tensor x, int groups, int inner, int splits, Tensor? ln_weight, Tensor? ln_bias, "
      "Tensor? gain, float scale, float ln_eps, float rms_eps, Tensor(a!) out) -> ()",
      &row_norm_forward);
  m.def(
      "row_norm_backward(Tensor grad, Tensor x, int groups, int inner, int splits, Tensor? ln_weight, "
      "Tensor? ln_bias, Tensor? gain, float scale, float ln_eps, float rms_eps, Tensor(a!) dx, "
      "Tensor(b!)? dw_part, Tensor(c!)? db_part, Tensor(d!)? dgain_part) -> ()",
      &row_norm_backward);
  m.def("row_norm_block() -> int", &row_norm_block);
}
