// Prepended to every .cu file of the package (kernels/cuda.py compile_module).

// 16-bit elements (the element type codes of kernels/rows.py: 1 fp16, 2 bf16) to and from fp32.
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ float bf16_to_float(unsigned short b) { return __uint_as_float((unsigned int)b << 16); }

// fp32 to and from an output's 16-bit type (1 fp16, 2 bf16), rounding to nearest even
__device__ __forceinline__ unsigned short to_half(float f, int type) {
  unsigned short b;
  if (type == 1) asm("cvt.rn.f16.f32 %0, %1;" : "=h"(b) : "f"(f));
  else asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
}

__device__ __forceinline__ float from_half(unsigned short b, int type) {
  return type == 1 ? half_to_float(b) : bf16_to_float(b);
}

// An fp32 sum s stored in a 16-bit type, plus residual *r of that type (r may be null): round(round(s) + r), as the
// torch add of the rounded sum and the residual rounds.
__device__ __forceinline__ unsigned short round_add(float s, const unsigned short* r, int type) {
  const unsigned short b = to_half(s, type);
  return r ? to_half(from_half(b, type) + from_half(*r, type), type) : b;
}

// residual + (hot + cold) for one element of a 16-bit type, as the torch ops round it: the fp32 sum hot rounded
// to the type, cold added and rounded, then *r (may be null) added and rounded.
__device__ __forceinline__ unsigned short add_cold(float hot, unsigned short cold, const unsigned short* r, int type) {
  return round_add(from_half(to_half(hot, type), type) + from_half(cold, type), r, type);
}

// The same in fp32: *r + (hot + cold) (r may be null).
__device__ __forceinline__ float add_cold(float hot, float cold, const float* r) {
  const float s = hot + cold;
  return r ? *r + s : s;
}

// y[o] (out_type: fp32 0, fp16 1, bf16 2) = residual[o] + (s + cold[o]) for an fp32 sum s, rounded as the torch
// adds of the rounded sum would; residual and cold (y's type) may be null.
__device__ __forceinline__ void store_sum(float s, long long o, void* y, int out_type, const void* residual,
                                          const void* cold) {
  if (out_type == 0) {
    const float* r = reinterpret_cast<const float*>(residual);
    reinterpret_cast<float*>(y)[o] =
        cold ? add_cold(s, __ldcg(reinterpret_cast<const float*>(cold) + o), r ? r + o : nullptr) : (r ? r[o] + s : s);
  } else {
    const unsigned short* r = reinterpret_cast<const unsigned short*>(residual);
    reinterpret_cast<unsigned short*>(y)[o] =
        cold ? add_cold(s, __ldcg(reinterpret_cast<const unsigned short*>(cold) + o), r ? r + o : nullptr, out_type)
             : round_add(s, r ? r + o : nullptr, out_type);
  }
}

// Thread 0 of a block waits until *flag (read fresh) equals want, or sets *error = 1 after timeout_ns, and fences
// (so that the block's reads after this come after the flag's, by the barrier; SYSTEM: a flag the CPU sets, else
// one set on the GPU); the block then goes on.
template <bool SYSTEM>
__device__ __forceinline__ void wait_flag(const int* flag, int want, int* error, long long timeout_ns) {
  if (threadIdx.x == 0) {
    unsigned long long start, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    while (*(const volatile int*)flag != want) {
      __nanosleep(100);
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      if (t - start > (unsigned long long)timeout_ns) {
        *(volatile int*)error = 1;
        break;
      }
    }
    if (SYSTEM) __threadfence_system();
    else __threadfence();
  }
  __syncthreads();
}

// Programmatic dependent launch: on sm_90+ kernels/cuda.py launches every kernel with programmatic stream
// serialization, so a kernel's blocks may start while the kernel before it on the stream is still running.
// Each kernel lets the next one start as soon as it has started itself (pdl_launch_next), and waits
// (pdl_wait) before it reads anything an earlier kernel wrote or writes anything at all; what it may do before
// is read its constant inputs (weights). Every block of every kernel waits before it exits, so each kernel
// ends after all the kernels before it (a chain of waits). Without the launch attribute, or before sm_90,
// both are no-ops.

__device__ __forceinline__ void pdl_launch_next() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Both, for kernels that read nothing constant before their inputs.
__device__ __forceinline__ void pdl_start() {
  pdl_launch_next();
  pdl_wait();
}
