// The dense half of a one-token decode step, fused (compiled by CuPy's NVRTC behind common.cuh; no headers):
// matrix-vector products with their epilogue, RMSNorm, RoPE's table, and attention over the cache with RoPE and
// the KV-cache write. Elements are fp16 (DT 1) or bf16 (DT 2) stored as raw 16-bit words; every sum is fp32. Each
// kernel rounds where the plain torch ops it replaces round (kernels/decode.py holds those references).

#define FULL_MASK 0xffffffffu
#define NEG_INF __int_as_float(0xff800000)

template <int DT> __device__ __forceinline__ float to_f(unsigned short v) { return from_half(v, DT); }

template <int DT> __device__ __forceinline__ unsigned short from_f(float f) { return to_half(f, DT); }

template <int DT> __device__ __forceinline__ float round_f(float f) { return to_f<DT>(from_f<DT>(f)); }

// 8 packed elements to fp32 and back
template <int DT> __device__ __forceinline__ void unpack8(uint4 r, float* v) {
  const unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    v[2 * i] = to_f<DT>(w[i] & 0xffff);
    v[2 * i + 1] = to_f<DT>(w[i] >> 16);
  }
}

template <int DT> __device__ __forceinline__ uint4 pack8(const float* v) {
  unsigned int w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) w[i] = from_f<DT>(v[2 * i]) | ((unsigned int)from_f<DT>(v[2 * i + 1]) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// sum over 8 packed elements of w[i] * x[i]
template <int DT> __device__ __forceinline__ float dot8(uint4 w, uint4 x) {
  float wf[8], xf[8], s = 0.f;
  unpack8<DT>(w, wf);
  unpack8<DT>(x, xf);
#pragma unroll
  for (int i = 0; i < 8; ++i) s = fmaf(wf[i], xf[i], s);
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
enum { NO_NORM = 0, NORM_X = 1, NORM_OUT = 2 };

// dst (nvec 16-byte vectors) = RMSNorm of x (staged in shared memory) with weight norm_w, rounded as rms_norm
// rounds; by the whole block (dst may be xs: each thread rewrites only what it read).
template <int DT>
__device__ __forceinline__ void rms_normalize(const uint4* xs, int nvec, int k, const unsigned short* norm_w,
                                              float eps, uint4* dst) {
  float ss = 0.f;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float f[8];
    unpack8<DT>(xs[i], f);
#pragma unroll
    for (int e = 0; e < 8; ++e) ss = fmaf(f[e], f[e], ss);
  }
  const float r = rsqrtf(block_sum(ss) / k + eps);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float f[8], g[8];
    unpack8<DT>(xs[i], f);
    unpack8<DT>(__ldg(reinterpret_cast<const uint4*>(norm_w) + i), g);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = round_f<DT>(f[e] * r) * g[e];
    dst[i] = pack8<DT>(f);
  }
}

// The GEMV_LOADS 16-byte vectors of a group of R rows of W (n rows of nvec vectors), loaded at once: slot u
// holds vector i + stride (u % (GEMV_LOADS / R)) of row R group + u / (GEMV_LOADS / R), zero past the rows' ends.
#define GEMV_LOADS 8
template <int R>
__device__ __forceinline__ void load_row_vectors(const uint4* w, int group, int n, int i, int stride, int nvec,
                                                 uint4* v) {
  constexpr int PER_ROW = GEMV_LOADS / R;
#pragma unroll
  for (int u = 0; u < GEMV_LOADS; ++u) {
    const int row = R * group + u / PER_ROW, c = i + stride * (u % PER_ROW);
    v[u] = row < n && c < nvec ? __ldcs(w + (size_t)row * nvec + c) : make_uint4(0, 0, 0, 0);
  }
}

// y = W x for one token: W (n, k) row-major, k a multiple of 8, rows 16-byte aligned. A warp group of WPR warps
// (several for short, wide matrices, so that enough loads are in flight) takes row groups g, g + groups, ...
// where the grid (at most as many blocks as fit the GPU at once) holds `groups` of them, 8 / WPR a block; a row
// group is R rows (R > 1 for rows of at most GEMV_LOADS / R vectors a lane, so that short rows such as the
// predictor fc2's still fill every load slot); each lane loads GEMV_LOADS 16-byte vectors at a time and issues
// the next ones (further along the rows, or the next group's) before it adds up the current ones, so a warp
// always has loads in flight; a row's warps add their sums in order.
// The first loads go out before the kernel waits for the previous one and stages x in shared memory (they do
// not depend on it).
// Epilogue: STORE y, RELU relu(y) (both in the dtype), AT_LEAST a bool mask y >= threshold of y rounded to the
// dtype (as the torch ops compare). NORM_X: x is first replaced by RMSNorm(x) with weight norm_w, rounded as
// rms_norm rounds (each block computes it: it saves a launch); NORM_OUT: the product takes x itself and block 0
// also writes RMSNorm(x) to norm_out (the FFN's input, next to the predictor reading the residual). STORE adds
// residual (n elements, may be null) as the torch add would: round(round(y) + residual). Dynamic shared memory:
// x (2 k bytes).
template <int DT, int EPI, int WPR, int NORM, int R>
__global__ void __launch_bounds__(256) gemv(const unsigned short* __restrict__ w, const unsigned short* __restrict__ x,
                                            int n, int k, float threshold, void* __restrict__ out,
                                            const unsigned short* __restrict__ norm_w, float eps,
                                            const unsigned short* __restrict__ residual,
                                            unsigned short* __restrict__ norm_out) {
  extern __shared__ uint4 xs[];
  __shared__ float sums[8];
  static_assert(R == 1 || WPR == 1, "row groups of several rows take one warp each");
  constexpr int PER_ROW = GEMV_LOADS / R;  // load slots a row
  const int nvec = k / 8, lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_groups = (n + R - 1) / R;
  const int per_block = 8 / WPR, stride = 32 * WPR, first = (warp % WPR) * 32 + lane;
  const int step = gridDim.x * per_block;  // from one of a warp group's row groups to its next
  const int rounds = (n_groups - (int)blockIdx.x * per_block + step - 1) / step;  // the same for the block's warps
  const uint4* wv = reinterpret_cast<const uint4*>(w);
  int group = blockIdx.x * per_block + warp / WPR, i = first;
  uint4 cur[GEMV_LOADS], next[GEMV_LOADS];
  pdl_launch_next();
  load_row_vectors<R>(wv, group, n, i, stride, nvec, cur);
  pdl_wait();  // the weight loads above overlap the previous kernel's end
  for (int v = threadIdx.x; v < nvec; v += blockDim.x) xs[v] = __ldg(reinterpret_cast<const uint4*>(x) + v);
  __syncthreads();
  if (NORM == NORM_X) {
    rms_normalize<DT>(xs, nvec, k, norm_w, eps, xs);
    __syncthreads();
  } else if (NORM == NORM_OUT && blockIdx.x == 0) {
    rms_normalize<DT>(xs, nvec, k, norm_w, eps, reinterpret_cast<uint4*>(norm_out));
  }
  for (int r = 0; r < rounds; ++r, group += step) {
    float acc[R];
#pragma unroll
    for (int q = 0; q < R; ++q) acc[q] = 0.f;
    bool group_done = false;
    while (!group_done) {
      int i_next = i + stride * PER_ROW, group_next = group;
      group_done = i_next >= nvec;
      if (group_done) {
        i_next = first;
        group_next = group + step;
      }
      if (group_next < n_groups) load_row_vectors<R>(wv, group_next, n, i_next, stride, nvec, next);
      if (group < n_groups) {
#pragma unroll
        for (int u = 0; u < GEMV_LOADS; ++u) {
          const int c = i + stride * (u % PER_ROW);
          if (c < nvec) acc[u / PER_ROW] += dot8<DT>(cur[u], xs[c]);
        }
      }
#pragma unroll
      for (int u = 0; u < GEMV_LOADS; ++u) cur[u] = next[u];
      i = i_next;
    }
#pragma unroll
    for (int q = 0; q < R; ++q) {
      float y = warp_sum(acc[q]);
      if (WPR > 1) {
        if (lane == 0) sums[warp] = y;
        __syncthreads();
        y = 0.f;
        for (int s = 0; s < WPR; ++s) y += sums[warp - warp % WPR + s];
        __syncthreads();  // sums is written again for the next row
      }
      const int row = R * group + q;
      if (lane || warp % WPR || row >= n) continue;
      if (EPI == AT_LEAST) reinterpret_cast<bool*>(out)[row] = round_f<DT>(y) >= threshold;
      else if (EPI == RELU) reinterpret_cast<unsigned short*>(out)[row] = from_f<DT>(fmaxf(y, 0.f));
      else reinterpret_cast<unsigned short*>(out)[row] = round_add(y, residual ? residual + row : nullptr, DT);
    }
  }
}

// One block per row of x (rows, d): out = round(round(x * rsqrt(mean(x^2) + eps)) * weight), as
// F.rms_norm (fp32, rounded once) followed by the weight's product in the dtype. d a multiple of 8; the row is
// staged in shared memory (dynamic, 2 d bytes) in 16-byte loads.
template <int DT>
__global__ void rms_norm(const unsigned short* __restrict__ x, const unsigned short* __restrict__ weight, int d,
                         float eps, unsigned short* __restrict__ out) {
  extern __shared__ uint4 xs[];
  pdl_start();
  const int nvec = d / 8;
  const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)blockIdx.x * d);
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) xs[i] = __ldg(xr + i);
  __syncthreads();
  rms_normalize<DT>(xs, nvec, d, weight, eps, reinterpret_cast<uint4*>(out + (size_t)blockIdx.x * d));
}

// model.rope_cos_sin for one position *pos: for j < hd/2, f = pos * inv_freq[j] (fp32), cos[j] = cos[j + hd/2] =
// cos(f) * scale and sin[j + hd/2] = -sin[j] = sin(f) * scale, rounded to DT. inv_freq in freq_type (fp32 0,
// fp16 1, bf16 2: a model moved to a half type carries it so). One block of hd/2 threads.
template <int DT>
__global__ void rope_table(const void* __restrict__ inv_freq, int freq_type, float scale,
                           const long long* __restrict__ pos, int half, unsigned short* __restrict__ cos_out,
                           unsigned short* __restrict__ sin_out) {
  const int j = threadIdx.x;
  const float w = freq_type == 0 ? ((const float*)inv_freq)[j]
                                 : from_half(((const unsigned short*)inv_freq)[j], freq_type);
  pdl_start();
  const float f = (float)*pos * w;
  const float c = cosf(f) * scale, s = sinf(f) * scale;
  cos_out[j] = cos_out[j + half] = from_f<DT>(c);
  sin_out[j] = from_f<DT>(-s);
  sin_out[j + half] = from_f<DT>(s);
}

// RoPE on 8 elements of a head held by each thread of a group of G (elements 8 part..): their partners, hd/2
// further (mod hd), are held by the thread G/2 apart, or for G == 1 by the thread itself. Rounded as
// model.apply_rope rounds: round(round(x * cos) + partner * sin); c and s as model.rope_cos_sin gives them. Every
// lane of the warp calls it (shuffles).
template <int DT>
__device__ __forceinline__ void rope8(uint4 x, int G, uint4 c, uint4 s, float* out) {
  uint4 y = make_uint4(x.z, x.w, x.x, x.y);
  if (G > 1) {
    y.x = __shfl_xor_sync(FULL_MASK, x.x, G / 2);
    y.y = __shfl_xor_sync(FULL_MASK, x.y, G / 2);
    y.z = __shfl_xor_sync(FULL_MASK, x.z, G / 2);
    y.w = __shfl_xor_sync(FULL_MASK, x.w, G / 2);
  }
  float xf[8], yf[8], cf[8], sf[8];
  unpack8<DT>(x, xf);
  unpack8<DT>(y, yf);
  unpack8<DT>(c, cf);
  unpack8<DT>(s, sf);
#pragma unroll
  for (int e = 0; e < 8; ++e) out[e] = round_f<DT>(round_f<DT>(xf[e] * cf[e]) + yf[e] * sf[e]);
}

// Attention of one query token over cache positions 0..*pos (keys at or before the query), with RoPE on its q and
// k and the cache write of its k and v at *pos. qkv: q (n_heads heads), k, v (n_kv heads each) of head_dim hd =
// 8 G with G dividing 32, as wqkv writes them; caches (n_kv, max_len, hd) (grouped-query heads share a kv head);
// cos and sign-folded sin (hd) as model.apply_rope takes them. Grid (n_heads, splits): block (h, s) takes keys
// [s * chunk, (s + 1) * chunk): its threads form groups of G, each thread 8 elements of a key (one 16-byte load),
// each group a key at a time, ATT_UNROLL keys per group in flight, their values loaded with them (one pass: each
// group keeps a running max, sum of exponentials and weighted sum of values, rescaled as the max grows; the
// groups are then combined). *pos and the keys and values before it were written by earlier launches that have
// ended (a decode step ends in torch ops, which do not overlap the next step's kernels), so each block loads its
// first ATT_UNROLL keys a group before it waits for wqkv. The key at *pos never comes from the cache: the blocks
// that take it compute it from qkv, and those of each kv head's first query head write it there.
#define ATT_UNROLL 4
template <int DT>
__global__ void decode_attention(const unsigned short* __restrict__ qkv, const unsigned short* __restrict__ cos,
                                 const unsigned short* __restrict__ sin, const long long* __restrict__ pos,
                                 int n_heads, int n_kv, int hd, int max_len, int chunk, float scale,
                                 float* __restrict__ partial, int* __restrict__ counters, unsigned short* k_cache,
                                 unsigned short* v_cache, unsigned short* __restrict__ out) {
  extern __shared__ float smem[];
  __shared__ bool last;
  pdl_launch_next();
  const int h = blockIdx.x, s = blockIdx.y, splits = gridDim.y;
  const int p = (int)*pos, n_keys = p + 1;
  const int used = (n_keys + chunk - 1) / chunk;
  if (s >= used) {
    pdl_wait();  // every block waits before it exits
    return;
  }
  const int G = hd / 8, groups = blockDim.x / G, grp = threadIdx.x / G, part = threadIdx.x % G;
  float* sums = smem;                 // groups x hd: each group's weighted values
  float* group_max = smem + groups * hd;
  float* group_sum = group_max + groups;
  const int kv_head = h / (n_heads / n_kv), start = s * chunk, n = min(chunk, n_keys - start);
  const int new_key = p - start;  // among the block's keys if below n
  const size_t first = ((size_t)kv_head * max_len + start) * G + part;  // in 16-byte vectors
  const uint4* kr = reinterpret_cast<const uint4*>(k_cache) + first;
  const uint4* vr = reinterpret_cast<const uint4*>(v_cache) + first;
  uint4 kv[ATT_UNROLL], vv[ATT_UNROLL];
  auto load = [&](int base) {
#pragma unroll
    for (int u = 0; u < ATT_UNROLL; ++u) {
      const int j = base + u * groups + grp;
      const bool cached = j < n && j != new_key;
      kv[u] = cached ? __ldg(kr + (size_t)j * G) : make_uint4(0, 0, 0, 0);
      vv[u] = cached ? __ldg(vr + (size_t)j * G) : make_uint4(0, 0, 0, 0);
    }
  };
  load(0);
  pdl_wait();
  const uint4* heads = reinterpret_cast<const uint4*>(qkv) + part;
  const uint4 c = __ldg(reinterpret_cast<const uint4*>(cos) + part);
  const uint4 sn = __ldg(reinterpret_cast<const uint4*>(sin) + part);
  const uint4 v_new = __ldg(heads + (size_t)(n_heads + n_kv + kv_head) * G);
  float qv[8], k_roped[8];
  rope8<DT>(__ldg(heads + (size_t)h * G), G, c, sn, qv);
  rope8<DT>(__ldg(heads + (size_t)(n_heads + kv_head) * G), G, c, sn, k_roped);
  const uint4 k_new = pack8<DT>(k_roped);
  if (new_key < n && h % (n_heads / n_kv) == 0 && grp == 0) {
    reinterpret_cast<uint4*>(k_cache)[first + (size_t)new_key * G] = k_new;
    reinterpret_cast<uint4*>(v_cache)[first + (size_t)new_key * G] = v_new;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) qv[e] *= scale;
  float m = NEG_INF, l = 0.f, acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int base = 0; base < n; base += groups * ATT_UNROLL) {  // the same trips for every thread (shuffles)
    if (base) load(base);  // the first keys were loaded before the wait
    float d[ATT_UNROLL];  // the scores of the group's keys, added up over the group together
#pragma unroll
    for (int u = 0; u < ATT_UNROLL; ++u) {
      if (base + u * groups + grp == new_key) {
        kv[u] = k_new;
        vv[u] = v_new;
      }
      float kf[8];
      unpack8<DT>(kv[u], kf);
      d[u] = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) d[u] = fmaf(qv[e], kf[e], d[u]);
    }
    for (int off = G / 2; off; off >>= 1)
#pragma unroll
      for (int u = 0; u < ATT_UNROLL; ++u) d[u] += __shfl_xor_sync(FULL_MASK, d[u], off);
    float m_new = m;  // the group's threads all hold the same scores, so they take the same branches
#pragma unroll
    for (int u = 0; u < ATT_UNROLL; ++u)
      if (base + u * groups + grp < n) m_new = fmaxf(m_new, d[u]);
    if (m_new == NEG_INF) continue;  // none of this round's keys is the group's
    const float rescale = __expf(m - m_new);
    l *= rescale;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] *= rescale;
#pragma unroll
    for (int u = 0; u < ATT_UNROLL; ++u) {
      if (base + u * groups + grp < n) {
        const float p = __expf(d[u] - m_new);
        float vf[8];
        unpack8<DT>(vv[u], vf);
        l += p;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = fmaf(p, vf[e], acc[e]);
      }
    }
    m = m_new;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) sums[grp * hd + part * 8 + e] = acc[e];
  if (part == 0) {
    group_max[grp] = m;
    group_sum[grp] = l;
  }
  __syncthreads();
  // warp 0 combines the groups: the block's maximum and sum of exponentials, and each group's weight
  // exp(max_g - max) in place of its maximum (0 for a group without keys)
  __shared__ float block_max_sum[2];
  if (threadIdx.x < 32) {
    float mb = NEG_INF, lb = 0.f;
    for (int g = threadIdx.x; g < groups; g += 32) mb = fmaxf(mb, group_max[g]);
    mb = warp_max(mb);
    for (int g = threadIdx.x; g < groups; g += 32) {
      const float w = __expf(group_max[g] - mb);
      lb = fmaf(group_sum[g], w, lb);
      group_max[g] = w;
    }
    lb = warp_sum(lb);
    if (threadIdx.x == 0) {
      block_max_sum[0] = mb;
      block_max_sum[1] = lb;
    }
  }
  __syncthreads();
  const float m_block = block_max_sum[0], l_block = block_max_sum[1], *weights = group_max;
  const bool alone = used == 1;  // the head's only block writes out itself
  float* mine = partial + ((size_t)h * splits + s) * (hd + 2);
  for (int i = threadIdx.x; i < hd; i += blockDim.x) {
    float a = 0.f;
#pragma unroll 8
    for (int g = 0; g < groups; ++g) a = fmaf(sums[g * hd + i], weights[g], a);
    if (alone) out[(size_t)h * hd + i] = from_f<DT>(a / l_block);
    else mine[i] = a;
  }
  if (alone) return;
  if (threadIdx.x == 0) {
    mine[hd] = m_block;
    mine[hd + 1] = l_block;
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
    float a = 0.f;
    for (int t = 0; t < used; ++t) {
      const float* p = head + t * (hd + 2);
      a += __ldcg(p + i) * __expf(__ldcg(p + hd) - m_all);
    }
    out[(size_t)h * hd + i] = from_f<DT>(a / l_all);
  }
  if (threadIdx.x == 0) counters[h] = 0;
}

// Whether (a, ia) goes before (b, ib) for torch.argmax: NaN above everything, then the larger value, then the
// smaller index.
__device__ __forceinline__ bool argmax_before(float a, int ia, float b, int ib) {
  const bool na = a != a, nb = b != b;
  if (na || nb) return na && (!nb || ia < ib);
  return a > b || (a == b && ia < ib);
}

// (v, idx) of the warp's lanes that goes first, in every lane.
__device__ __forceinline__ void warp_argmax(float& v, int& idx) {
  for (int off = 16; off > 0; off >>= 1) {
    const float ov = __shfl_xor_sync(FULL_MASK, v, off);
    const int oi = __shfl_xor_sync(FULL_MASK, idx, off);
    if (argmax_before(ov, oi, v, idx)) {
      v = ov;
      idx = oi;
    }
  }
}

// Greedy decoding's end of step on the GPU, in one block (Generator._advance): the argmax of fp32 logits (n of
// them), as torch.argmax picks it, becomes the next step's *token; ring[*pos % 2] takes it and ring_host (pinned
// host memory, two slots) a copy of ring; *pos moves on by one.
#define ARGMAX_THREADS 1024
extern "C" __global__ void __launch_bounds__(ARGMAX_THREADS) greedy_advance(const float* __restrict__ logits, int n,
                                                                            long long* token, long long* pos,
                                                                            long long* ring, long long* ring_host) {
  __shared__ float warp_v[ARGMAX_THREADS / 32];
  __shared__ int warp_i[ARGMAX_THREADS / 32];
  pdl_start();
  float v = NEG_INF;
  int idx = n;  // none yet: any value goes before it
#pragma unroll 8
  for (int i = threadIdx.x; i < n; i += ARGMAX_THREADS) {
    const float x = logits[i];
    if (argmax_before(x, i, v, idx)) {
      v = x;
      idx = i;
    }
  }
  warp_argmax(v, idx);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    warp_v[warp] = v;
    warp_i[warp] = idx;
  }
  __syncthreads();
  if (warp != 0) return;
  v = warp_v[lane];
  idx = warp_i[lane];
  warp_argmax(v, idx);
  if (lane == 0) {
    const long long p = *pos;
    *token = idx;
    ring[p & 1] = idx;
    ring_host[p & 1] = idx;
    ring_host[(p & 1) ^ 1] = ring[(p & 1) ^ 1];
    __threadfence_system();
    *pos = p + 1;
  }
}
