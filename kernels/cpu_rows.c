// Cold-row CPU kernels: read each needed row once, in place, in its packed type (kernels/rows.py), and
// convert to fp32 in registers: no gathered copy of the rows is ever made. kernels/cpu.py builds this file
// with the system C compiler (-O3 -march=native -fopenmp) and calls it through ctypes.
//
// Every kernel first lists the rows some token needs (every thread scans a slice of the rows), then splits
// that list evenly over the threads: each thread streams whole rows, and the result does not depend on how
// fast each thread runs (sums are fp32 in a fixed order for a given thread count).
//
// gate_up and down are the two halves of the sparse FFN; ffn does both in one pass over each row (gate, up,
// and the down row only where the activation is nonzero); cold_step runs ffn for every split layer of a decode
// step, each as soon as the GPU says that layer's input is ready (kernels/handoff.py).
#include <math.h>
#include <omp.h>
#if defined(__F16C__) || defined(__SSE2__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4 };
enum { RELU = 0, DRELU = 1, SILU = 2 };
#define MAX_TOKENS 8  // tokens per call (kernels/cpu.py sends more to torch's matrix products)
#define CHUNK 512     // elements decoded at a time (a multiple of the 32-element GGUF block)

static float half_to_float(const uint8_t* p) {
  _Float16 h;
  memcpy(&h, p, 2);
  return (float)h;
}

// Elements [c, c + n) of a packed row as fp32: a pointer into the row for f32, else decoded into buf.
static const float* decode(const uint8_t* row, int wt, int c, int n, float* buf) {
  if (wt == F32) return (const float*)row + c;
  if (wt == F16) {
    const _Float16* p = (const _Float16*)row + c;
    int i = 0;
#if defined(__F16C__)  // compilers do not vectorize the plain loop on x86
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + i))));
#endif
    for (; i < n; ++i) buf[i] = (float)p[i];
  } else if (wt == BF16) {
    const uint16_t* p = (const uint16_t*)row + c;
    for (int i = 0; i < n; ++i) {
      uint32_t bits = (uint32_t)p[i] << 16;
      memcpy(buf + i, &bits, 4);
    }
  } else if (wt == Q8_0) {  // 34-byte blocks: fp16 scale, 32 int8
    for (int b = 0; b < n / 32; ++b) {
      const uint8_t* blk = row + (c / 32 + b) * 34;
      const float d = half_to_float(blk);
      const int8_t* q = (const int8_t*)(blk + 2);
      for (int k = 0; k < 32; ++k) buf[32 * b + k] = d * q[k];
    }
  } else {  // Q4_0, 18-byte blocks: fp16 scale, 16 bytes; element k < 16 is the low nibble of byte k
    for (int b = 0; b < n / 32; ++b) {
      const uint8_t* blk = row + (c / 32 + b) * 18;
      const float d = half_to_float(blk);
      for (int k = 0; k < 16; ++k) {
        buf[32 * b + k] = d * ((blk[2 + k] & 15) - 8);
        buf[32 * b + k + 16] = d * ((blk[2 + k] >> 4) - 8);
      }
    }
  }
  return buf;
}

// *g += gv . x and *u += uv . x over n elements, each in 32 independent lanes (8 FMA chains in flight).
static void dot2(const float* gv, const float* uv, const float* x, int n, float* g, float* u) {
  float gs[32] = {0}, us[32] = {0};
  int i = 0;
  for (; i + 32 <= n; i += 32)
    for (int k = 0; k < 32; ++k) {
      gs[k] += gv[i + k] * x[i + k];
      us[k] += uv[i + k] * x[i + k];
    }
  for (; i < n; ++i) {
    *g += gv[i] * x[i];
    *u += uv[i] * x[i];
  }
  for (int k = 0; k < 32; ++k) {
    *g += gs[k];
    *u += us[k];
  }
}

// powerinfer_py.model.ffn_activation for one neuron.
static float activation(float g, float u, int act, float threshold) {
  float a = act == SILU ? g / (1.0f + expf(-g)) : fmaxf(g, 0.0f);
  if (threshold > 0.0f && !(a > threshold)) a = 0.0f;
  return a * (act == DRELU ? fmaxf(u, 0.0f) : u);
}

// Byte offset of element c (a multiple of 32 for the quantized types) in a packed row.
static int64_t element_offset(int wt, int64_t c) {
  switch (wt) {
    case F32: return 4 * c;
    case F16: case BF16: return 2 * c;
    case Q8_0: return c / 32 * 34;
    default: return c / 32 * 18;
  }
}

// Software prefetch into all cache levels (hints 3 and 2 measured alike; 0, non-temporal, was 25% slower).
static void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, 3);
}

// Inside a parallel region: the rows r < m with needed(r), ascending, as a list split evenly over the threads.
// Each thread scans one slice of the rows into its part of scan (m slots) and counts its finds in counts (a
// slot per thread); after one barrier every thread knows where each part lands in the joined list.
typedef int (*needed_fn)(const void* ctx, int64_t r);

typedef struct {
  const int32_t* scan;
  const int64_t* counts;
  int64_t m, n;  // n: rows listed in all
  int nt;
} row_list;

static row_list list_rows(needed_fn needed, const void* ctx, int64_t m, int32_t* scan, int64_t* counts) {
  const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
  const int64_t r0 = m * tid / nt, r1 = m * (tid + 1) / nt;
  int64_t n = 0;
  for (int64_t r = r0; r < r1; ++r)
    if (needed(ctx, r)) scan[r0 + n++] = (int32_t)r;
  counts[tid] = n;
#pragma omp barrier
  row_list list = {scan, counts, m, 0, nt};
  for (int k = 0; k < nt; ++k) list.n += counts[k];
  return list;
}

// This thread's share of the joined list, [*i0, *i1), copied to joined[*i0, *i1) (m slots; shares do not overlap).
static void my_share(const row_list* list, int32_t* joined, int64_t* i0, int64_t* i1) {
  const int tid = omp_get_thread_num();
  *i0 = list->n * tid / list->nt;
  *i1 = list->n * (tid + 1) / list->nt;
  int32_t* out = joined + *i0;
  int64_t i = *i0, start = 0;  // start: where part k begins in the joined list
  for (int k = 0; k < list->nt && i < *i1; ++k) {
    const int64_t end = start + list->counts[k], r0 = list->m * k / list->nt;
    for (; i < *i1 && i < end; ++i) *out++ = list->scan[r0 + i - start];
    start = end;
  }
}

typedef struct {
  const int64_t* neuron_idx;
  const uint8_t* active;
  int64_t n_ff;
  int T;
} active_ctx;

// A row is needed when some token has its neuron active.
static int row_active(const void* p, int64_t j) {
  const active_ctx* c = p;
  const int64_t n = c->neuron_idx[j];
  int any = 0;
  for (int t = 0; t < c->T; ++t) any |= c->active[t * c->n_ff + n];
  return any;
}

typedef struct {
  active_ctx rows;
  float* h;
  int64_t h_stride;
  int full;
} gate_up_ctx;

// row_active, and rows no token needs get h = 0 here.
static int gate_up_needed(const void* p, int64_t j) {
  const gate_up_ctx* c = p;
  const int any = row_active(&c->rows, j);
  if (!any) {
    const int64_t col = c->full ? c->rows.neuron_idx[j] : j;
    for (int t = 0; t < c->rows.T; ++t) c->h[t * c->h_stride + col] = 0.0f;
  }
  return any;
}

// g[t] = gate_row . x_t and u[t] = up_row . x_t for the T tokens, decoding CHUNK elements at a time; as it goes it
// prefetches the same elements of the n_ahead rows in `ahead` (rows read next).
static void gate_up_dots(const uint8_t* grow, const uint8_t* urow, int wt, const float* x, int d, int T,
                         float* g, float* u, const uint8_t* const* ahead, int n_ahead) {
  float gbuf[CHUNK], ubuf[CHUNK];
  for (int t = 0; t < T; ++t) g[t] = u[t] = 0.0f;
  for (int c = 0; c < d; c += CHUNK) {
    const int len = d - c < CHUNK ? d - c : CHUNK;
    const int64_t b0 = element_offset(wt, c), b1 = element_offset(wt, c + len);
    for (int k = 0; k < n_ahead; ++k) prefetch(ahead[k] + b0, b1 - b0);
    const float* gv = decode(grow, wt, c, len, gbuf);
    const float* uv = decode(urow, wt, c, len, ubuf);
    for (int t = 0; t < T; ++t) dot2(gv, uv, x + (int64_t)t * d + c, len, g + t, u + t);
  }
}

// h[t, j] (compact, stride m) or h[t, neuron_idx[j]] (full, stride n_ff) = activation of row j for token t,
// 0 where active[t, neuron_idx[j]] is false. x: fp32 (T, d).
void gate_up(const uint8_t* gate, const uint8_t* up, int64_t row_bytes, int wt, const int64_t* neuron_idx,
             int64_t m, const uint8_t* active, int64_t n_ff, const float* x, int d, int T, int act,
             float threshold, float* h, int full, int n_threads) {
  const gate_up_ctx ctx = {{neuron_idx, active, n_ff, T}, h, full ? n_ff : m, full};
  int32_t* scan = malloc(2 * m * sizeof(int32_t)), *joined = scan + m;
  int64_t counts[n_threads];
#pragma omp parallel num_threads(n_threads)
  {
    const row_list list = list_rows(gate_up_needed, &ctx, m, scan, counts);
    int64_t i0, i1;
    my_share(&list, joined, &i0, &i1);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = joined[i];
      float g[MAX_TOKENS], u[MAX_TOKENS];
      gate_up_dots(gate + j * row_bytes, up + j * row_bytes, wt, x, d, T, g, u, NULL, 0);
      const int64_t n_j = neuron_idx[j], col = full ? n_j : j;
      for (int t = 0; t < T; ++t)
        h[t * ctx.h_stride + col] = active[t * n_ff + n_j] ? activation(g[t], u[t], act, threshold) : 0.0f;
    }
  }
  free(scan);
}

// Model-dtype vectors (F32, F16 or BF16) to and from fp32.
static void to_float(const void* src, int type, int64_t n, float* dst) {
  for (int64_t c = 0; c < n; c += CHUNK) {
    const int len = n - c < CHUNK ? n - c : CHUNK;
    const float* v = decode((const uint8_t*)src, type, c, len, dst + c);
    if (v != dst + c) memcpy(dst + c, v, len * sizeof(float));  // f32: decode points into the source
  }
}

static void from_float(const float* src, int64_t n, int type, void* dst) {
  int64_t i = 0;
#if defined(__F16C__)  // as in decode: the plain loop converts one element at a time
  if (type == F16)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128((__m128i*)((uint16_t*)dst + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) {
    if (type == F32) {
      ((float*)dst)[i] = src[i];
    } else if (type == F16) {
      ((_Float16*)dst)[i] = (_Float16)src[i];
    } else {  // bf16, round to nearest even (values here are finite)
      uint32_t bits;
      memcpy(&bits, src + i, 4);
      ((uint16_t*)dst)[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
    }
  }
}

// acc (T, d) += a[t] * the down row in columns [c0, c1) (c0 a multiple of 32), for the tokens with a[t] != 0.
static void add_row(const uint8_t* row, int wt, int c0, int c1, int d, const float* a, int T, float* acc) {
  float buf[CHUNK];
  for (int c = c0; c < c1; c += CHUNK) {
    const int len = c1 - c < CHUNK ? c1 - c : CHUNK;
    const float* v = decode(row, wt, c, len, buf);
    for (int t = 0; t < T; ++t) {
      if (a[t] == 0.0f) continue;
      float* out = acc + (int64_t)t * d + c;
#pragma omp simd
      for (int k = 0; k < len; ++k) out[k] += a[t] * v[k];
    }
  }
}

// Whether thread p of nt has rows in an even split of n rows (my_share); a thread without rows leaves its
// partial untouched, and add_partials skips it (adding its zeros would change nothing).
static int has_share(int64_t n, int p, int nt) { return n * (p + 1) / nt > n * p / nt; }

// Inside a parallel region, after a barrier: y (T, d), of type y_type, = the per-thread fp32 partials of the
// threads with rows (of nt, sharing n rows) added in thread order (each thread writes its slice of y).

static void add_partials(const float* partial, int64_t n, int nt, int T, int d, void* y, int y_type) {
  const int tid = omp_get_thread_num();
  const int64_t total = (int64_t)T * d, k0 = total * tid / nt, k1 = total * (tid + 1) / nt;
  const float* parts[nt];
  int n_parts = 0;
  for (int p = 0; p < nt; ++p)
    if (has_share(n, p, nt)) parts[n_parts++] = partial + (size_t)p * total;
  float sums[CHUNK];
  for (int64_t k = k0; k < k1; k += CHUNK) {
    const int len = k1 - k < CHUNK ? k1 - k : CHUNK;
    for (int i = 0; i < len; ++i) {
      float v = 0.0f;
      for (int p = 0; p < n_parts; ++p) v += parts[p][k + i];
      sums[i] = v;
    }
    from_float(sums, len, y_type, (uint8_t*)y + element_offset(y_type, k));
  }
}

typedef struct {
  const float* h;
  int64_t m;
  int T;
} down_ctx;

static int down_needed(const void* p, int64_t r) {
  const down_ctx* c = p;
  int any = 0;
  for (int t = 0; t < c->T; ++t) any |= c->h[t * c->m + r] != 0.0f;
  return any;
}

// y (T, d) = sum over rows r with h[t, r] != 0 of h[t, r] * down[r]: each thread sums its share of the rows
// into its own fp32 partial, then the partials are added in thread order.
void down(const uint8_t* down_rows, int64_t row_bytes, int wt, int64_t m, int d, const float* h, int T,
          float* y, int n_threads) {
  const down_ctx ctx = {h, m, T};
  int32_t* scan = malloc(2 * m * sizeof(int32_t)), *joined = scan + m;
  float* partial = malloc((size_t)n_threads * T * d * sizeof(float));
  int64_t counts[n_threads];
#pragma omp parallel num_threads(n_threads)
  {
    const row_list list = list_rows(down_needed, &ctx, m, scan, counts);
    const int nt = list.nt;
    int64_t i0, i1;
    my_share(&list, joined, &i0, &i1);
    float* acc = partial + (size_t)omp_get_thread_num() * T * d;
    if (i1 > i0) memset(acc, 0, (size_t)T * d * sizeof(float));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = joined[i];
      float a[MAX_TOKENS];
      for (int t = 0; t < T; ++t) a[t] = h[t * m + r];
      add_row(down_rows + r * row_bytes, wt, 0, d, d, a, T, acc);
    }
#pragma omp barrier
    add_partials(partial, list.n, nt, T, d, y, F32);
  }
  free(partial);
  free(scan);
}

// One layer's rows as ffn reads them: gate, up and down_t share row_bytes; row j is neuron neuron_idx[j].
typedef struct {
  const uint8_t* gate;
  const uint8_t* up;
  const uint8_t* down;
  int64_t row_bytes;
  const int64_t* neuron_idx;
  int64_t m;
} rows_desc;

// acc (T, d) += activation(gate_j . x, up_j . x) * down_j for the tokens with neuron_idx[j] active; the down row
// is used only when some activation is nonzero. Prefetches, as it goes, this row's down row and the gate and up
// rows of the next row (next_gate/next_up, NULL: none): on the device this took the cold rows of a 7B layer at
// 8 GiB from a median 188-221 to 145-149 us (hardware prefetchers stop at each 4 KiB page; rows are scattered).
static void row_ffn(const rows_desc* r, int wt, int64_t j, const uint8_t* next_gate, const uint8_t* next_up,
                    const uint8_t* active, int64_t n_ff, const float* x, int d, int T, int act, float threshold,
                    float* acc) {
  const int64_t n = r->neuron_idx[j];
  const uint8_t* drow = r->down + j * r->row_bytes;
  const uint8_t* ahead[3] = {drow, next_gate, next_up};  // most predicted-active rows need their down row
  float g[MAX_TOKENS], u[MAX_TOKENS], a[MAX_TOKENS];
  gate_up_dots(r->gate + j * r->row_bytes, r->up + j * r->row_bytes, wt, x, d, T, g, u, ahead, next_gate ? 3 : 1);
  int any = 0;
  for (int t = 0; t < T; ++t) {
    a[t] = active[t * n_ff + n] ? activation(g[t], u[t], act, threshold) : 0.0f;
    any |= a[t] != 0.0f;
  }
  if (any) add_row(drow, wt, 0, d, d, a, T, acc);
}

// Scratch of ffn_region: scan (2 m int32: the row list), counts (a slot per thread), partial (threads x T x d).
typedef struct {
  int32_t* scan;
  int64_t* counts;
  float* partial;
} scratch;

// Inside a parallel region: y (T, d), of type y_type, = the rows' FFN output for the active neurons (x fp32).
// Ends with a barrier, so the scratch can be reused at once. Returns the number of rows some token needed.
static int64_t ffn_region(const rows_desc* r, int wt, const uint8_t* active, int64_t n_ff, const float* x, int d,
                       int T, int act, float threshold, const scratch* s, void* y, int y_type) {
  const active_ctx ctx = {r->neuron_idx, active, n_ff, T};
  const row_list list = list_rows(row_active, &ctx, r->m, s->scan, s->counts);
  int32_t* joined = s->scan + r->m;
  int64_t i0, i1;
  my_share(&list, joined, &i0, &i1);
  float* acc = s->partial + (size_t)omp_get_thread_num() * T * d;
  if (i1 > i0) memset(acc, 0, (size_t)T * d * sizeof(float));
  for (int64_t i = i0; i < i1; ++i) {
    const uint8_t* next_gate = i + 1 < i1 ? r->gate + joined[i + 1] * r->row_bytes : NULL;
    const uint8_t* next_up = i + 1 < i1 ? r->up + joined[i + 1] * r->row_bytes : NULL;
    row_ffn(r, wt, joined[i], next_gate, next_up, active, n_ff, x, d, T, act, threshold, acc);
  }
#pragma omp barrier
  add_partials(s->partial, list.n, list.nt, T, d, y, y_type);
#pragma omp barrier
  return list.n;
}

static scratch new_scratch(int64_t m, int n_threads, int T, int d) {
  scratch s = {malloc(2 * (m ? m : 1) * sizeof(int32_t)), malloc(n_threads * sizeof(int64_t)),
               malloc((size_t)n_threads * T * d * sizeof(float))};
  return s;
}

static void free_scratch(scratch* s) {
  free(s->scan);
  free(s->counts);
  free(s->partial);
}

// y (T, d) of type y_type = sum over active neurons of activation * down row; x (T, d) fp32.
void ffn(const uint8_t* gate, const uint8_t* up, const uint8_t* down, int64_t row_bytes, int wt,
         const int64_t* neuron_idx, int64_t m, const uint8_t* active, int64_t n_ff, const float* x, int d, int T,
         int act, float threshold, void* y, int y_type, int n_threads) {
  const rows_desc r = {gate, up, down, row_bytes, neuron_idx, m};
  scratch s = new_scratch(m, n_threads, T, d);
#pragma omp parallel num_threads(n_threads)
  ffn_region(&r, wt, active, n_ff, x, d, T, act, threshold, &s, y, y_type);
  free_scratch(&s);
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);  // the clock of Python's time.perf_counter and of torch's profiler
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

// The CPU half of one decode step (one token). For each split layer l in order: wait until the GPU has written x_host
// (d, type x_type) and row l of cold_list and set x_ready[l] = epoch, compute the layer's listed cold rows into y_host
// (same type), then set y_ready[l] = epoch (the GPU waits for it). cold_list (n_layers, list_len) int32, written by
// handoff.cu send_to_host: per layer, its active neurons, the number n of its active cold rows, then those rows
// (indices into the layer's rows, ascending). In a layer of more than FEW_ROWS rows (or of none; a few rows: below)
// only the first k = max(1, min(n, n_threads)) threads take part (the others go on to wait for the next one, so a late
// one must still find this layer's list: one row per layer). Each computes the activations of its share of the listed
// rows (gate, up); they meet once; then each adds every listed row's down row times its activation over its own slice
// of the columns, in list order, and writes that slice of y (no partial sums to add up across threads, and y does not
// depend on k); the last to finish raises the flag. times[2 l], times[2 l + 1]: when the input was seen and the output
// published; counts[2 l], counts[2 l + 1]: the layer's active neurons and active cold rows (the GPU hit rate). Returns
// 0, or -1 if the GPU did not signal within timeout_s.
// A layer with at most FEW_ROWS listed rows (a well placed layer's usual case) is split by columns instead, so
// that every thread takes part: blocks of COL_BLOCK columns, each thread a run of them, whose slices of every
// listed row (gate, up and down) it asks for at once; each block's share of each row's gate and up products is
// kept apart and the shares added in block order, so that the result does not depend on the thread count either.
#define DOWN_AHEAD 8  // down rows whose column slice a thread prefetches ahead of its use
#define FEW_ROWS 16
#define COL_BLOCK 256  // a multiple of 32 (GGUF blocks)

int cold_step(const rows_desc* layers, int n_layers, int wt, int d, int act, float threshold, const void* x_host,
              int x_type, const int32_t* cold_lists, int64_t list_len, void* y_host, volatile int32_t* x_ready,
              volatile int32_t* y_ready, int32_t epoch, double timeout_s, double* times, int64_t* counts,
              int n_threads) {
  int64_t max_m = 1;
  for (int l = 0; l < n_layers; ++l) max_m = layers[l].m > max_m ? layers[l].m : max_m;
  float* x = malloc((size_t)n_threads * d * sizeof(float));  // each thread's fp32 copy of x
  float* y = malloc((size_t)n_threads * d * sizeof(float));  // each thread's sums (its slice of the columns)
  float* acts = malloc(max_m * sizeof(float));  // the listed rows' activations, in list order
  const int col_blocks = (d + COL_BLOCK - 1) / COL_BLOCK;
  float* shares = malloc((size_t)FEW_ROWS * col_blocks * 2 * sizeof(float));  // few rows: [row][block][gate, up]
  int32_t* met = calloc(2 * (size_t)n_layers, sizeof(int32_t));  // per layer: threads at the meeting, done
  volatile int abort_step = 0;
#pragma omp parallel num_threads(n_threads)
  {
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    float* my_x = x + (size_t)tid * d;
    float* my_y = y + (size_t)tid * d;
    for (int l = 0; l < n_layers && !abort_step; ++l) {
      const double t0 = now();
      for (int spins = 0; x_ready[l] != epoch && !abort_step; ++spins) {
        _mm_pause();
        if (tid == 0 && (spins & 1023) == 0 && now() - t0 > timeout_s) abort_step = 1;
      }
      if (abort_step) break;
      __atomic_thread_fence(__ATOMIC_ACQUIRE);
      const int32_t* cold_list = cold_lists + l * list_len;
      const int64_t n_active = cold_list[0], n = cold_list[1];
      const int32_t* listed = cold_list + 2;
      const int few = n >= 1 && n <= FEW_ROWS;
      const int k = few ? (col_blocks < nt ? col_blocks : nt) : n < 1 ? 1 : (n < nt ? (int)n : nt);
      if (tid >= k) continue;
      if (tid == 0) times[2 * l] = now();
      const rows_desc* r = layers + l;
      // this thread's columns: a run of COL_BLOCK blocks (few rows) or of 32 columns
      const int unit = few ? COL_BLOCK : 32, units = (d + unit - 1) / unit;
      const int c0 = unit * (units * tid / k), c1 = tid == k - 1 ? d : unit * (units * (tid + 1) / k);
      const int64_t b0 = element_offset(wt, c0), b1 = element_offset(wt, c1);
      float* row_acts = acts;
      float few_acts[FEW_ROWS];
      if (few) {
        for (int64_t i = 0; i < n; ++i) {
          prefetch(r->gate + listed[i] * r->row_bytes + b0, b1 - b0);
          prefetch(r->up + listed[i] * r->row_bytes + b0, b1 - b0);
          prefetch(r->down + listed[i] * r->row_bytes + b0, b1 - b0);
        }
        to_float((const uint8_t*)x_host + element_offset(x_type, c0), x_type, c1 - c0, my_x + c0);
        for (int64_t i = 0; i < n; ++i)
          for (int c = c0; c < c1; c += COL_BLOCK) {
            const int len = c1 - c < COL_BLOCK ? c1 - c : COL_BLOCK;
            float gbuf[COL_BLOCK], ubuf[COL_BLOCK], g = 0.0f, u = 0.0f;
            dot2(decode(r->gate + listed[i] * r->row_bytes, wt, c, len, gbuf),
                 decode(r->up + listed[i] * r->row_bytes, wt, c, len, ubuf), my_x + c, len, &g, &u);
            float* share = shares + 2 * (i * col_blocks + c / COL_BLOCK);
            share[0] = g;
            share[1] = u;
          }
      } else {
        for (int64_t i = 0; i < n && i < DOWN_AHEAD; ++i)
          prefetch(r->down + listed[i] * r->row_bytes + b0, b1 - b0);
        const int64_t i0 = n * tid / k, i1 = n * (tid + 1) / k;
        if (i1 > i0) to_float(x_host, x_type, d, my_x);
        for (int64_t i = i0; i < i1; ++i) {
          const uint8_t* ahead[2] = {NULL, NULL};  // the next row's gate and up
          if (i + 1 < i1) {
            ahead[0] = r->gate + listed[i + 1] * r->row_bytes;
            ahead[1] = r->up + listed[i + 1] * r->row_bytes;
          }
          float g, u;
          gate_up_dots(r->gate + listed[i] * r->row_bytes, r->up + listed[i] * r->row_bytes, wt, my_x, d, 1, &g,
                       &u, ahead, ahead[0] ? 2 : 0);
          acts[i] = activation(g, u, act, threshold);
        }
      }
      int32_t* arrived = met + 2 * l;
      __atomic_add_fetch(arrived, 1, __ATOMIC_ACQ_REL);
      while (__atomic_load_n(arrived, __ATOMIC_ACQUIRE) < k && !abort_step) _mm_pause();
      if (abort_step) break;
      if (few) {  // every thread adds the blocks' shares up, in block order
        row_acts = few_acts;
        for (int64_t i = 0; i < n; ++i) {
          float g = 0.0f, u = 0.0f;
          for (int b = 0; b < col_blocks; ++b) {
            g += shares[2 * (i * col_blocks + b)];
            u += shares[2 * (i * col_blocks + b) + 1];
          }
          few_acts[i] = activation(g, u, act, threshold);
        }
      }
      memset(my_y + c0, 0, (size_t)(c1 - c0) * sizeof(float));
      for (int64_t i = 0; i < n; ++i) {
        if (!few && i + DOWN_AHEAD < n) prefetch(r->down + listed[i + DOWN_AHEAD] * r->row_bytes + b0, b1 - b0);
        if (row_acts[i] != 0.0f) add_row(r->down + listed[i] * r->row_bytes, wt, c0, c1, d, row_acts + i, 1, my_y);
      }
      from_float(my_y + c0, c1 - c0, x_type, (uint8_t*)y_host + element_offset(x_type, c0));
      if (__atomic_add_fetch(arrived + 1, 1, __ATOMIC_ACQ_REL) == k) {  // the last one out publishes
        counts[2 * l] = n_active;
        counts[2 * l + 1] = n;
        __atomic_store_n(&y_ready[l], epoch, __ATOMIC_RELEASE);
        times[2 * l + 1] = now();
      }
    }
  }
  free(met);
  free(shares);
  free(acts);
  free(y);
  free(x);
  return abort_step ? -1 : 0;
}
