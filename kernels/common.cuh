// Prepended to every .cu file of the package (kernels/cuda.py compile_module).
//
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
