// The GPU half of the decode-step hand-off (kernels/handoff.py): a split layer's input goes to pinned host
// memory, which the GPU writes and reads directly (mapped, unified addressing), and flags in that memory
// order the two sides: no host round trip, no extra launch, so the whole step stays one CUDA graph.
// Compiled by CuPy's NVRTC behind common.cuh; no headers. One block of THREADS threads per launch.

#define THREADS 1024

// n bytes from src to dst by all threads, in 16-byte stores where both are aligned (few, large PCIe writes).
__device__ __forceinline__ void copy_bytes(unsigned char* dst, const unsigned char* __restrict__ src, long long n) {
  long long done = 0;
  if ((((unsigned long long)dst | (unsigned long long)src) & 15) == 0) {
    done = n / 16 * 16;
    for (long long i = threadIdx.x; i < n / 16; i += THREADS)
      reinterpret_cast<uint4*>(dst)[i] = reinterpret_cast<const uint4*>(src)[i];
  }
  for (long long i = done + threadIdx.x; i < n; i += THREADS) dst[i] = src[i];
}

// Copy x (x_bytes) and the active mask (mask_bytes) to the host, then set *x_ready = *epoch: the CPU starts
// the layer's cold rows when it sees the flag.
extern "C" __global__ void __launch_bounds__(THREADS) send_to_host(
    const unsigned char* __restrict__ x, long long x_bytes, const unsigned char* __restrict__ mask,
    long long mask_bytes, unsigned char* x_host, unsigned char* mask_host, int* x_ready, const int* epoch) {
  pdl_start();
  copy_bytes(x_host, x, x_bytes);
  copy_bytes(mask_host, mask, mask_bytes);
  __threadfence_system();  // this thread's writes reach the host before the flag below
  __syncthreads();
  if (threadIdx.x == 0) *(volatile int*)x_ready = *epoch;
}

// Wait until the CPU sets *y_ready = *epoch (or timeout_ns passes: *error = 1), then out = y_gpu + y_host, plus
// residual if not null (rounded as the torch ops round: residual + (y_gpu + y_host)). type: 0 fp32, 1 fp16,
// 2 bf16 (of y_gpu, y_host, residual and out, d elements). Each thread reads 16 bytes of y_host at once where it
// can (the reads cross PCIe: one round of them, not several).
extern "C" __global__ void __launch_bounds__(THREADS) add_from_host(
    const void* __restrict__ y_gpu, const void* y_host, const void* __restrict__ residual, void* __restrict__ out,
    int d, int type, const int* y_ready, const int* epoch, int* error, long long timeout_ns) {
  pdl_start();
  if (threadIdx.x == 0) {
    const int want = *epoch;
    unsigned long long start, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (*(const volatile int*)y_ready != want) {
      __nanosleep(100);
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      if (t - start > (unsigned long long)timeout_ns) {
        *(volatile int*)error = 1;
        break;
      }
    }
    __threadfence_system();
  }
  __syncthreads();
  const int per16 = type == 0 ? 4 : 8;  // elements in 16 bytes
  const bool vector = d % per16 == 0 && ((unsigned long long)y_host & 15) == 0;
  for (int i0 = threadIdx.x * per16; i0 < d; i0 += THREADS * per16) {
    const int n = vector ? per16 : (d - i0 < per16 ? d - i0 : per16);
    union { uint4 v; float f[4]; unsigned short h[8]; } host;
    if (vector) {
      const char* p = (const char*)y_host + (long long)i0 * (type == 0 ? 4 : 2);
      asm volatile("ld.volatile.v4.u32 {%0, %1, %2, %3}, [%4];"
                   : "=r"(host.v.x), "=r"(host.v.y), "=r"(host.v.z), "=r"(host.v.w) : "l"(p));
    } else {
      for (int k = 0; k < n; ++k) {
        if (type == 0) host.f[k] = ((const volatile float*)y_host)[i0 + k];
        else host.h[k] = ((const volatile unsigned short*)y_host)[i0 + k];
      }
    }
    for (int k = 0; k < n; ++k) {
      const int i = i0 + k;
      if (type == 0) {
        const float s = ((const float*)y_gpu)[i] + host.f[k];
        ((float*)out)[i] = residual ? ((const float*)residual)[i] + s : s;
      } else {
        float s = from_half(((const unsigned short*)y_gpu)[i], type) + from_half(host.h[k], type);
        if (residual) s = from_half(((const unsigned short*)residual)[i], type) + from_half(to_half(s, type), type);
        ((unsigned short*)out)[i] = to_half(s, type);
      }
    }
  }
}
