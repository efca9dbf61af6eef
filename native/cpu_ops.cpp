// duoserve's CPU kernels, registered as torch ops (`torch.ops.duoserve.*`): the CPU backend's
// answer to what the Triton kernels do on CUDA. Built by `make cpu-ops` (native/build_cpu_ops.py,
// g++ against the installed torch); services/engine/cpu_ops.py loads the library, and the engine
// falls back to plain torch ops when it is missing.
//
// paged_decode_attention: one new token per row attends to its row's keys straight from the paged
// pool. The torch fallback first copies every block of every row into a dense [B, Hkv, L, D] tensor
// (twice: K and V) and then runs tiny batched matmuls; this reads each key and value once, for all
// G query heads that share its KV head, and allocates nothing but a per-thread score row.
//
// Dtypes: float32, bfloat16 and float16 tensors; the loops read half precision as float32, compute
// in float32 and round once when they store (the attention ops convert q and their output around
// float32 loops; only the KV cache stays in its dtype, which is what halves the bytes decode reads).
//
// Threads: at::parallel_for, i.e. torch's own OpenMP pool (the library links libgomp.so.1 by soname,
// which resolves to the copy torch already loaded). Vector code: the loops (cpu_kernels.inc) are
// compiled for x86-64-v4 (AVX-512), x86-64-v3 (AVX2+FMA) and the baseline; the first call picks the
// best the CPU runs (`torch.ops.duoserve.isa()` says which).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int64_t kAbiVersion = 2;   // ABI_VERSION in services/engine/cpu_ops.py (2: bf16/fp16 too)

struct DecodeShape {
  int64_t num_query_heads_per_kv;   // G: query heads that read one KV head
  int64_t head_dim;                 // D
  int64_t block_size;               // tokens per block
  int64_t block_stride;             // elements from one block to the next in a layer's pool: Hkv * bs * D
};

struct KernelTable {   // one instruction set's loops (cpu_kernels.inc)
  using DecodeFn = void (*)(const float*, const void*, const void*, const int64_t*, int64_t, const DecodeShape&,
                            float, float*, float*, float*);
  DecodeFn decode[3][3];   // [cache type: float32, bfloat16, float16][head dim: 64, 128, any]
  void (*merge_parts)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
  void (*causal_softmax_rows)(float*, int64_t, int64_t, int64_t, int64_t, float*);
  void (*scatter_scaled_rows)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, float*);
  void (*scale_rows)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float, float*);
  // The pointwise rows, [element type: float32, bfloat16, float16] as decode's first index.
  void (*rms_norm_row[3])(const void*, const void*, void*, int64_t, float);
  void (*silu_and_mul_row[3])(const void*, const void*, void*, int64_t);
  void (*rotate_row[3])(void*, const void*, const void*, int64_t, int64_t, int64_t);
};

}  // namespace

// The loops, once per instruction set. GCC's target_clones would be shorter, but GCC 12 resolves
// its arch=x86-64-vN clones by CPU model name and so falls back to the baseline on most CPUs.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DUO_HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
namespace duo_x86_64_v4 {
using ::DecodeShape;
using ::KernelTable;
#include "cpu_kernels.inc"
}  // namespace duo_x86_64_v4
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
namespace duo_x86_64_v3 {
using ::DecodeShape;
using ::KernelTable;
#include "cpu_kernels.inc"
}  // namespace duo_x86_64_v3
#pragma GCC pop_options
#endif
namespace duo_baseline {
using ::DecodeShape;
using ::KernelTable;
#include "cpu_kernels.inc"
}  // namespace duo_baseline

namespace {

struct Dispatch {
  const KernelTable* table;
  const char* isa;   // which set runs, for logs and tests
};

Dispatch pick_kernels() {
#ifdef DUO_HAVE_X86_VARIANTS
  __builtin_cpu_init();
  if (__builtin_cpu_supports("x86-64-v4")) return {&duo_x86_64_v4::kTable, "x86-64-v4 (AVX-512)"};
  if (__builtin_cpu_supports("x86-64-v3")) return {&duo_x86_64_v3::kTable, "x86-64-v3 (AVX2, FMA)"};
#endif
  return {&duo_baseline::kTable, "baseline"};
}

const Dispatch& dispatch() {
  static const Dispatch chosen = pick_kernels();   // once, at the first call
  return chosen;
}

const KernelTable& kernels() { return *dispatch().table; }

// The element types the kernels read (the first index of KernelTable's per-type entries); anything
// else is the caller's to route to the torch ops.
int64_t type_index(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: break;
  }
  TORCH_CHECK(false, op, ": float32, bfloat16 or float16 only, got ", type);
  return -1;   // not reached: TORCH_CHECK threw
}

// q of the caches' dtype, as the float32 the loops read (a copy unless it is float32 already).
at::Tensor float_queries(const at::Tensor& q, const at::Tensor& k_cache, const char* op) {
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), op, ": q is ", q.scalar_type(), ", the caches ",
              k_cache.scalar_type());
  return q.scalar_type() == at::kFloat ? q : q.to(at::kFloat);
}

// Split-K for decode: with fewer (row, KV head) tasks than kTasksPerThread per thread (small batches,
// many cores), each row's keys are cut into parts of at least kMinPartTokens, computed as separate
// tasks and merged (flash-decoding); otherwise one task per (row, KV head) reads the whole row.
constexpr int64_t kTasksPerThread = 4;
constexpr int64_t kMinPartTokens = 256;

int64_t decode_parts(int64_t num_items, int64_t max_len) {
  const int64_t wanted_items = kTasksPerThread * at::get_num_threads();
  if (num_items >= wanted_items) return 1;
  return std::max<int64_t>(1, std::min((wanted_items + num_items - 1) / num_items, max_len / kMinPartTokens));
}

// q [B, H, D]; k_cache, v_cache [N, Hkv, bs, D]; block_tables [B, M] int64; context_lens [B] int32.
// -> [B, H, D]. Query head h reads KV head h / G, as in the torch reference. num_parts: how many
// parts each row's keys are split into (0: decode_parts decides; tests force it).
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t num_parts) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_decode_attention: q must be [B, H, D] and the caches [N, Hkv, block_size, D]");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "paged_decode_attention: K and V caches differ in dtype");
  const int64_t cache_type = type_index(k_cache.scalar_type(), "paged_decode_attention");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "paged_decode_attention: CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "paged_decode_attention: caches must be contiguous");
  TORCH_CHECK(block_tables.dim() == 2 && context_lens.dim() == 1 && block_tables.scalar_type() == at::kLong &&
                  context_lens.scalar_type() == at::kInt,
              "paged_decode_attention: block_tables [B, M] int64, context_lens [B] int32");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "paged_decode_attention: head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && context_lens.size(0) == B, "paged_decode_attention: one table per row");
  const at::Tensor qc = float_queries(q, k_cache, "paged_decode_attention").contiguous();
  const at::Tensor tables = block_tables.contiguous(), lens = context_lens.contiguous();
  at::Tensor out = at::empty({B, H, D}, qc.options());   // float32; returned in q's dtype
  const int64_t M = tables.size(1);
  const int32_t* lens_ptr = lens.data_ptr<int32_t>();
  const DecodeShape shape{H / Hkv, D, bs, Hkv * bs * D};
  const float* q_ptr = qc.data_ptr<float>();
  const char* k_ptr = static_cast<const char*>(k_cache.data_ptr());
  const char* v_ptr = static_cast<const char*>(v_cache.data_ptr());
  const int64_t head_bytes = bs * D * k_cache.element_size();     // one KV head's slice of a block
  const int64_t* table_ptr = tables.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const int64_t num_blocks = k_cache.size(0);
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(lens_ptr[b] >= 1 && lens_ptr[b] <= M * bs, "paged_decode_attention: row ", b, " has context_len ",
                lens_ptr[b], ", outside 1..", M * bs, " (its table's capacity)");
    max_len = std::max<int64_t>(max_len, lens_ptr[b]);
    for (int64_t j = 0; j < (lens_ptr[b] + bs - 1) / bs; ++j) {     // a bad id would read outside the pool
      TORCH_CHECK(table_ptr[b * M + j] >= 0 && table_ptr[b * M + j] < num_blocks, "paged_decode_attention: row ", b,
                  " names block ", table_ptr[b * M + j], ", outside the pool's 0..", num_blocks - 1);
    }
  }
  TORCH_CHECK(num_parts >= 0, "paged_decode_attention: num_parts must be >= 0 (0: automatic), got ", num_parts);
  const int64_t P = num_parts > 0 ? num_parts : decode_parts(B * Hkv, max_len), G = shape.num_query_heads_per_kv;
  // Parts [B, Hkv, P, G, D] (one task's output contiguous) and their stats [B, Hkv, P, G, 2]; with
  // one part, tasks write their normalized output straight into `out`.
  at::Tensor parts = P > 1 ? at::empty({B, Hkv, P, G, D}, qc.options()) : out;
  at::Tensor stats = at::empty({B, Hkv, P, G, 2}, qc.options());
  float* parts_ptr = parts.data_ptr<float>();
  float* stats_ptr = stats.data_ptr<float>();
  const KernelTable& k = kernels();
  const KernelTable::DecodeFn decode_fn = k.decode[cache_type][D == 64 ? 0 : D == 128 ? 1 : 2];
  at::parallel_for(0, B * Hkv * P, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(G * max_len);
    for (int64_t item = begin; item < end; ++item) {               // item = (b * Hkv + kv_head) * P + part
      const int64_t b = item / (Hkv * P), kv_head = item / P % Hkv, part = item % P;
      const int64_t row_blocks = (lens_ptr[b] + bs - 1) / bs, part_blocks = (row_blocks + P - 1) / P;
      const int64_t first_block = part * part_blocks;
      float* part_stats = stats_ptr + item * G * 2;
      if (first_block >= row_blocks) {                              // a short row: this part has no keys
        for (int64_t g = 0; g < G; ++g) part_stats[2 * g + 1] = 0.0f;
        continue;
      }
      const int64_t part_len = std::min<int64_t>(lens_ptr[b] - first_block * bs, part_blocks * bs);
      decode_fn(q_ptr + (b * H + kv_head * G) * D, k_ptr + kv_head * head_bytes, v_ptr + kv_head * head_bytes,
                table_ptr + b * M + first_block, part_len, shape, static_cast<float>(scale), scores.data(),
                parts_ptr + item * G * D, part_stats);
    }
  });
  if (P > 1) {
    at::parallel_for(0, B * H, 16, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {                     // bh = b * H + kv_head * G + g
        const int64_t first = (bh / H * Hkv + bh % H / G) * P * G + bh % G;   // (b, kv_head, part 0, g)
        k.merge_parts(parts_ptr + first * D, stats_ptr + first * 2, P, G * D, G * 2, D, out_ptr + bh * D);
      }
    });
  }
  return out.to(q.scalar_type());
}

constexpr int64_t kPrefillTile = 64;   // queries per task: with G heads, the GEMMs' M is G * 64

// A layer's keys (or values) of one request, head by head, out of its blocks: -> [Hkv, context_len, D]
// in float32 (the GEMMs' type; other cache dtypes are converted after the copy).
at::Tensor gather_context(const at::Tensor& cache, const int64_t* table, int64_t context_len) {
  const int64_t Hkv = cache.size(1), bs = cache.size(2), D = cache.size(3), esize = cache.element_size();
  at::Tensor out = at::empty({Hkv, context_len, D}, cache.options());
  const char* src = static_cast<const char*>(cache.data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  const int64_t num_blocks = (context_len + bs - 1) / bs;
  at::parallel_for(0, Hkv * num_blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / num_blocks, j = item % num_blocks;
      const int64_t n = std::min(bs, context_len - j * bs);
      std::memcpy(dst + (h * context_len + j * bs) * D * esize, src + ((table[j] * Hkv + h) * bs) * D * esize,
                  n * D * esize);
    }
  });
  return out.scalar_type() == at::kFloat ? out : out.to(at::kFloat);
}

// One prefill chunk: q [n, H, D] (the chunk's queries, at positions context_len - n .. context_len - 1)
// attends causally to the request's first context_len keys in the cache (earlier chunks and this one,
// already written). -> [n, H, D]. Each task is one KV head and a tile of queries: the tile's G heads
// are the rows of two single-threaded GEMMs (scores, then output) over the keys up to the tile's
// last query, so the upper triangle is skipped tile by tile and each key is read once per group.
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                             const at::Tensor& block_table, int64_t context_len, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "prefill_attention: q must be [n, H, D] and the caches [N, Hkv, block_size, D]");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "prefill_attention: K and V caches differ in dtype");
  type_index(k_cache.scalar_type(), "prefill_attention");   // a clear error for other dtypes
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "prefill_attention: CPU tensors only");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "prefill_attention: caches must be contiguous");
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == at::kLong, "prefill_attention: block_table [M] int64");
  const int64_t n = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(1), bs = k_cache.size(2), G = H / Hkv;
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "prefill_attention: head sizes do not match");
  TORCH_CHECK(n >= 1 && context_len >= n && context_len <= block_table.size(0) * bs, "prefill_attention: ", n,
              " queries, context_len ", context_len, " and a table of ", block_table.size(0), " blocks do not fit");
  const at::Tensor table = block_table.contiguous();
  const int64_t* table_ptr = table.data_ptr<int64_t>();
  for (int64_t j = 0; j < (context_len + bs - 1) / bs; ++j) {
    TORCH_CHECK(table_ptr[j] >= 0 && table_ptr[j] < k_cache.size(0), "prefill_attention: block ", table_ptr[j],
                " is outside the pool's 0..", k_cache.size(0) - 1);
  }
  const at::Tensor keys = gather_context(k_cache, table_ptr, context_len);      // [Hkv, ctx, D]
  const at::Tensor values = gather_context(v_cache, table_ptr, context_len);
  const at::Tensor qf = float_queries(q, k_cache, "prefill_attention");
  TORCH_CHECK(qf.stride(2) == 1, "prefill_attention: q's head dim must be contiguous");
  at::Tensor out = at::empty({n, H, D}, qf.options());   // float32; returned in q's dtype
  const int64_t first_pos = context_len - n, num_tiles = (n + kPrefillTile - 1) / kPrefillTile;
  const float* q_ptr = qf.data_ptr<float>();
  const int64_t q_row_stride = qf.stride(0), q_head_stride = qf.stride(1);
  float* out_ptr = out.data_ptr<float>();
  // Tiles take longer the later they sit (more keys): pair the last with the first so the two
  // halves of the task list that parallel_for hands out carry about the same work.
  const at::TensorOptions f32 = qf.options();
  at::parallel_for(0, Hkv * num_tiles, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, sized for the largest task, reused by every task (no allocation per tile).
    const int64_t max_rows = G * std::min(kPrefillTile, n);
    std::vector<float> q_buf(max_rows * D), score_buf(max_rows * context_len), out_buf(max_rows * D), inv_totals(max_rows);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item % Hkv, k = item / Hkv;
      const int64_t tile = k % 2 == 0 ? k / 2 : num_tiles - 1 - k / 2;
      const int64_t r0 = tile * kPrefillTile, rows = std::min(kPrefillTile, n - r0);
      const int64_t num_keys = first_pos + r0 + rows;
      kernels().scale_rows(q_ptr + r0 * q_row_stride + h * G * q_head_stride, q_row_stride, q_head_stride, G, rows, D,
                 static_cast<float>(scale), q_buf.data());
      const at::Tensor q_tile = at::from_blob(q_buf.data(), {G * rows, D}, f32);           // pre-scaled queries
      at::Tensor scores = at::from_blob(score_buf.data(), {G * rows, num_keys}, f32);
      at::mm_out(scores, q_tile, keys[h].narrow(0, 0, num_keys).t());                      // [G * rows, num_keys]
      kernels().causal_softmax_rows(score_buf.data(), G * rows, rows, num_keys, first_pos + r0, inv_totals.data());
      at::Tensor tile_out = at::from_blob(out_buf.data(), {G * rows, D}, f32);
      at::mm_out(tile_out, scores, values[h].narrow(0, 0, num_keys));                      // [G * rows, D]
      kernels().scatter_scaled_rows(out_buf.data(), inv_totals.data(), G, rows, D, H * D, out_ptr + (r0 * H + h * G) * D);
    }
  });
  return out.to(q.scalar_type());
}

// Rows per parallel task so that each task touches at least ~16K floats: decode-sized inputs run
// on the calling thread, where waking the pool would cost more than the work.
int64_t grain_rows(int64_t row_floats) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_floats, 1)); }

// k, v [T, Hkv, D] (each head's D floats contiguous; views into the qkv output are fine) -> the
// caches [N, Hkv, bs, D] at each token's flat slot (block * bs + offset). Slots must be distinct.
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slot_mapping) {
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k.dim() == 3 && v.sizes() == k.sizes(),
              "write_kv: caches [N, Hkv, block_size, D], k and v [T, Hkv, D]");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type() && k.scalar_type() == k_cache.scalar_type() &&
                  v.scalar_type() == k_cache.scalar_type(),
              "write_kv: k, v and the caches must share one dtype");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k.stride(2) == 1 && v.stride(2) == 1,
              "write_kv: contiguous caches, head dim contiguous in k and v");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2), bs = k_cache.size(2);
  TORCH_CHECK(k_cache.size(1) == Hkv && k_cache.size(3) == D, "write_kv: k and v do not match the caches' heads");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == T && slot_mapping.scalar_type() == at::kLong,
              "write_kv: slot_mapping [T] int64");
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  const int64_t num_slots = k_cache.size(0) * bs;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(slot_ptr[t] >= 0 && slot_ptr[t] < num_slots, "write_kv: slot ", slot_ptr[t], " is outside the pool's 0..",
                num_slots - 1);
  }
  // Row copies, so any dtype works: pointers in bytes, strides in elements.
  const int64_t esize = k_cache.element_size();
  const char* k_ptr = static_cast<const char*>(k.data_ptr());
  const char* v_ptr = static_cast<const char*>(v.data_ptr());
  char* kc_ptr = static_cast<char*>(k_cache.data_ptr());
  char* vc_ptr = static_cast<char*>(v_cache.data_ptr());
  at::parallel_for(0, T, grain_rows(2 * Hkv * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t block = slot_ptr[t] / bs, offset = slot_ptr[t] % bs;
      for (int64_t h = 0; h < Hkv; ++h) {
        const int64_t dst = ((block * Hkv + h) * bs + offset) * D * esize;
        std::memcpy(kc_ptr + dst, k_ptr + (t * k.stride(0) + h * k.stride(1)) * esize, D * esize);
        std::memcpy(vc_ptr + dst, v_ptr + (t * v.stride(0) + h * v.stride(1)) * esize, D * esize);
      }
    }
  });
}


// x [T, hidden] (rows contiguous), weight [hidden] -> x / rms(x) * weight, computed in float32 as
// Hugging Face's LlamaRMSNorm does, rounded once to x's dtype.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 1 && weight.size(0) == x.size(1), "rms_norm: x [T, hidden], weight [hidden]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x is ", x.scalar_type(), ", weight ",
              weight.scalar_type());
  const auto row_fn = kernels().rms_norm_row[type_index(x.scalar_type(), "rms_norm")];
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t n = xc.size(1), row_bytes = n * xc.element_size();
  const char* x_ptr = static_cast<const char*>(xc.data_ptr());
  const void* w_ptr = wc.data_ptr();
  char* out_ptr = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, xc.size(0), grain_rows(n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      row_fn(x_ptr + t * row_bytes, w_ptr, out_ptr + t * row_bytes, n, static_cast<float>(eps));
    }
  });
  return out;
}

// x [T, 2 I]: gate then up, as the fused gate_up projection lays them out -> silu(gate) * up [T, I].
at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x [T, 2 I]");
  const auto row_fn = kernels().silu_and_mul_row[type_index(x.scalar_type(), "silu_and_mul")];
  const at::Tensor xc = x.contiguous();
  const int64_t n = xc.size(1) / 2, half_bytes = n * xc.element_size();
  at::Tensor out = at::empty({xc.size(0), n}, xc.options());
  const char* x_ptr = static_cast<const char*>(xc.data_ptr());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, xc.size(0), grain_rows(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      row_fn(x_ptr + 2 * t * half_bytes, x_ptr + (2 * t + 1) * half_bytes, out_ptr + t * half_bytes, n);
    }
  });
  return out;
}

// Rotate-half rotary embedding in place. x [T, heads, D] with each head's D elements contiguous (a
// view into the fused qkv output is fine); cos, sin [T, D/2] for each token's position, x's dtype.
at::Tensor& rotary_embedding_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary_embedding_: x [T, heads, D], D contiguous");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rotary_embedding_: x, cos and sin must share one dtype");
  const auto row_fn = kernels().rotate_row[type_index(x.scalar_type(), "rotary_embedding_")];
  const int64_t T = x.size(0), heads = x.size(1), half = x.size(2) / 2, esize = x.element_size();
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.size(0) == T && cos.size(1) == half, "rotary_embedding_: cos, sin [T, D/2]");
  const at::Tensor cc = cos.contiguous(), sc = sin.contiguous();
  char* x_ptr = static_cast<char*>(x.data_ptr());
  const char* c_ptr = static_cast<const char*>(cc.data_ptr());
  const char* s_ptr = static_cast<const char*>(sc.data_ptr());
  const int64_t row_stride = x.stride(0), head_stride = x.stride(1);
  at::parallel_for(0, T, grain_rows(heads * 2 * half), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      row_fn(x_ptr + t * row_stride * esize, c_ptr + t * half * esize, s_ptr + t * half * esize, heads, head_stride,
             half);
    }
  });
  return x;
}

int64_t abi_version() { return kAbiVersion; }

std::string isa() { return dispatch().isa; }

}  // namespace

TORCH_LIBRARY(duoserve, m) {
  m.def("abi_version() -> int", &abi_version);
  m.def("isa() -> str", &isa);
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int num_parts=0) -> Tensor",
        &paged_decode_attention);
  m.def("prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, int context_len, "
        "float scale) -> Tensor",
        &prefill_attention);
  m.def("write_kv(Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor k, Tensor v, Tensor slot_mapping) -> ()", &write_kv);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("silu_and_mul(Tensor x) -> Tensor", &silu_and_mul);
  m.def("rotary_embedding_(Tensor(a!) x, Tensor cos, Tensor sin) -> Tensor(a!)", &rotary_embedding_);
}
