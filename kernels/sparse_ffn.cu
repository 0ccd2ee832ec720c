// Sparse FFN kernels over rows gathered by a device-side mask (compiled by CuPy's NVRTC behind common.cuh; no
// headers).
// Rows are packed by kernels/rows.py: row_bytes a multiple of 16, float rows zero-padded to a multiple of 8
// elements; x likewise. All sums are fp32 in a fixed order (deterministic), but for ffn_one's, whose blocks add
// into one output atomically.

#define FULL_MASK 0xffffffffu
#define WARPS 8  // warps per block; every kernel runs 256 threads

enum { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4 };
enum { RELU = 0, DRELU = 1, SILU = 2 };

// Row<WT>::load8(row, c, v): elements c..c+7 of a row (c a multiple of 8) as fp32. Float types also split it
// into raw8 (the 16-byte loads, issued early) and decode8.
template <int WT> struct Row;

template <> struct Row<F32> {
  struct Raw { float4 a, b; };
  static __device__ __forceinline__ Raw raw8(const unsigned char* row, int c) {
    const float4* p = reinterpret_cast<const float4*>(row) + c / 4;
    return {__ldg(p), __ldg(p + 1)};
  }
  static __device__ __forceinline__ void decode8(const Raw& r, float* v) {
    v[0] = r.a.x; v[1] = r.a.y; v[2] = r.a.z; v[3] = r.a.w; v[4] = r.b.x; v[5] = r.b.y; v[6] = r.b.z; v[7] = r.b.w;
  }
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) { decode8(raw8(row, c), v); }
};

template <> struct Row<F16> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw raw8(const unsigned char* row, int c) {
    return __ldg(reinterpret_cast<const uint4*>(row) + c / 8);
  }
  static __device__ __forceinline__ void decode8(const Raw& r, float* v) {
    unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = half_to_float(w[i] & 0xffff);
      v[2 * i + 1] = half_to_float(w[i] >> 16);
    }
  }
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) { decode8(raw8(row, c), v); }
};

template <> struct Row<BF16> {
  using Raw = uint4;
  static __device__ __forceinline__ Raw raw8(const unsigned char* row, int c) {
    return __ldg(reinterpret_cast<const uint4*>(row) + c / 8);
  }
  static __device__ __forceinline__ void decode8(const Raw& r, float* v) {
    unsigned int w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) { decode8(raw8(row, c), v); }
};

// GGUF Q8_0 block: fp16 scale, 32 int8. Quantized rows are read from copies staged in shared memory.
template <> struct Row<Q8_0> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    const unsigned char* blk = row + (c >> 5) * 34;
    const float d = half_to_float(*reinterpret_cast<const unsigned short*>(blk));
    const unsigned short* q = reinterpret_cast<const unsigned short*>(blk + 2 + (c & 31));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned short s = q[i];
      v[2 * i] = d * (float)(signed char)(s & 0xff);
      v[2 * i + 1] = d * (float)(signed char)(s >> 8);
    }
  }
};

// GGUF Q4_0 block: fp16 scale, 16 bytes; element j < 16 is the low nibble of byte j, j + 16 the high one.
template <> struct Row<Q4_0> {
  static __device__ __forceinline__ void load8(const unsigned char* row, int c, float* v) {
    const unsigned char* blk = row + (c >> 5) * 18;
    const float d = half_to_float(*reinterpret_cast<const unsigned short*>(blk));
    const int j = c & 31, shift = j >= 16 ? 4 : 0;
    const unsigned short* q = reinterpret_cast<const unsigned short*>(blk + 2 + (j & 15));
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      unsigned int s = q[i];
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

#define ROWS_PER_BLOCK 32  // candidate rows per gate_up block (one warp checks them)
#define SEG 1024           // elements of a row per gate_up work item: 32 lanes x 32, or 32 GGUF blocks

// GGUF block bytes; quantized rows are staged in shared memory, 32 blocks of each matrix per warp.
template <int WT> struct Quant { static constexpr int BYTES = 0; };
template <> struct Quant<Q8_0> { static constexpr int BYTES = 34; };
template <> struct Quant<Q4_0> { static constexpr int BYTES = 18; };

// g[t] += (gate row . x_t) and u[t] likewise over elements [c0, c0 + SEG) of one row, this lane's share (the
// warp adds the lanes up). Float rows: 8 elements per lane and step, the 4 steps' loads issued first.
template <int WT, int XT, int TT>
__device__ __forceinline__ void float_segment_dot(const unsigned char* grow, const unsigned char* urow, int c0,
                                                  int d, const unsigned char* x, long long x_stride, int T,
                                                  float* g, float* u, int lane) {
  typename Row<WT>::Raw graw[4], uraw[4];
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int c = c0 + it * 256 + lane * 8;
    if (c < d) {
      graw[it] = Row<WT>::raw8(grow, c);
      uraw[it] = Row<WT>::raw8(urow, c);
    }
  }
#pragma unroll
  for (int it = 0; it < 4; ++it) {
    const int c = c0 + it * 256 + lane * 8;
    if (c < d) {
      float gv[8], uv[8];
      Row<WT>::decode8(graw[it], gv);
      Row<WT>::decode8(uraw[it], uv);
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        if (t < T) {
          float xv[8];
          Row<XT>::load8(x + t * x_stride, c, xv);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            g[t] = fmaf(gv[k], xv[k], g[t]);
            u[t] = fmaf(uv[k], xv[k], u[t]);
          }
        }
      }
    }
  }
}

// scale * (block . xv) for one GGUF block (in shared memory) and its 32 x values.
template <int WT>
__device__ __forceinline__ float block_dot(const unsigned char* blk, const float* xv) {
  const float scale = half_to_float(*reinterpret_cast<const unsigned short*>(blk));
  const unsigned short* q = reinterpret_cast<const unsigned short*>(blk + 2);
  float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  if (WT == Q8_0) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const unsigned short b = q[i];
      s[i & 3] = fmaf((float)(signed char)(b & 0xff), xv[2 * i], s[i & 3]);
      s[i & 3] = fmaf((float)(signed char)(b >> 8), xv[2 * i + 1], s[i & 3]);
    }
  } else {  // element k < 16: the low nibble of byte k; k + 16: its high nibble
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const unsigned short b = q[i];
      s[i & 3] = fmaf((float)((int)(b & 15) - 8), xv[2 * i], s[i & 3]);
      s[i & 3] = fmaf((float)((int)((b >> 8) & 15) - 8), xv[2 * i + 1], s[i & 3]);
      s[i & 3] = fmaf((float)((int)((b >> 4) & 15) - 8), xv[16 + 2 * i], s[i & 3]);
      s[i & 3] = fmaf((float)((int)(b >> 12) - 8), xv[16 + 2 * i + 1], s[i & 3]);
    }
  }
  return scale * ((s[0] + s[1]) + (s[2] + s[3]));
}

// The same for quantized rows: the warp copies the segment's (up to) 32 GGUF blocks of each matrix to shared
// memory in coalesced 16-byte loads (a segment starts 16-byte aligned: 32 blocks are 1088 or 576 bytes and rows
// are padded to 16; the last, shorter segment's bytes rounded up to 16 stay inside the padded row), then lane
// l decodes block l.
template <int WT, int XT, int TT>
__device__ __forceinline__ void quant_segment_dot(const unsigned char* grow, const unsigned char* urow, int c0,
                                                  int d, const unsigned char* x, long long x_stride, int T,
                                                  float* g, float* u, unsigned char* stage, int lane) {
  constexpr int BB = Quant<WT>::BYTES;
  const int n_blocks = min(32, (d - c0) / 32);
  const int n16 = (n_blocks * BB + 15) / 16;
  const uint4* gsrc = reinterpret_cast<const uint4*>(grow + (c0 / 32) * BB);
  const uint4* usrc = reinterpret_cast<const uint4*>(urow + (c0 / 32) * BB);
  uint4* gdst = reinterpret_cast<uint4*>(stage);
  uint4* udst = reinterpret_cast<uint4*>(stage + 32 * BB);
  uint4 ga[3], ua[3];  // 1088 bytes = 68 loads: at most 3 per lane
#pragma unroll
  for (int q = 0; q < 3; ++q) {
    if (lane + 32 * q < n16) {
      ga[q] = __ldg(gsrc + lane + 32 * q);
      ua[q] = __ldg(usrc + lane + 32 * q);
    }
  }
#pragma unroll
  for (int q = 0; q < 3; ++q) {
    if (lane + 32 * q < n16) {
      gdst[lane + 32 * q] = ga[q];
      udst[lane + 32 * q] = ua[q];
    }
  }
  __syncwarp();
  if (lane < n_blocks) {
    const int c = c0 + lane * 32;
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      if (t < T) {
        float xv[32];
#pragma unroll
        for (int k = 0; k < 4; ++k) Row<XT>::load8(x + t * x_stride, c + 8 * k, xv + 8 * k);
        g[t] += block_dot<WT>(stage + lane * BB, xv);
        u[t] += block_dot<WT>(stage + 32 * BB + lane * BB, xv);
      }
    }
  }
  __syncwarp();  // the warp's next work item overwrites the stage
}

// Warp 0 of a gate_up block (the other warps call pdl_wait instead): lists which of the block's candidate rows
// [32 b, 32 b + 32) some token needs (their index j, neuron n and token bits, in row order, n_listed of them),
// and writes h = 0 (h not null) for the others, which are never read. active (T, n_ff), h (T, h_stride) compact
// (column j) or full (column n).
template <int TT>
__device__ __forceinline__ void list_needed_rows(const long long* __restrict__ neuron_idx, int m,
                                                 const bool* __restrict__ active, long long n_ff, int T,
                                                 float* __restrict__ h, long long h_stride, int full, int* list_row,
                                                 int* list_on, long long* list_neuron, int* n_listed, int lane) {
  const int j = blockIdx.x * ROWS_PER_BLOCK + lane;
  const long long n = j < m ? neuron_idx[j] : 0;
  pdl_wait();  // the index is constant; the mask may come from the previous kernel
  int on = 0;  // bit t: token t has this row's neuron active
  if (j < m) {
#pragma unroll
    for (int t = 0; t < TT; ++t)
      if (t < T && active[t * n_ff + n]) on |= 1 << t;
  }
  const unsigned int listed = __ballot_sync(FULL_MASK, on != 0);
  if (on) {
    const int k = __popc(listed & ((1u << lane) - 1));
    list_row[k] = j;
    list_on[k] = on;
    list_neuron[k] = n;
  } else if (j < m && h != nullptr) {
    for (int t = 0; t < T; ++t) h[t * h_stride + (full ? n : j)] = 0.0f;
  }
  if (lane == 0) *n_listed = __popc(listed);
}

// h[t, j] (compact, stride m) or h[t, neuron_idx[j]] (full, stride n_ff) = activation of row j for token t,
// 0 where active[t, neuron_idx[j]] is false. x: (T, d) rows of x_stride bytes in type XT (F32/F16/BF16),
// zero-padded to a multiple of 8 elements, 16-byte aligned. Block b: warp 0 lists which of the candidate rows
// [32 b, 32 b + 32) some token needs (the others get h = 0 and are never read); the 8 warps then share the
// work items (listed row, 1024-element segment), so one row's loads are spread over several warps and are in
// flight together; the segments' sums are added in order (deterministic), then the activation is applied.
// Dynamic shared memory: 32 * segments * TT * 2 floats.
template <int WT, int XT, int TT>
__global__ void __launch_bounds__(256) gate_up(
    const unsigned char* __restrict__ gate, const unsigned char* __restrict__ up, long long row_bytes,
    const long long* __restrict__ neuron_idx, int m, const bool* __restrict__ active, long long n_ff,
    const unsigned char* __restrict__ x, long long x_stride, int d, int T, int act, float threshold,
    float* __restrict__ h, int full) {
  extern __shared__ float partial[];  // [listed row][segment][token][gate, up]
  __shared__ int list_row[ROWS_PER_BLOCK], list_on[ROWS_PER_BLOCK], n_listed;
  __shared__ long long list_neuron[ROWS_PER_BLOCK];
  __shared__ __align__(16) unsigned char stage[WARPS][2 * 32 * Quant<WT>::BYTES + 16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int segs = (d + SEG - 1) / SEG;
  const long long h_stride = full ? n_ff : m;
  if (warp == 0)
    list_needed_rows<TT>(neuron_idx, m, active, n_ff, T, h, h_stride, full, list_row, list_on, list_neuron,
                         &n_listed, lane);
  else
    pdl_wait();
  __syncthreads();
  pdl_launch_next();  // only now: down_partial reads the mask before its wait, so it must be complete
  const int items = n_listed * segs;
  for (int item = warp; item < items; item += WARPS) {
    const int k = item / segs, s = item - k * segs;
    const long long j = list_row[k];
    float g[TT], u[TT];
#pragma unroll
    for (int t = 0; t < TT; ++t) g[t] = u[t] = 0.0f;
    if constexpr (Quant<WT>::BYTES > 0) {
      quant_segment_dot<WT, XT, TT>(gate + j * row_bytes, up + j * row_bytes, s * SEG, d, x, x_stride, T, g, u,
                                    stage[warp], lane);
    } else {
      float_segment_dot<WT, XT, TT>(gate + j * row_bytes, up + j * row_bytes, s * SEG, d, x, x_stride, T, g, u,
                                    lane);
    }
#pragma unroll
    for (int t = 0; t < TT; ++t) {
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        g[t] += __shfl_xor_sync(FULL_MASK, g[t], off);
        u[t] += __shfl_xor_sync(FULL_MASK, u[t], off);
      }
    }
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < TT; ++t) {
        partial[((k * segs + s) * TT + t) * 2] = g[t];
        partial[((k * segs + s) * TT + t) * 2 + 1] = u[t];
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < n_listed * TT; i += blockDim.x) {
    const int k = i / TT, t = i - k * TT;
    if (t >= T) continue;
    float gs = 0.0f, us = 0.0f;
    for (int s = 0; s < segs; ++s) {
      gs += partial[((k * segs + s) * TT + t) * 2];
      us += partial[((k * segs + s) * TT + t) * 2 + 1];
    }
    const float a = (list_on[k] >> t) & 1 ? ffn_activation(gs, us, act, threshold) : 0.0f;
    h[t * h_stride + (full ? list_neuron[k] : (long long)list_row[k])] = a;
  }
}

// One token, float rows: the activations of block b's candidate rows [32 b, 32 b + 32) that the token needs,
// into hs (listed order; 0 where the neuron is predicted inactive), with list_needed_rows' lists (h, if not
// null, gets 0 for the rows not listed). Warp 0 lists the rows; the 8 warps then take the listed rows in turn,
// each row read whole, U 16-byte loads of gate and of up in flight per lane (fewer for f32), against x staged
// once per block as fp32 in shared memory xs (xpad floats, zero past d). Rows and x padded to a multiple of 8.
// Ends with the block synchronised.
template <int WT, int XT>
__device__ __forceinline__ void one_token_activations(
    const unsigned char* __restrict__ gate, const unsigned char* __restrict__ up, long long row_bytes,
    const long long* __restrict__ neuron_idx, int m, const bool* __restrict__ active,
    const unsigned char* __restrict__ x, int d, int xpad, int act, float threshold, float* __restrict__ h,
    int full, float* xs, int* list_row, int* list_on, long long* list_neuron, int* n_listed, float* hs) {
  constexpr int U = sizeof(typename Row<WT>::Raw) == 16 ? 8 : 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (warp == 0) {
    list_needed_rows<1>(neuron_idx, m, active, 0, 1, h, 0, full, list_row, list_on, list_neuron, n_listed, lane);
  } else {
    pdl_wait();
    // only now: the kernels after read the mask before their waits (down_partial, send_to_host), so it must be
    // complete (one thread's call counts for the block)
    if (warp == 1 && lane == 0) pdl_launch_next();
  }
  for (int c = threadIdx.x * 8; c < xpad; c += blockDim.x * 8) Row<XT>::load8(x, c, xs + c);
  __syncthreads();
  for (int k = warp; k < *n_listed; k += WARPS) {
    const long long j = list_row[k];
    const unsigned char* grow = gate + j * row_bytes;
    const unsigned char* urow = up + j * row_bytes;
    float g = 0.0f, u = 0.0f;
    for (int c0 = lane * 8; c0 < xpad; c0 += 256 * U) {
      typename Row<WT>::Raw graw[U], uraw[U];
#pragma unroll
      for (int it = 0; it < U; ++it) {
        const int c = c0 + it * 256;
        if (c < xpad) {
          graw[it] = Row<WT>::raw8(grow, c);
          uraw[it] = Row<WT>::raw8(urow, c);
        }
      }
#pragma unroll
      for (int it = 0; it < U; ++it) {
        const int c = c0 + it * 256;
        if (c < xpad) {
          float gv[8], uv[8];
          Row<WT>::decode8(graw[it], gv);
          Row<WT>::decode8(uraw[it], uv);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            g = fmaf(gv[e], xs[c + e], g);
            u = fmaf(uv[e], xs[c + e], u);
          }
        }
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      g += __shfl_xor_sync(FULL_MASK, g, off);
      u += __shfl_xor_sync(FULL_MASK, u, off);
    }
    if (lane == 0) hs[k] = ffn_activation(g, u, act, threshold);
  }
  __syncthreads();
}

// One token, float rows: h[j] (compact) or h[neuron_idx[j]] (full) = activation of row j, 0 where the neuron is
// predicted inactive (one_token_activations over block b's rows). Dynamic shared memory: xpad floats.
template <int WT, int XT>
__global__ void __launch_bounds__(256) gate_up_one(
    const unsigned char* __restrict__ gate, const unsigned char* __restrict__ up, long long row_bytes,
    const long long* __restrict__ neuron_idx, int m, const bool* __restrict__ active,
    const unsigned char* __restrict__ x, int d, int xpad, int act, float threshold, float* __restrict__ h,
    int full) {
  extern __shared__ float xs[];
  __shared__ int list_row[ROWS_PER_BLOCK], list_on[ROWS_PER_BLOCK], n_listed;
  __shared__ long long list_neuron[ROWS_PER_BLOCK];
  __shared__ float hs[ROWS_PER_BLOCK];
  one_token_activations<WT, XT>(gate, up, row_bytes, neuron_idx, m, active, x, d, xpad, act, threshold, h, full,
                                xs, list_row, list_on, list_neuron, &n_listed, hs);
  if (threadIdx.x < n_listed) h[full ? list_neuron[threadIdx.x] : list_row[threadIdx.x]] = hs[threadIdx.x];
}

// acc[c..c+7] += v[0..7] (global fp32, one vector reduction on sm_90)
__device__ __forceinline__ void red_add8(float* acc, const float* v) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(acc), "f"(v[0]), "f"(v[1]), "f"(v[2]), "f"(v[3])
               : "memory");
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};" ::"l"(acc + 4), "f"(v[4]), "f"(v[5]), "f"(v[6]),
               "f"(v[7])
               : "memory");
#else
#pragma unroll
  for (int e = 0; e < 8; ++e) atomicAdd(acc + e, v[e]);
#endif
}

// Called by every thread of every block once its atomic adds into acc (xpad fp32, zero between launches) are
// issued: the grid's last block to get here (counted in *done) writes y (d elements, out_type: fp32 0, fp16 1,
// bf16 2) = residual (y's type, may be null) + acc, rounded as the torch add of the rounded sum would, and
// zeroes acc and *done for the next launch.
__device__ __forceinline__ void write_sums_if_last(float* acc, int* done, int d, int xpad, void* y, int out_type,
                                                   const void* residual) {
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done, 1) == (int)(gridDim.x * gridDim.y) - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int c = threadIdx.x; c < xpad; c += blockDim.x) {
    const float s = __ldcg(acc + c);
    __stcg(acc + c, 0.0f);
    if (c < d) store_sum(s, c, y, out_type, residual, nullptr);
  }
  if (threadIdx.x == 0) *done = 0;
}

// The whole FFN of one token over float rows, in one launch: y (d, out_type: fp32 0, fp16 1, bf16 2) = residual
// (y's type, may be null) + the sum over the rows j the token needs of activation_j * down[j], rounded as the torch
// add of the rounded sum would. Block b computes its candidate rows' activations
// (one_token_activations), multiplies the nonzero ones by their down rows (each thread 8 columns, DOWN_LOADS rows'
// loads in flight; short rows: several groups of threads take every groups-th row and add up in shared memory)
// and adds its sums to acc (xpad fp32, zero between launches) with atomic vector adds; the last block to finish
// writes y (write_sums_if_last). The order of the atomic
// adds varies, so y may differ from run to run by fp32 rounding. Dynamic shared memory: max(xpad, 2048) floats
// (x, then the groups' sums).
#define DOWN_LOADS 8
template <int WT, int XT>
__global__ void __launch_bounds__(256) ffn_one(
    const unsigned char* __restrict__ gate, const unsigned char* __restrict__ up, long long row_bytes,
    const unsigned char* __restrict__ down, long long down_row_bytes, const long long* __restrict__ neuron_idx,
    int m, const bool* __restrict__ active, const unsigned char* __restrict__ x, int d, int xpad, int act,
    float threshold, float* __restrict__ acc, int* __restrict__ done, void* __restrict__ y, int out_type,
    const void* __restrict__ residual) {
  extern __shared__ float xs[];
  __shared__ int list_row[ROWS_PER_BLOCK], list_on[ROWS_PER_BLOCK], n_listed, n_down;
  __shared__ long long list_neuron[ROWS_PER_BLOCK];
  __shared__ float hs[ROWS_PER_BLOCK], down_h[ROWS_PER_BLOCK];
  __shared__ int down_row[ROWS_PER_BLOCK];
  float* group_sums = xs;  // x is no longer read once the activations are known
  one_token_activations<WT, XT>(gate, up, row_bytes, neuron_idx, m, active, x, d, xpad, act, threshold, nullptr,
                                0, xs, list_row, list_on, list_neuron, &n_listed, hs);
  if (threadIdx.x < 32) {  // the rows with a nonzero activation, in row order
    const bool nz = threadIdx.x < n_listed && hs[threadIdx.x] != 0.0f;
    const unsigned int listed = __ballot_sync(FULL_MASK, nz);
    if (nz) {
      const int k = __popc(listed & ((1u << threadIdx.x) - 1));
      down_row[k] = list_row[threadIdx.x];
      down_h[k] = hs[threadIdx.x];
    }
    if (threadIdx.x == 0) n_down = __popc(listed);
  }
  __syncthreads();
  const int nvec = xpad / 8, span = min(nvec, 256), groups = 256 / span;
  const int g = threadIdx.x / span, v0 = threadIdx.x % span;
  if (n_down > 0 && g < groups) {
    for (int v = v0; v < nvec; v += span) {
      float sum[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
      for (int k0 = g; k0 < n_down; k0 += groups * DOWN_LOADS) {
        typename Row<WT>::Raw raw[DOWN_LOADS];
#pragma unroll
        for (int q = 0; q < DOWN_LOADS; ++q) {
          const int k = k0 + q * groups;
          if (k < n_down) raw[q] = Row<WT>::raw8(down + (long long)down_row[k] * down_row_bytes, v * 8);
        }
#pragma unroll
        for (int q = 0; q < DOWN_LOADS; ++q) {
          const int k = k0 + q * groups;
          if (k < n_down) {
            float dv[8];
            Row<WT>::decode8(raw[q], dv);
#pragma unroll
            for (int e = 0; e < 8; ++e) sum[e] = fmaf(down_h[k], dv[e], sum[e]);
          }
        }
      }
      if (groups == 1) {
        red_add8(acc + v * 8, sum);
      } else {  // one pass (nvec < 256): the groups' sums added in group order
#pragma unroll
        for (int e = 0; e < 8; ++e) group_sums[threadIdx.x * 8 + e] = sum[e];
      }
    }
  }
  if (groups > 1) {
    __syncthreads();
    if (n_down > 0 && g == 0) {
      float sum[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) sum[e] = group_sums[v0 * 8 + e];
      for (int q = 1; q < groups; ++q)
#pragma unroll
        for (int e = 0; e < 8; ++e) sum[e] += group_sums[(q * span + v0) * 8 + e];
      red_add8(acc + v0 * 8, sum);
    }
  }
  write_sums_if_last(acc, done, d, xpad, y, out_type, residual);
}

// v[q] = this lane's 8 columns (c) of row base + lanes[q] (q < 4, lanes[q] < 0: none) of quantized rows: the
// rows' 8 GGUF blocks under the block's 256 columns (272 or 144 bytes at a multiple of that: 16-byte aligned;
// the last, shorter column block's bytes rounded up to 16 stay inside the padded row) are copied to the warp's
// stage in coalesced 16-byte loads, then each lane decodes its columns.
template <int WT>
__device__ __forceinline__ void load_quant_rows(const unsigned char* down, long long row_bytes, int base,
                                                const int* lanes, int col0, int c, int d, unsigned char* stage,
                                                int lane, float (*v)[8]) {
  constexpr int BB = Quant<WT>::BYTES;
  const int n16 = (min(8, (d - col0) / 32) * BB + 15) / 16;
  uint4 raw[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (lanes[q] >= 0 && lane < n16) {
      const unsigned char* src = down + (long long)(base + lanes[q]) * row_bytes + (col0 / 32) * BB;
      raw[q] = __ldg(reinterpret_cast<const uint4*>(src) + lane);
    }
  }
#pragma unroll
  for (int q = 0; q < 4; ++q)
    if (lanes[q] >= 0 && lane < n16) reinterpret_cast<uint4*>(stage + q * 8 * BB)[lane] = raw[q];
  __syncwarp();
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    if (lanes[q] >= 0 && c < d) {
      Row<WT>::load8(stage + q * 8 * BB, c - col0, v[q]);
    } else {
#pragma unroll
      for (int k = 0; k < 8; ++k) v[q][k] = 0.0f;
    }
  }
  __syncwarp();  // the warp's next rows overwrite the stage
}

// down_partial's rows loaded before its wait (16-bit and f32 rows only: quantized ones have no raw loads)
template <int WT, bool EARLY> struct EarlyRaw { using T = int; };
template <int WT> struct EarlyRaw<WT, true> { using T = typename Row<WT>::Raw; };

// partial[s, t, c] = sum over rows r of split s (ascending) with h[t, r] != 0 of h[t, r] * down[r, c].
// Block (blockIdx.x, blockIdx.y = s) covers 256 columns; its 8 warps take 32-row groups in turn, read only the
// rows some token needs (ballot over h), several rows in flight (Q), and add their sums in warp order.
// One token of 16-bit or f32 rows with the mask the activations came from (active, by neuron through neuron_idx;
// h is 0 wherever the mask is off; both may be null): before waiting for h, each warp issues the loads of the
// first Q rows of its first group that the mask turns on, so that they stream in while the kernel before still
// runs (its last blocks) instead of after it ends; the sums are added in the same order either way.
template <int WT, int TT>
__global__ void __launch_bounds__(256) down_partial(
    const unsigned char* __restrict__ down, long long row_bytes, int m, int d,
    const float* __restrict__ h, int T, int rows_per_split, float* __restrict__ partial, int* __restrict__ done,
    void* __restrict__ y, int out_type, const long long* __restrict__ neuron_idx, const bool* __restrict__ active,
    const void* __restrict__ residual, const void* cold, const int* cold_ready, const int* epoch, int* error,
    long long timeout_ns) {
  // rows in flight per warp: 4 quantized rows (the stage holds 4); 16 rows of 16-bit elements for one token, else
  // 8 (their raw 16-byte loads stay in registers until used)
  constexpr int Q = Quant<WT>::BYTES > 0 ? 4 : (TT == 1 && WT != F32 ? 16 : 8);
  __shared__ float red[(TT == 1 ? WARPS : TT) * 256];
  __shared__ __align__(16) unsigned char stage[WARPS][4 * 8 * Quant<WT>::BYTES + 16];
  constexpr bool EARLY = TT == 1 && Quant<WT>::BYTES == 0;
  pdl_launch_next();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int c = blockIdx.x * 256 + lane * 8;
  const bool col_ok = c < d;
  const int r0 = blockIdx.y * rows_per_split, r1 = min(m, r0 + rows_per_split);
  typename EarlyRaw<WT, EARLY>::T early_raw[EARLY ? Q : 1];
  int early_lane[EARLY ? Q : 1];
  unsigned int early_bits = 0;  // lanes of the warp's first group whose rows are in early_raw
  if constexpr (EARLY) {
    const int base = r0 + warp * 32;
    const bool on = active != nullptr && base + lane < r1 && active[neuron_idx[base + lane]];
    unsigned int mask = __ballot_sync(FULL_MASK, on);
#pragma unroll
    for (int q = 0; q < Q; ++q) {
      early_lane[q] = -1;
      if (mask) {
        early_lane[q] = __ffs(mask) - 1;
        early_bits |= 1u << early_lane[q];
        mask &= mask - 1;
        if (col_ok) early_raw[q] = Row<WT>::raw8(down + (long long)(base + early_lane[q]) * row_bytes, c);
      }
    }
  }
  pdl_wait();
  float acc[TT][8];
#pragma unroll
  for (int t = 0; t < TT; ++t)
#pragma unroll
    for (int k = 0; k < 8; ++k) acc[t][k] = 0.0f;

  // acc += the rows of the group at base that some token needs (mask, lane bits), Q at a time; hv: this lane's
  // row's h for each token
  auto add_group = [&](int base, const float* hv, unsigned int mask) {
    while (mask) {
      int lanes[Q];
#pragma unroll
      for (int q = 0; q < Q; ++q) {
        lanes[q] = -1;
        if (mask) {
          lanes[q] = __ffs(mask) - 1;
          mask &= mask - 1;
        }
      }
      auto add_row = [&](int q, const float* v) {
#pragma unroll
        for (int t = 0; t < TT; ++t) {
          const float a = __shfl_sync(FULL_MASK, hv[t], lanes[q]);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[t][k] = fmaf(a, v[k], acc[t][k]);
        }
      };
      if constexpr (Quant<WT>::BYTES > 0) {
        float v[Q][8];
        load_quant_rows<WT>(down, row_bytes, base, lanes, blockIdx.x * 256, c, d, stage[warp], lane, v);
#pragma unroll
        for (int q = 0; q < Q; ++q)
          if (lanes[q] >= 0) add_row(q, v[q]);
      } else {
        typename Row<WT>::Raw raw[Q];
#pragma unroll
        for (int q = 0; q < Q; ++q)
          if (lanes[q] >= 0 && col_ok) raw[q] = Row<WT>::raw8(down + (long long)(base + lanes[q]) * row_bytes, c);
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          if (lanes[q] >= 0) {
            float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (col_ok) Row<WT>::decode8(raw[q], v);
            add_row(q, v);
          }
        }
      }
    }
  };
  // the warp's groups of 32 rows two at a time: both groups' h read in one round; the first pair (first = true,
  // a separate call so that early_raw is dead after it) begins with the rows loaded before the wait, in row order
  auto add_pair = [&](int base, bool first) {
    const int base2 = base + WARPS * 32;
    float hv[TT], hv2[TT];
    bool nz = false, nz2 = false;
#pragma unroll
    for (int t = 0; t < TT; ++t) {
      hv[t] = (t < T && base + lane < r1) ? h[(long long)t * m + base + lane] : 0.0f;
      hv2[t] = (t < T && base2 + lane < r1) ? h[(long long)t * m + base2 + lane] : 0.0f;
      nz |= hv[t] != 0.0f;
      nz2 |= hv2[t] != 0.0f;
    }
    unsigned int needed = __ballot_sync(FULL_MASK, nz);
    if constexpr (EARLY) {
      if (first) {
#pragma unroll
        for (int q = 0; q < Q; ++q) {
          if (early_lane[q] >= 0 && (needed >> early_lane[q] & 1u)) {
            float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
            if (col_ok) Row<WT>::decode8(early_raw[q], v);
            const float a = __shfl_sync(FULL_MASK, hv[0], early_lane[q]);
#pragma unroll
            for (int k = 0; k < 8; ++k) acc[0][k] = fmaf(a, v[k], acc[0][k]);
          }
        }
        needed &= ~early_bits;
      }
    }
    add_group(base, hv, needed);
    add_group(base2, hv2, __ballot_sync(FULL_MASK, nz2));
  };
  int base = r0 + warp * 32;
  if (base < r1) add_pair(base, true);
  for (base += 2 * WARPS * 32; base < r1; base += 2 * WARPS * 32) add_pair(base, false);

  if constexpr (TT == 1) {  // every warp's sums at once, then each column added up in warp order
#pragma unroll
    for (int k = 0; k < 8; ++k) red[warp * 256 + lane * 8 + k] = acc[0][k];
    __syncthreads();
    const int cc = blockIdx.x * 256 + threadIdx.x;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += red[w * 256 + threadIdx.x];
    if (cc < d) partial[(long long)blockIdx.y * d + cc] = sum;
  } else {
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
  // The column block's last split to finish adds the splits' partial sums in split order into y (T, d) of
  // out_type (fp32 0, fp16 1, bf16 2) and sets its counter in `done` back to 0 for the next launch. One token with
  // the CPU's share (cold, y's type, not null): it waits until fetch_from_host has it on the GPU (*cold_ready ==
  // *epoch), then writes residual + (y + cold) as add_parts would (residual may be null).
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(done + blockIdx.x, 1) == (int)gridDim.y - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (cold != nullptr) wait_flag<false>(cold_ready, *epoch, error, timeout_ns);
  for (int i = threadIdx.x; i < T * 256; i += blockDim.x) {
    const int t = i >> 8, cc = blockIdx.x * 256 + (i & 255);
    if (cc >= d) continue;
    float sum = 0.0f;
#pragma unroll 8
    for (int k = 0; k < (int)gridDim.y; ++k) sum += __ldcg(partial + ((long long)k * T + t) * d + cc);
    store_sum(sum, (long long)t * d + cc, y, out_type, residual, cold);  // residual: null without cold
  }
  if (threadIdx.x == 0) done[blockIdx.x] = 0;
}
