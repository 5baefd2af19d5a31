// Routing on CPU as XLA FFI handlers: the routed LoRA forward added to the base layer's output,
// out[t] = base[t] + sum_s w[t,s] * (x[t] @ A[e[t,s]]) @ B[e[t,s]] (MoeJaxRoutedLoraCpu), and the routers' top-k
// (MoeJaxTopKCpu).
//
// Why a kernel for the LoRA: XLA:CPU runs the shrink of `grid` / `sorted` (a batched [E, rows, d_in] x [E, d_in, r]
// matmul) on one thread and reads A at a fraction of the memory bandwidth. Here each expert's A and B stream once per
// group of its assignments, on every thread of XLA's intra-op pool, with no padded rows and no gathered copies of x
// or of the weights. Float32 throughout, the rank-r intermediate included.
//
// Layout: x [T, d_in], a [E, d_in, r], b [E, r, d_out], experts [T, k] int32, weights [T, k], base [T, d_out] -> out
// [T, d_out], which XLA aliases to base. A token's slot-0 product is added to base in place; its other k - 1 go to
// rows of their own (different threads expand a token's experts) that one pass per token adds after. Measured on the
// routed `cpu` / `cpu_xl` benchmark layers against the alternatives: accumulating slot by slot (a second read of B
// per slot) was ~0.35 ms slower of ~8 at `cpu`; handing XLA the k rows to add was at most ~0.1 ms faster there but
// ~10 ms slower of ~100 at `cpu_xl`, where XLA fused that sum into attention's transposing copy of q/k/v.
//
// Why a kernel for the top-k: XLA:CPU's TopK took ~0.1 ms for one [256, 166] top-2, as long as that module's LoRA;
// a scan that keeps the k best of each row takes a few microseconds.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Eight floats as one vector (GCC/Clang vector extensions: AVX or NEON code without intrinsics); VecU loads and
// stores at any float alignment.
typedef float Vec __attribute__((vector_size(32)));
typedef float VecU __attribute__((vector_size(32), aligned(4)));
constexpr int kLanes = 8;
constexpr int64_t kTile = 4;  // assignments sharing one pass over A[e]
constexpr int64_t kColVecs = 8;  // the expand's column tile, in vectors: its accumulators stay in registers
// Experts per task of the thread pool: a thread walks consecutive experts, so its reads of A and B are one forward
// stream that the prefetches below (and the hardware's) run ahead of. One expert per task made the routed `cpu`
// layer ~0.6 ms slower (of ~8.5): each thread's stream restarted at every expert.
constexpr int64_t kExpertsPerTask = 16;

inline Vec Load(const float* p) { return *reinterpret_cast<const VecU*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<VecU*>(p) = v; }

// Runs body(i) for i in [0, n) on the calling thread and on the pool's threads, claiming indices from one counter.
// The counter lives on the heap: a pool task that starts only after every index is done (and this call has
// returned) finds none left and touches nothing else; a task that claimed an index runs it before this call returns.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, const Body& body) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &body]() {
    int64_t finished = 0;
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      body(i);
      ++finished;
    }
    if (finished > 0 && state->done.fetch_add(finished) + finished == n) {
      std::lock_guard<std::mutex> lock(state->mu);
      state->cv.notify_all();
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == n; });
}

// The assignments [0, n) stably sorted by expert (a counting sort): `order` lists them, expert e's run starts at
// start[e].
void SortByExpert(const int32_t* experts, int64_t n, int64_t num_experts, std::vector<int64_t>& order,
                  std::vector<int64_t>& start) {
  start.assign(num_experts + 1, 0);
  order.resize(n);
  for (int64_t i = 0; i < n; ++i) ++start[experts[i] + 1];
  for (int64_t e = 0; e < num_experts; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t i = 0; i < n; ++i) order[fill[experts[i]]++] = i;
}

// Scratch kept across calls up to this many floats per calling thread (256 MB); a larger one is freed after its call.
constexpr int64_t kMaxKeptScratch = int64_t{1} << 26;

float* Scratch(std::vector<float>& buffer, int64_t size) {
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

void ReleaseLarge(std::vector<float>& buffer) {
  if (static_cast<int64_t>(buffer.size()) > kMaxKeptScratch) std::vector<float>().swap(buffer);
}

struct Problem {
  const float* x;
  const float* a;
  const float* b;
  const int32_t* experts;
  const float* weights;
  float* out;  // the same buffer as base (the caller's input_output_aliases, which XLA must honour)
  int64_t tokens, d_in, num_experts, rank, d_out, k;
};

// h[i] = w[i] * x[token(i)] @ A[e] for the assignments `order[begin:end]` (all of expert e), kTile of them per pass
// over A[e]. R: the rank as a constant (a multiple of kLanes), so the kTile x R accumulators stay in registers.
template <int R>
void ShrinkVec(const Problem& p, const int64_t* order, int64_t begin, int64_t end, const float* ae, float* h) {
  constexpr int kVecs = R / kLanes;
  for (int64_t g = begin; g < end; g += kTile) {
    const int64_t m = std::min<int64_t>(kTile, end - g);
    const float* rows[kTile];
    for (int64_t j = 0; j < kTile; ++j) rows[j] = p.x + (order[g + std::min(j, m - 1)] / p.k) * p.d_in;
    Vec acc[kTile][kVecs] = {};
    for (int64_t d = 0; d < p.d_in; ++d) {
      Vec arow[kVecs];
      __builtin_prefetch(ae + (d + 16) * R);  // 16 rows ahead: A is read from L3, not L2, inside a layer
      for (int v = 0; v < kVecs; ++v) arow[v] = Load(ae + d * R + v * kLanes);
      for (int64_t j = 0; j < kTile; ++j) {
        const float xv = rows[j][d];
        for (int v = 0; v < kVecs; ++v) acc[j][v] += xv * arow[v];
      }
    }
    for (int64_t j = 0; j < m; ++j) {
      const int64_t assignment = order[g + j];
      for (int v = 0; v < kVecs; ++v) Store(h + assignment * R + v * kLanes, p.weights[assignment] * acc[j][v]);
    }
  }
}

// The same for any rank, one assignment at a time (ranks that are not a multiple of kLanes: small test shapes).
void ShrinkAny(const Problem& p, const int64_t* order, int64_t begin, int64_t end, const float* ae, float* h) {
  std::vector<float> acc(p.rank);
  for (int64_t g = begin; g < end; ++g) {
    const int64_t assignment = order[g];
    const float* row = p.x + (assignment / p.k) * p.d_in;
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t d = 0; d < p.d_in; ++d) {
      for (int64_t i = 0; i < p.rank; ++i) acc[i] += row[d] * ae[d * p.rank + i];
    }
    for (int64_t i = 0; i < p.rank; ++i) h[assignment * p.rank + i] = p.weights[assignment] * acc[i];
  }
}

// h[i] @ B[e] for the assignments `order[begin:end]` (all of expert e), kColVecs vectors of columns at a time so that
// those columns of B[e] stay in L1 across the group (B is read once). A token's slot-0 product is added to its output
// row in place: no other thread writes that row meanwhile, since its other slots go to `rows` [T, k - 1, d_out].
void Expand(const Problem& p, const int64_t* order, int64_t begin, int64_t end, const float* be, const float* h,
            float* rows) {
  constexpr int64_t kCols = kColVecs * kLanes;
  const int64_t full = p.d_out / kCols * kCols;
  auto target = [&](int64_t assignment) {
    const int64_t token = assignment / p.k, slot = assignment % p.k;
    return slot == 0 ? p.out + token * p.d_out : rows + (token * (p.k - 1) + slot - 1) * p.d_out;
  };
  for (int64_t c0 = 0; c0 < full; c0 += kCols) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t assignment = order[g];
      const float* hrow = h + assignment * p.rank;
      float* dst = target(assignment) + c0;
      const bool add = assignment % p.k == 0;
      Vec acc[kColVecs];
      for (int v = 0; v < kColVecs; ++v) acc[v] = add ? Load(dst + v * kLanes) : Vec{};
      for (int64_t i = 0; i < p.rank; ++i) {
        const float c = hrow[i];
        const float* brow = be + i * p.d_out + c0;
        if (g == begin) {  // the next tile of this row (past the last tile: the start of the next row or expert)
          for (int64_t l = 0; l < kCols; l += 64 / sizeof(float)) __builtin_prefetch(brow + kCols + l);
        }
        for (int v = 0; v < kColVecs; ++v) acc[v] += c * Load(brow + v * kLanes);
      }
      for (int v = 0; v < kColVecs; ++v) Store(dst + v * kLanes, acc[v]);
    }
  }
  for (int64_t g = begin; full < p.d_out && g < end; ++g) {  // the last d_out % kCols columns
    const int64_t assignment = order[g];
    float* dst = target(assignment);
    for (int64_t o = full; o < p.d_out; ++o) {
      float acc = assignment % p.k == 0 ? dst[o] : 0.0f;
      for (int64_t i = 0; i < p.rank; ++i) acc += h[assignment * p.rank + i] * be[i * p.d_out + o];
      dst[o] = acc;
    }
  }
}

void RoutedLora(ffi::ThreadPool& pool, const Problem& p) {
  // The assignments sorted by expert: A[e] and B[e] are read once, for all of e's tokens.
  const int64_t n = p.tokens * p.k, num_experts = p.num_experts;
  std::vector<int64_t> by_expert, expert_start;
  SortByExpert(p.experts, n, num_experts, by_expert, expert_start);

  // Fully written before they are read: h by the shrink, rows (slots 1..k-1) by the expand. Both are kept per calling
  // thread across calls: a fresh allocation of rows' size comes from mmap, and faulting its pages in on every call
  // cost more than the expand's arithmetic.
  thread_local std::vector<float> h_scratch, rows_scratch;
  float* h = Scratch(h_scratch, n * p.rank);
  float* rows = Scratch(rows_scratch, p.tokens * (p.k - 1) * p.d_out);
  const int64_t tasks = (num_experts + kExpertsPerTask - 1) / kExpertsPerTask;
  auto experts_of = [&](int64_t task, auto&& body) {
    for (int64_t e = task * kExpertsPerTask; e < std::min(num_experts, (task + 1) * kExpertsPerTask); ++e) body(e);
  };
  ParallelFor(pool, tasks, [&](int64_t task) {
    experts_of(task, [&](int64_t e) {
      const float* ae = p.a + e * p.d_in * p.rank;
      const int64_t begin = expert_start[e], end = expert_start[e + 1];
      switch (p.rank) {
        case 8: ShrinkVec<8>(p, by_expert.data(), begin, end, ae, h); break;
        case 16: ShrinkVec<16>(p, by_expert.data(), begin, end, ae, h); break;
        case 32: ShrinkVec<32>(p, by_expert.data(), begin, end, ae, h); break;
        case 64: ShrinkVec<64>(p, by_expert.data(), begin, end, ae, h); break;
        default: ShrinkAny(p, by_expert.data(), begin, end, ae, h);
      }
      Expand(p, by_expert.data(), begin, end, p.b + e * p.rank * p.d_out, h, rows);
    });
  });
  constexpr int64_t kTokensPerTask = 16;
  if (p.k > 1) {
    ParallelFor(pool, (p.tokens + kTokensPerTask - 1) / kTokensPerTask, [&](int64_t task) {
      for (int64_t t = task * kTokensPerTask; t < std::min(p.tokens, (task + 1) * kTokensPerTask); ++t) {
        float* orow = p.out + t * p.d_out;
        for (int64_t s = 1; s < p.k; ++s) {
          const float* row = rows + (t * (p.k - 1) + s - 1) * p.d_out;
          for (int64_t o = 0; o < p.d_out; ++o) orow[o] += row[o];
        }
      }
    });
  }
  ReleaseLarge(h_scratch);
  ReleaseLarge(rows_scratch);
}

ffi::Error RoutedLoraImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> a,
                          ffi::Buffer<ffi::F32> b, ffi::Buffer<ffi::S32> experts, ffi::Buffer<ffi::F32> weights,
                          ffi::Buffer<ffi::F32> base, ffi::ResultBuffer<ffi::F32> out) {
  const auto xd = x.dimensions(), ad = a.dimensions(), bd = b.dimensions(), ed = experts.dimensions();
  const auto wd = weights.dimensions();
  if (xd.size() != 2 || ad.size() != 3 || bd.size() != 3 || ed.size() != 2 || wd.size() != 2 || wd[0] != ed[0] ||
      wd[1] != ed[1]) {
    return ffi::Error::InvalidArgument(
        "routed_lora_cpu: expected x [T, d_in], a [E, d_in, r], b [E, r, d_out], experts and weights [T, k], "
        "base and out [T, d_out]");
  }
  const Problem p{x.typed_data(), a.typed_data(), b.typed_data(), experts.typed_data(), weights.typed_data(),
                  out->typed_data(), xd[0], xd[1], ad[0], ad[2], bd[2], ed[1]};
  const auto based = base.dimensions(), od = out->dimensions();
  if (based.size() != 2 || od.size() != 2 || based[0] != p.tokens || od[0] != p.tokens || based[1] != p.d_out ||
      od[1] != p.d_out) {
    return ffi::Error::InvalidArgument("routed_lora_cpu: expected base and out [T, d_out]");
  }
  if (ad[1] != p.d_in || bd[0] != p.num_experts || bd[1] != p.rank || ed[0] != p.tokens) {
    return ffi::Error::InvalidArgument("routed_lora_cpu: the shapes of x, a, b and experts disagree");
  }
  for (int64_t i = 0; i < p.tokens * p.k; ++i) {
    if (p.experts[i] < 0 || p.experts[i] >= p.num_experts) {
      return ffi::Error::InvalidArgument("routed_lora_cpu: an expert id is outside [0, E)");
    }
  }
  RoutedLora(pool, p);
  return ffi::Error::Success();
}


// A float's rank in IEEE total order as a signed integer: -NaN < -inf < ... < -0 < +0 < ... < +inf < +NaN, the order
// of jax.lax.top_k.
inline int32_t TotalOrderKey(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits ^ ((bits >> 31) & 0x7fffffff);
}

// indices[row] = the k largest scores[row] in total order, largest first; equal scores in index order (as
// jax.lax.top_k). One pass per row, keeping the best k sorted by insertion.
ffi::Error TopKImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> scores, ffi::ResultBuffer<ffi::S32> indices) {
  const auto sd = scores.dimensions(), id = indices->dimensions();
  if (sd.size() != 2 || id.size() != 2 || id[0] != sd[0] || id[1] > sd[1]) {
    return ffi::Error::InvalidArgument("top_k_cpu: expected scores [rows, n] and indices [rows, k], k <= n");
  }
  const int64_t rows = sd[0], n = sd[1], k = id[1];
  const float* sp = scores.typed_data();
  int32_t* ip = indices->typed_data();
  constexpr int64_t kRowsPerTask = 64;
  ParallelFor(pool, (rows + kRowsPerTask - 1) / kRowsPerTask, [&](int64_t task) {
    std::vector<int32_t> keys(k);
    for (int64_t row = task * kRowsPerTask; row < std::min(rows, (task + 1) * kRowsPerTask); ++row) {
      const float* s = sp + row * n;
      int32_t* best = ip + row * k;
      int64_t kept = 0;
      for (int64_t e = 0; e < n; ++e) {
        const int32_t key = TotalOrderKey(s[e]);
        if (kept == k && key <= keys[k - 1]) continue;  // not better than the k-th (a tie keeps the lower index)
        int64_t j = kept < k ? kept++ : k - 1;
        for (; j > 0 && keys[j - 1] < key; --j) {
          keys[j] = keys[j - 1];
          best[j] = best[j - 1];
        }
        keys[j] = key;
        best[j] = static_cast<int32_t>(e);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxRoutedLoraCpu, RoutedLoraImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MoeJaxTopKCpu, TopKImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
