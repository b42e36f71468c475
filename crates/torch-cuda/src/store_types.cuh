// The storage type of a kernel's tensors and its conversions, shared by every NVRTC program of the
// crate (src/nvrtc_kernels.cpp hands it to NVRTC as the header "store_types.cuh"), for
//   STORE_KIND  0 = float, 1 = bfloat16, 2 = float16
//   VEC         elements per vector access
// to_f widens exactly; from_f rounds to nearest even as libtorch's casts do (c10::BFloat16's NaN for
// bf16, the hardware conversion for fp16); vec_t is VEC elements loaded and stored at once.
#pragma once

#if STORE_KIND == 0
typedef float store_t;
__device__ __forceinline__ float to_f(store_t v) { return v; }
__device__ __forceinline__ store_t from_f(float f) { return f; }
#elif STORE_KIND == 1
typedef unsigned short store_t;
__device__ __forceinline__ float to_f(store_t v) { return __uint_as_float(((unsigned int)v) << 16); }
__device__ __forceinline__ store_t from_f(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (store_t)0x7fc0;  // NaN, as c10::BFloat16 writes it
    }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (store_t)(u >> 16);
}
#else
typedef unsigned short store_t;
__device__ __forceinline__ float to_f(store_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
}
__device__ __forceinline__ store_t from_f(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

struct __align__(sizeof(store_t) * VEC) vec_t {
    store_t v[VEC];
};

__device__ __forceinline__ vec_t load_vec(const store_t* p) { return *reinterpret_cast<const vec_t*>(p); }
__device__ __forceinline__ void store_vec(store_t* p, const vec_t& v) { *reinterpret_cast<vec_t*>(p) = v; }
