// Cold-row CPU kernels: read each needed row once, in place, in its packed type (kernels/rows.py), and
// convert to fp32 in registers: no gathered copy of the rows is ever made. kernels/cpu.py builds this file
// with the system C compiler (-O3 -march=native -fopenmp) and calls it through ctypes.
//
// Both kernels first list the rows some token needs (every thread scans a slice of the rows), then split that
// list evenly over the threads: each thread streams whole rows, and the result does not depend on how fast
// each thread runs (sums are fp32 in a fixed order for a given thread count).
#include <math.h>
#include <omp.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
  float* h;
  int64_t h_stride;
  int full;
} gate_up_ctx;

// A row is needed when some token has its neuron active; rows no token needs get h = 0 here.
static int gate_up_needed(const void* p, int64_t j) {
  const gate_up_ctx* c = p;
  const int64_t n = c->neuron_idx[j];
  int any = 0;
  for (int t = 0; t < c->T; ++t) any |= c->active[t * c->n_ff + n];
  if (!any) {
    const int64_t col = c->full ? n : j;
    for (int t = 0; t < c->T; ++t) c->h[t * c->h_stride + col] = 0.0f;
  }
  return any;
}

// h[t, j] (compact, stride m) or h[t, neuron_idx[j]] (full, stride n_ff) = activation of row j for token t,
// 0 where active[t, neuron_idx[j]] is false. x: fp32 (T, d).
void gate_up(const uint8_t* gate, const uint8_t* up, int64_t row_bytes, int wt, const int64_t* neuron_idx,
             int64_t m, const uint8_t* active, int64_t n_ff, const float* x, int d, int T, int act,
             float threshold, float* h, int full, int n_threads) {
  const gate_up_ctx ctx = {neuron_idx, active, n_ff, T, h, full ? n_ff : m, full};
  int32_t* scan = malloc(2 * m * sizeof(int32_t)), *joined = scan + m;
  int64_t counts[n_threads];
#pragma omp parallel num_threads(n_threads)
  {
    const row_list list = list_rows(gate_up_needed, &ctx, m, scan, counts);
    int64_t i0, i1;
    my_share(&list, joined, &i0, &i1);
    float gbuf[CHUNK], ubuf[CHUNK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t j = joined[i];
      const uint8_t* grow = gate + j * row_bytes;
      const uint8_t* urow = up + j * row_bytes;
      float g[MAX_TOKENS] = {0}, u[MAX_TOKENS] = {0};
      for (int c = 0; c < d; c += CHUNK) {
        const int len = d - c < CHUNK ? d - c : CHUNK;
        const float* gv = decode(grow, wt, c, len, gbuf);
        const float* uv = decode(urow, wt, c, len, ubuf);
        for (int t = 0; t < T; ++t) dot2(gv, uv, x + (int64_t)t * d + c, len, g + t, u + t);
      }
      const int64_t n_j = neuron_idx[j], col = full ? n_j : j;
      for (int t = 0; t < T; ++t)
        h[t * ctx.h_stride + col] = active[t * n_ff + n_j] ? activation(g[t], u[t], act, threshold) : 0.0f;
    }
  }
  free(scan);
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
    const int tid = omp_get_thread_num(), nt = list.nt;
    int64_t i0, i1;
    my_share(&list, joined, &i0, &i1);
    float* acc = partial + (size_t)tid * T * d;
    memset(acc, 0, (size_t)T * d * sizeof(float));
    float buf[CHUNK];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t r = joined[i];
      for (int c = 0; c < d; c += CHUNK) {
        const int len = d - c < CHUNK ? d - c : CHUNK;
        const float* v = decode(down_rows + r * row_bytes, wt, c, len, buf);
        for (int t = 0; t < T; ++t) {
          const float a = h[t * m + r];
          if (a == 0.0f) continue;
          float* out = acc + (int64_t)t * d + c;
#pragma omp simd
          for (int k = 0; k < len; ++k) out[k] += a * v[k];
        }
      }
    }
#pragma omp barrier
    const int64_t total = (int64_t)T * d;
    for (int64_t k = total * tid / nt; k < total * (tid + 1) / nt; ++k) {
      float s = 0.0f;
      for (int p = 0; p < nt; ++p) s += partial[(size_t)p * total + k];
      y[k] = s;
    }
  }
  free(partial);
  free(scan);
}
