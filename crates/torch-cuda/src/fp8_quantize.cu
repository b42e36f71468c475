// The per-call fp8 quantization of an fp8 product's operand (src/fp8.cpp) in two passes: the largest
// magnitude (one atomic maximum per block), then the scale and the quantized values — e4m3 for the
// forward's input, e5m2 for the backward's output gradient. libtorch's operations take seven kernels
// for it (the ∞-norm, the scale's clamp and division, the input's division, clamp and cast), four of
// them full passes over the input.
//
// Compiled at run time by NVRTC (src/nvrtc_kernels.h) once per (GPU architecture, storage type,
// vector width), with
//   STORE_KIND  0 = float, 1 = bfloat16, 2 = float16 (the input's type)
//   VEC         elements per vector access (1, 2, 4 or 8; it divides the element count)
//
// The values are libtorch's, bit for bit (src/fp8.cpp computes the same with ATen on the CPU):
//   amax  = max |x| (NaN if any x is NaN)
//   scale = clamp_min(amax, 1e-12) / M                           (fp32; NaN stays NaN)
//   q     = fp8(clamp(round_to_store(x / scale), -M, M))         (c10's fp32 → fp8 conversion)
// with M = 448 for e4m3fn and 57344 for e5m2 (the largest finite values),
// where x / scale is what `x.div(scale)` computes for a bf16 or fp16 tensor `x` and the fp32 0-dim
// tensor `scale`: libtorch converts both operands to the common type — the input's, so the scale is
// rounded to bf16/fp16 first — divides in fp32 and rounds the quotient to the input's type, before the
// clamp and the cast. (The product dequantizes with the fp32 scale; the scale's rounding adds at most
// 2^-9 of relative error to each value, under e4m3's 2^-4.)

#include "store_types.cuh"  // store_t, to_f, from_f, vec_t, load_vec, store_vec

struct __align__(VEC) bytes_t {
    unsigned char v[VEC];
};

// c10's fp8e4m3fn_from_fp32_value (torch/headeronly/util/Float8_e4m3fn.h): round to nearest even,
// 480 and above (and NaN) to NaN (0x7f), subnormals below 2^-6.
__device__ __forceinline__ unsigned char e4m3fn_from_f(float f) {
    const unsigned int fp8_max = 1087u << 20;
    const unsigned int denorm_mask = 141u << 23;
    unsigned int bits = __float_as_uint(f);
    const unsigned int sign = bits & 0x80000000u;
    bits ^= sign;
    unsigned char result;
    if (bits >= fp8_max) {
        result = 0x7f;
    } else if (bits < (121u << 23)) {
        bits = __float_as_uint(__fadd_rn(__uint_as_float(bits), __uint_as_float(denorm_mask)));
        result = (unsigned char)(bits - denorm_mask);
    } else {
        const unsigned int mant_odd = (bits >> 20) & 1u;
        bits += ((unsigned int)(7 - 127) << 23) + 0x7ffffu;
        bits += mant_odd;
        result = (unsigned char)(bits >> 20);
    }
    return result | (unsigned char)(sign >> 24);
}

// c10's fp8e5m2_from_fp32_value (torch/headeronly/util/Float8_e5m2.h): round to nearest even, 61440
// and above to infinity (0x7c), NaN to NaN (0x7f), subnormals below 2^-14.
__device__ __forceinline__ unsigned char e5m2_from_f(float f) {
    const unsigned int fp32_inf = 255u << 23;
    const unsigned int fp8_max = 143u << 23;
    const unsigned int denorm_mask = 134u << 23;
    unsigned int bits = __float_as_uint(f);
    const unsigned int sign = bits & 0x80000000u;
    bits ^= sign;
    unsigned char result;
    if (bits >= fp8_max) {
        result = bits > fp32_inf ? 0x7f : 0x7c;
    } else if (bits < (113u << 23)) {
        bits = __float_as_uint(__fadd_rn(__uint_as_float(bits), __uint_as_float(denorm_mask)));
        result = (unsigned char)(bits - denorm_mask);
    } else {
        const unsigned int mant_odd = (bits >> 21) & 1u;
        bits += ((unsigned int)(15 - 127) << 23) + 0xfffffu;
        bits += mant_odd;
        result = (unsigned char)(bits >> 21);
    }
    return result | (unsigned char)(sign >> 24);
}

// *amax_bits = max(*amax_bits, bits of |x|) over the input: non-negative floats order as their bit
// patterns, and a NaN's pattern is above infinity's, so NaN wins as in libtorch's max. 256 threads.
extern "C" __global__ void fp8_amax(const store_t* __restrict__ x, unsigned int* __restrict__ amax_bits,
                                    long long vectors) {
    unsigned int m = 0u;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const vec_t v = load_vec(x + i * VEC);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            m = max(m, __float_as_uint(fabsf(to_f(v.v[j]))));
        }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
        m = max(m, __shfl_xor_sync(0xffffffffu, m, offset));
    }
    __shared__ unsigned int warps[8];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) {
        warps[warp] = m;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x / 32); ++w) {
            m = max(m, warps[w]);
        }
        atomicMax(amax_bits, m);
    }
}

// The scale from the largest magnitude, then each value quantized (to e5m2 when `e5m2` is set, else
// to e4m3fn); block 0's first thread writes the scale for the product.
extern "C" __global__ void fp8_quantize(const store_t* __restrict__ x, unsigned char* __restrict__ out,
                                        const unsigned int* __restrict__ amax_bits, float* __restrict__ scale_out,
                                        long long vectors, int e5m2) {
    const float top = e5m2 ? 57344.0f : 448.0f;
    const float amax = __uint_as_float(*amax_bits);
    const float floored = amax != amax ? amax : fmaxf(amax, 1e-12f);
    const float scale = __fdiv_rn(floored, top);
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        *scale_out = scale;
    }
    const float divisor = to_f(from_f(scale));  // the scale in the input's type, as libtorch divides
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const vec_t v = load_vec(x + i * VEC);
        bytes_t q;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float y = to_f(from_f(__fdiv_rn(to_f(v.v[j]), divisor)));
            y = y != y ? y : fminf(fmaxf(y, -top), top);
            q.v[j] = e5m2 ? e5m2_from_f(y) : e4m3fn_from_f(y);
        }
        *reinterpret_cast<bytes_t*>(out + i * VEC) = q;
    }
}
