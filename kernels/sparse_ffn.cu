// Sparse FFN kernels over rows gathered by a device-side mask (compiled by CuPy's NVRTC; no headers needed).
// Rows are packed by kernels/rows.py: row_bytes a multiple of 16, float rows zero-padded to a multiple of 8
// elements; x is fp32 (T, x_stride) zero-padded likewise. All sums are fp32 in a fixed order (deterministic).

#define FULL_MASK 0xffffffffu
#define WARPS 8  // warps per block; every kernel runs 256 threads

enum { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4 };
enum { RELU = 0, DRELU = 1, SILU = 2 };

__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }

// Row<WT>::load8(row, c, v): elements c..c+7 of a row (c a multiple of 8) as fp32.
template <int WT> struct Row;

template <> struct Row<F32> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    const float4* p = reinterpret_cast<const float4*>(row) + c / 4;
    float4 a = __ldg(p), b = __ldg(p + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  }
};

template <> struct Row<F16> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    uint4 r = __ldg(reinterpret_cast<const uint4*>(row) + c / 8);
    unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = half_to_float(w[i] & 0xffff);
      v[2 * i + 1] = half_to_float(w[i] >> 16);
    }
  }
};

template <> struct Row<BF16> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    uint4 r = __ldg(reinterpret_cast<const uint4*>(row) + c / 8);
    unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// GGUF Q8_0 block: fp16 scale, 32 int8.
template <> struct Row<Q8_0> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    const unsigned char* blk = row + (c >> 5) * 34;
    const float d = half_to_float(__ldg(reinterpret_cast<const unsigned short*>(blk)));
    const unsigned short* q = reinterpret_cast<const unsigned short*>(blk + 2 + (c & 31));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned short s = __ldg(q + i);
      v[2 * i] = d * (float)(signed char)(s & 0xff);
      v[2 * i + 1] = d * (float)(signed char)(s >> 8);
    }
  }
};

// GGUF Q4_0 block: fp16 scale, 16 bytes; element j < 16 is the low nibble of byte j, j + 16 the high one.
template <> struct Row<Q4_0> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    const unsigned char* blk = row + (c >> 5) * 18;
    const float d = half_to_float(__ldg(reinterpret_cast<const unsigned short*>(blk)));
    const int j = c & 31, shift = j >= 16 ? 4 : 0;
    const unsigned short* q = reinterpret_cast<const unsigned short*>(blk + 2 + (j & 15));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned int s = __ldg(q + i);
      v[2 * i] = d * (float)((int)((s >> shift) & 15) - 8);
      v[2 * i + 1] = d * (float)((int)((s >> (8 + shift)) & 15) - 8);
    }
  }
};

// powerinfer_py.model.ffn_activation for one neuron.
__device__ __forceinline__ float ffn_activation(float g, float u, int act, float threshold) {
  float a = act == SILU ? g / (1.0f + expf(-g)) : fmaxf(g, 0.0f);
  if (threshold > 0.0f && !(a > threshold)) a = 0.0f;
  return a * (act == DRELU ? fmaxf(u, 0.0f) : u);
}

// h[t, j] (compact, stride m) or h[t, neuron_idx[j]] (full, stride n_ff) = activation of row j for token t,
// 0 where active[t, neuron_idx[j]] is false. One warp per row (warps of inactive rows retire at once, so the
// active rows' warps fill the GPU); a row no token needs is never read.
template <int WT, int TT>
__global__ void __launch_bounds__(256) gate_up(
    const unsigned char* __restrict__ gate, const unsigned char* __restrict__ up, long long row_bytes,
    const long long* __restrict__ neuron_idx, int m, const bool* __restrict__ active, long long n_ff,
    const float* __restrict__ x, int d, int x_stride, int T, int act, float threshold,
    float* __restrict__ h, int full) {
  const int j = blockIdx.x * WARPS + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (j >= m) return;
  const long long n = neuron_idx[j];
  bool on[TT];
  bool any = false;
#pragma unroll
  for (int t = 0; t < TT; ++t) {
    on[t] = t < T && active[t * n_ff + n];
    any |= on[t];
  }
  float g[TT], u[TT];
#pragma unroll
  for (int t = 0; t < TT; ++t) g[t] = u[t] = 0.0f;
  if (any) {
    const unsigned char* grow = gate + j * row_bytes;
    const unsigned char* urow = up + j * row_bytes;
#pragma unroll 4
    for (int c = lane * 8; c < d; c += 256) {
      float gv[8], uv[8];
      Row<WT>::load8(grow, c, gv);
      Row<WT>::load8(urow, c, uv);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t < T) {
          const float4* xp = reinterpret_cast<const float4*>(x + (long long)t * x_stride + c);
          float4 a = __ldg(xp), b = __ldg(xp + 1);
          float xv[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            g[t] = fmaf(gv[k], xv[k], g[t]);
            u[t] = fmaf(uv[k], xv[k], u[t]);
          }
        }
      }
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        g[t] += __shfl_xor_sync(FULL_MASK, g[t], off);
        u[t] += __shfl_xor_sync(FULL_MASK, u[t], off);
      }
    }
  }
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t < T) {
        const float a = on[t] ? ffn_activation(g[t], u[t], act, threshold) : 0.0f;
        if (full) h[t * n_ff + n] = a;
        else h[(long long)t * m + j] = a;
      }
    }
  }
}

// partial[s, t, c] = sum over rows r of split s (ascending) with h[t, r] != 0 of h[t, r] * down[r, c].
// Block (blockIdx.x, blockIdx.y = s) covers 256 columns; its 8 warps take 32-row groups in turn, read only the
// rows some token needs (ballot over h), 4 rows in flight, and add their sums in warp order.
template <int WT, int TT>
__global__ void __launch_bounds__(256) down_partial(
    const unsigned char* __restrict__ down, long long row_bytes, int m, int d,
    const float* __restrict__ h, int T, int rows_per_split, float* __restrict__ partial) {
  __shared__ float red[TT * 256];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = blockIdx.x * 256 + lane * 8;
  const bool col_ok = c < d;
  const int r0 = blockIdx.y * rows_per_split, r1 = min(m, r0 + rows_per_split);
  float acc[TT][8];
#pragma unroll
  for (int t = 0; t < TT; ++t)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[t][k] = 0.0f;

  for (int base = r0 + warp * 32; base < r1; base += WARPS * 32) {
    const int r = base + lane;
    float hv[TT];
    bool nz = false;
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      hv[t] = (t < T && r < r1) ? h[(long long)t * m + r] : 0.0f;
      nz |= hv[t] != 0.0f;
    }
    unsigned int mask = __ballot_sync(FULL_MASK, nz);
    while (mask) {
      int lanes[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        lanes[q] = -1;
        if (mask) {
          lanes[q] = __ffs(mask) - 1;
          mask &= mask - 1;
        }
      }
      float v[4][8];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (lanes[q] >= 0 && col_ok) {
          Row<WT>::load8(down + (long long)(base + lanes[q]) * row_bytes, c, v[q]);
        } else {
#pragma unroll
          for (int k = 0; k < 8; ++k) v[q][k] = 0.0f;
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        if (lanes[q] >= 0) {
#pragma unroll
          for (int t = 0; t < TT; ++t) {
            const float a = __shfl_sync(FULL_MASK, hv[t], lanes[q]);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[t][k] = fmaf(a, v[q][k], acc[t][k]);
          }
        }
      }
    }
  }

  for (int i = threadIdx.x; i < TT * 256; i += blockDim.x) red[i] = 0.0f;
  __syncthreads();
  for (int w = 0; w < WARPS; ++w) {
    if (warp == w) {
#pragma unroll
      for (int t = 0; t < TT; ++t)
#pragma unroll
        for (int k = 0; k < 8; ++k) red[t * 256 + lane * 8 + k] += acc[t][k];
    }
    __syncthreads();
  }
  for (int i = threadIdx.x; i < T * 256; i += blockDim.x) {
    const int t = i >> 8, cc = blockIdx.x * 256 + (i & 255);
    if (cc < d) partial[((long long)blockIdx.y * T + t) * d + cc] = red[i];
  }
}

// y[i] = sum over splits s (in order) of partial[s, i], i over T * d, stored as fp32 (OT 0), fp16 (1), bf16 (2).
template <int OT>
__global__ void __launch_bounds__(256) down_reduce(const float* __restrict__ partial, int splits, long long n,
                                                   void* __restrict__ y) {
  const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = 0.0f;
  for (int k = 0; k < splits; ++k) s += partial[k * n + i];
  if (OT == 0) {
    reinterpret_cast<float*>(y)[i] = s;
  } else {
    unsigned short b;
    if (OT == 1) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(s));
    else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(s));
    reinterpret_cast<unsigned short*>(y)[i] = b;
  }
}
