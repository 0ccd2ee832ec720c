// The GPU half of the decode-step hand-off (kernels/handoff.py): a split layer's input goes to pinned host
// memory, which the GPU writes and reads directly (mapped, unified addressing), and flags in that memory
// order the two sides: no host round trip, no extra launch, so the whole step stays one CUDA graph.
// Compiled by CuPy's NVRTC behind common.cuh; no headers. One block per launch.

#define THREADS 1024
#define FETCH_THREADS 512  // fetch_from_host's: one 16-byte read a thread of a 4096-element fp16 result

// n bytes from src to dst by all threads of the block, in 16-byte accesses where both are aligned (few, large
// PCIe transfers). FRESH: volatile reads, never a cached line (host memory that the CPU rewrites).
template <bool FRESH>
__device__ __forceinline__ void copy_bytes(unsigned char* dst, const unsigned char* src, long long n) {
  long long done = 0;
  if ((((unsigned long long)dst | (unsigned long long)src) & 15) == 0) {
    done = n / 16 * 16;
    for (long long i = threadIdx.x; i < n / 16; i += blockDim.x) {
      uint4 v;
      if (FRESH)
        asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(src + 16 * i));
      else
        v = reinterpret_cast<const uint4*>(src)[i];
      reinterpret_cast<uint4*>(dst)[i] = v;
    }
  }
  for (long long i = done + threadIdx.x; i < n; i += blockDim.x)
    dst[i] = FRESH ? ((const volatile unsigned char*)src)[i] : src[i];
}

#define IDX_REGS 16  // cold rows per thread whose indices send_to_host holds in registers (m up to 16 K)

// Copy x (x_bytes) to the host, and there into cold_list: the number of active neurons in mask (n_ff bools),
// the number of the layer's m cold rows whose neuron (cold_idx) is active, then those rows' indices, ascending
// (the CPU reads that instead of the mask: no scan over it and no meeting of its threads before they start);
// then set *x_ready = *epoch: the CPU starts the layer's cold rows when it sees the flag. It runs while the hot
// rows load the GPU's memory, so after the wait it reads in one round: x, the mask, and the mask at this thread's
// cold rows, whose (constant) indices it loaded before the wait.
// wait_first 0: launched right after the kernel that lists the hot rows, which lets it start only once the mask
// is complete: it reads the mask at once, beside that kernel, and waits for it only before it exits.
extern "C" __global__ void __launch_bounds__(THREADS) send_to_host(
    const unsigned char* __restrict__ x, long long x_bytes, const bool* __restrict__ mask, int n_ff,
    const int* __restrict__ cold_idx, int m, unsigned char* x_host, int* cold_list, int* x_ready, const int* epoch,
    int wait_first) {
  __shared__ int warp_sums[THREADS / 32], n_active;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // this thread's slice of the cold rows, in order: [j0, j1)
  const int per = (m + THREADS - 1) / THREADS, j0 = min(m, threadIdx.x * per), j1 = min(m, j0 + per);
  int idx[IDX_REGS];
#pragma unroll
  for (int q = 0; q < IDX_REGS; ++q) idx[q] = j0 + q < j1 ? cold_idx[j0 + q] : 0;
  pdl_launch_next();
  if (wait_first) pdl_wait();
  const int step = *epoch;
  if (threadIdx.x == 0) n_active = 0;
  bool listed[IDX_REGS];  // loads first, all in flight together; used below
#pragma unroll
  for (int q = 0; q < IDX_REGS; ++q) listed[q] = j0 + q < j1 && mask[idx[q]];
  int active = 0;
  if (((unsigned long long)mask & 15) == 0) {  // bools are 0 or 1: set bits count them
    for (int i = threadIdx.x * 16; i + 16 <= n_ff; i += THREADS * 16) {
      const uint4 v = *reinterpret_cast<const uint4*>(mask + i);
      active += __popc(v.x) + __popc(v.y) + __popc(v.z) + __popc(v.w);
    }
    for (int i = n_ff / 16 * 16 + threadIdx.x; i < n_ff; i += THREADS) active += mask[i];
  } else {
    for (int i = threadIdx.x; i < n_ff; i += THREADS) active += mask[i];
  }
  copy_bytes<false>(x_host, x, x_bytes);
  unsigned int on = 0;  // bit q: cold row j0 + q is active
#pragma unroll
  for (int q = 0; q < IDX_REGS; ++q) on |= (unsigned int)listed[q] << q;
  int mine = __popc(on);
  for (int j = j0 + IDX_REGS; j < j1; ++j) mine += mask[cold_idx[j]];  // slices longer than the registers
  int before = mine;  // inclusive scan within the warp
  for (int off = 1; off < 32; off <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, before, off);
    if (lane >= off) before += v;
  }
  if (lane == 31) warp_sums[warp] = before;
  for (int off = 16; off > 0; off >>= 1) active += __shfl_xor_sync(0xffffffffu, active, off);
  __syncthreads();
  if (lane == 0) atomicAdd(&n_active, active);
  before -= mine;  // exclusive, within the warp
  for (int w = 0; w < warp; ++w) before += warp_sums[w];
  for (; on; on &= on - 1) cold_list[2 + before++] = j0 + __ffs(on) - 1;
  for (int j = j0 + IDX_REGS; j < j1; ++j)
    if (mask[cold_idx[j]]) cold_list[2 + before++] = j;
  __syncthreads();
  if (threadIdx.x == THREADS - 1) {
    cold_list[0] = n_active;
    cold_list[1] = before;  // the last thread's end: all of them
  }
  __syncthreads();  // every thread's writes to the host come before thread 0's fence, and so before the flag
  if (threadIdx.x == 0) {
    __threadfence_system();
    *(volatile int*)x_ready = step;
  }
  if (!wait_first) pdl_wait();  // every block waits before it exits
}

// Wait until the CPU sets *y_ready = *epoch (or timeout_ns passes: *error = 1), then copy its result (n_bytes at
// y_host) to y_cold on the GPU and set *fetched = *epoch there (the hot rows' down kernel adds it once it sees
// that). Launched on a second stream right after send_to_host, it waits beside the hot rows, so the reads across
// PCIe (the flag, then the result) are off the GPU's path. Volatile reads: never a cached line of an earlier
// layer's result.
extern "C" __global__ void __launch_bounds__(FETCH_THREADS) fetch_from_host(
    const unsigned char* y_host, unsigned char* __restrict__ y_cold, long long n_bytes, const int* y_ready,
    const int* epoch, int* error, long long timeout_ns, int* fetched) {
  pdl_start();
  const int want = *epoch;
  wait_flag<true>(y_ready, want, error, timeout_ns);
  copy_bytes<true>(y_cold, y_host, n_bytes);
  __syncthreads();  // the copy comes before thread 0's fence, and so before the flag
  if (threadIdx.x == 0) {
    __threadfence();
    *(volatile int*)fetched = want;
  }
}

// out = y_gpu + y_cold, plus residual if not null (rounded as the torch ops round: residual + (y_gpu + y_cold)).
// type: 0 fp32, 1 fp16, 2 bf16 (of y_gpu, y_cold, residual and out, d elements). Each thread takes 16 bytes of
// each at a time (4 or 8 elements; single elements where the pointers are not 16-byte aligned): one round of loads.
__device__ __forceinline__ unsigned int add_word(unsigned int gpu, unsigned int cold, unsigned int res, bool has_res,
                                                 int type, int half) {
  const unsigned short g = gpu >> (16 * half), c = cold >> (16 * half), r = res >> (16 * half);
  return (unsigned int)add_cold(from_half(g, type), c, has_res ? &r : nullptr, type) << (16 * half);
}

extern "C" __global__ void __launch_bounds__(THREADS) add_parts(
    const void* __restrict__ y_gpu, const void* __restrict__ y_cold, const void* __restrict__ residual,
    void* __restrict__ out, int d, int type) {
  pdl_start();
  const int per = type == 0 ? 4 : 8;  // elements in 16 bytes
  const bool aligned = ((((unsigned long long)y_gpu | (unsigned long long)y_cold | (unsigned long long)residual |
                          (unsigned long long)out) & 15) == 0);
  const int vectors = aligned ? d / per : 0;
  const bool has_res = residual != nullptr;
  for (int v = threadIdx.x; v < vectors; v += THREADS) {
    const uint4 a = reinterpret_cast<const uint4*>(y_gpu)[v], b = reinterpret_cast<const uint4*>(y_cold)[v];
    const uint4 r = has_res ? reinterpret_cast<const uint4*>(residual)[v] : make_uint4(0, 0, 0, 0);
    const unsigned int av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w}, rv[4] = {r.x, r.y, r.z, r.w};
    unsigned int o[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (type == 0) {
        const float rf = __uint_as_float(rv[q]);
        o[q] = __float_as_uint(add_cold(__uint_as_float(av[q]), __uint_as_float(bv[q]), has_res ? &rf : nullptr));
      } else {
        o[q] = add_word(av[q], bv[q], rv[q], has_res, type, 0) | add_word(av[q], bv[q], rv[q], has_res, type, 1);
      }
    }
    reinterpret_cast<uint4*>(out)[v] = make_uint4(o[0], o[1], o[2], o[3]);
  }
  for (int i = vectors * per + threadIdx.x; i < d; i += THREADS) {
    const float hot = type == 0 ? ((const float*)y_gpu)[i] : from_half(((const unsigned short*)y_gpu)[i], type);
    store_sum(hot, i, out, type, residual, y_cold);
  }
}
