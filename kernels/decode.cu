// The dense half of a one-token decode step, fused (compiled by CuPy's NVRTC; no headers needed): matrix-vector
// products with their epilogue, RMSNorm, RoPE with the KV-cache write, and attention over the cache. Elements
// are fp16 (DT 1) or bf16 (DT 2) stored as raw 16-bit words; every sum is fp32. Each kernel rounds where the
// plain torch ops it replaces round (kernels/decode.py holds those references).

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

template <int DT> __device__ __forceinline__ float to_f(unsigned short v) {
  if (DT == 1) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  return __uint_as_float((unsigned int)v << 16);
}

template <int DT> __device__ __forceinline__ unsigned short from_f(float f) {
  unsigned short v;
  if (DT == 1) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(v) : "f"(f));
  else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(v) : "f"(f));
  return v;
}

template <int DT> __device__ __forceinline__ float round_f(float f) { return to_f<DT>(from_f<DT>(f)); }

// sum over 8 packed elements of w[i] * x[i]
template <int DT> __device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  const unsigned int ws[4] = {w.x, w.y, w.z, w.w}, xs[4] = {x.x, x.y, x.z, x.w};
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s = fmaf(to_f<DT>(ws[i] & 0xffff), to_f<DT>(xs[i] & 0xffff), s);
    s = fmaf(to_f<DT>(ws[i] >> 16), to_f<DT>(xs[i] >> 16), s);
  }
  return s;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int off = 16; off; off >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, off));
  return v;
}

// The sum of v over the block (blockDim.x a multiple of 32, at most 1024), returned to every thread.
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float sums[32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // sums may still be read by a previous call
  if (lane == 0) sums[warp] = v;
  __syncthreads();
  v = lane < warps ? sums[lane] : 0.f;
  return warp_sum(v);
}

enum { STORE = 0, RELU = 1, AT_LEAST = 2 };

// y = W x for one token: W (n, k) row-major, k a multiple of 8, rows 16-byte aligned. One warp per row, UNROLL
// 16-byte loads in flight per lane. Epilogue: STORE y, RELU relu(y) (both in the dtype), AT_LEAST a bool mask
// y >= threshold of y rounded to the dtype (as the torch ops compare).
#define GEMV_UNROLL 8
template <int DT, int EPI>
__global__ void gemv(const unsigned short* __restrict__ w, const unsigned short* __restrict__ x, int n, int k,
                     float threshold, void* __restrict__ out) {
  extern __shared__ uint4 xs[];
  const int nvec = k / 8;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) xs[i] = __ldg(reinterpret_cast<const uint4*>(x) + i);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= n) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * k);
  float acc = 0.f;
  int i = lane;
  for (; i + 32 * (GEMV_UNROLL - 1) < nvec; i += 32 * GEMV_UNROLL) {
    uint4 wv[GEMV_UNROLL];
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) wv[u] = __ldcs(wr + i + 32 * u);
#pragma unroll
    for (int u = 0; u < GEMV_UNROLL; ++u) acc += dot8<DT>(wv[u], xs[i + 32 * u]);
  }
  for (; i < nvec; i += 32) acc += dot8<DT>(__ldcs(wr + i), xs[i]);
  acc = warp_sum(acc);
  if (lane) return;
  if (EPI == AT_LEAST) reinterpret_cast<bool*>(out)[row] = round_f<DT>(acc) >= threshold;
  else reinterpret_cast<unsigned short*>(out)[row] = from_f<DT>(EPI == RELU ? fmaxf(acc, 0.f) : acc);
}

// One block per row of x (rows, d): out = round(round(x * rsqrt(mean(x^2) + eps)) * weight), as
// F.rms_norm (fp32, rounded once) followed by the weight's product in the dtype.
template <int DT>
__global__ void rms_norm(const unsigned short* __restrict__ x, const unsigned short* __restrict__ weight, int d,
                         float eps, unsigned short* __restrict__ out) {
  x += (size_t)blockIdx.x * d;
  out += (size_t)blockIdx.x * d;
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float v = to_f<DT>(x[i]);
    ss = fmaf(v, v, ss);
  }
  const float r = rsqrtf(block_sum(ss) / d + eps);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    out[i] = from_f<DT>(round_f<DT>(to_f<DT>(x[i]) * r) * to_f<DT>(weight[i]));
}

// RoPE on one token's q and k heads and the cache write of k and v at position *pos. qkv: q (n_heads heads),
// k, v (n_kv heads each) of head_dim hd; cos and sign-folded sin (hd) as model.apply_rope takes them:
// out = round(round(x * cos) + roll(x, hd/2) * sin). Block b < n_heads: q head b into q_out; then the k heads,
// then the v heads (copied). hd threads a block.
template <int DT>
__global__ void rope_kv(const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ cos,
                        const unsigned short* __restrict__ sin, const long long* __restrict__ pos, int n_heads,
                        int n_kv, int hd, int max_len, unsigned short* __restrict__ q_out,
                        unsigned short* __restrict__ k_cache, unsigned short* __restrict__ v_cache) {
  const int head = blockIdx.x, i = threadIdx.x;
  const long long p = *pos;
  const unsigned short* src = qkv + (size_t)head * hd;
  if (head >= n_heads + n_kv) {
    v_cache[((size_t)(head - n_heads - n_kv) * max_len + p) * hd + i] = src[i];
    return;
  }
  const float a = round_f<DT>(to_f<DT>(src[i]) * to_f<DT>(cos[i]));
  const unsigned short r = from_f<DT>(a + to_f<DT>(src[(i + hd / 2) % hd]) * to_f<DT>(sin[i]));
  if (head < n_heads) q_out[(size_t)head * hd + i] = r;
  else k_cache[((size_t)(head - n_heads) * max_len + p) * hd + i] = r;
}

// Attention of one query token over cache positions 0..*pos (keys at or before the query), for q (n_heads, hd)
// and caches (n_kv, max_len, hd) (grouped-query heads share a kv head). Grid (n_heads, splits): block (h, s)
// takes keys [s * chunk, (s + 1) * chunk) and leaves its running max, sum of exponentials and weighted sum of
// values in partial (n_heads, splits, hd + 2); the head's last block to finish (counted in counters[h], which
// it sets back to 0) combines them in split order into out (n_heads, hd). Dynamic shared memory: hd + chunk
// floats.
template <int DT>
__global__ void decode_attention(const unsigned short* __restrict__ q, const unsigned short* __restrict__ k_cache,
                                 const unsigned short* __restrict__ v_cache, const long long* __restrict__ pos,
                                 int n_heads, int n_kv, int hd, int max_len, int chunk, float scale,
                                 float* __restrict__ partial, int* __restrict__ counters,
                                 unsigned short* __restrict__ out) {
  extern __shared__ float smem[];
  float* qs = smem;            // hd: the query, scaled
  float* scores = smem + hd;   // chunk: then their exponentials
  __shared__ bool last;
  const int h = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int n_keys = (int)*pos + 1;
  const int used = (n_keys + chunk - 1) / chunk;
  if (s >= used) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const size_t kv_base = (size_t)(h / (n_heads / n_kv)) * max_len * hd;
  const int start = s * chunk, n = min(chunk, n_keys - start);
  for (int i = threadIdx.x; i < hd; i += blockDim.x) qs[i] = to_f<DT>(q[(size_t)h * hd + i]) * scale;
  __syncthreads();
  for (int j = warp; j < n; j += warps) {
    const unsigned short* kr = k_cache + kv_base + (size_t)(start + j) * hd;
    float d = 0.f;
    for (int i = lane; i < hd; i += 32) d = fmaf(qs[i], to_f<DT>(kr[i]), d);
    d = warp_sum(d);
    if (lane == 0) scores[j] = d;
  }
  __syncthreads();
  float m = NEG_INF;
  for (int j = 0; j < n; ++j) m = fmaxf(m, scores[j]);
  __syncthreads();
  for (int j = threadIdx.x; j < n; j += blockDim.x) scores[j] = __expf(scores[j] - m);
  __syncthreads();
  float* mine = partial + ((size_t)h * splits + s) * (hd + 2);
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    const unsigned short* vc = v_cache + kv_base + (size_t)start * hd + i;
    float acc = 0.f;
    for (int j = 0; j < n; ++j) acc = fmaf(scores[j], to_f<DT>(vc[(size_t)j * hd]), acc);
    mine[i] = acc;
  }
  if (threadIdx.x == 0) {
    float l = 0.f;
    for (int j = 0; j < n; ++j) l += scores[j];
    mine[hd] = m;
    mine[hd + 1] = l;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counters + h, 1) == used - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const float* head = partial + (size_t)h * splits * (hd + 2);
  float m_all = NEG_INF;
  for (int t = 0; t < used; ++t) m_all = fmaxf(m_all, __ldcg(head + t * (hd + 2) + hd));
  float l_all = 0.f;
  for (int t = 0; t < used; ++t) {
    const float* p = head + t * (hd + 2);
    l_all += __ldcg(p + hd + 1) * __expf(__ldcg(p + hd) - m_all);
  }
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float acc = 0.f;
    for (int t = 0; t < used; ++t) {
      const float* p = head + t * (hd + 2);
      acc += __ldcg(p + i) * __expf(__ldcg(p + hd) - m_all);
    }
    out[(size_t)h * hd + i] = from_f<DT>(acc / l_all);
  }
  if (threadIdx.x == 0) counters[h] = 0;
}
