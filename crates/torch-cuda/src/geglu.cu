// GEGLU, `h * gelu(gate)` where `[h, gate]` are the two halves of the last dimension of the
// feed-forward's projection, forward and backward in one pass each (the feed-forward of diffusers'
// `BasicTransformerBlock`: `hidden_states, gate = proj(x).chunk(2, dim=-1); hidden_states * gelu(gate)`).
//
// Compiled at run time by NVRTC (src/geglu.cpp, src/nvrtc_kernels.h) once per (GPU architecture,
// storage type, vector width), with
//   STORE_KIND  0 = float, 1 = bfloat16, 2 = float16 (the type of the projection and the results)
//   VEC         elements per vector access (1, 2, 4 or 8; it divides the inner width)
//
// Layout: proj is [rows, 2 * inner] (contiguous), h = proj[:, :inner], gate = proj[:, inner:]; the
// output is [rows, inner]. The halves are strided views, on which libtorch's elementwise kernels take
// their slow, unvectorized path (and chunk's backward adds a copy); here each thread reads VEC
// contiguous values of each half. The arithmetic is libtorch's, value for value (exact GELU of
// aten/src/ATen/native/cuda/ActivationGeluKernel.cu in fp32, then the multiplication, each result
// rounded to the storage type as the separate ops round it):
//   forward   g = round(gate * 0.5 * (1 + erf(gate * sqrt(1/2)))); out = round(h * g)
//   backward  dh = round(dout * g); dg' = round(dout * h);
//             dgate = round(dg' * (cdf + gate * pdf)), cdf = 0.5 * (1 + erf(gate * sqrt(1/2))),
//             pdf = exp(-0.5 * gate * gate) * (2 / sqrt(pi)) * sqrt(1/2) * 0.5
// and the backward writes [dh, dgate] side by side: the projection's gradient, as chunk's backward
// would assemble it.

#include "store_types.cuh"  // store_t, to_f, from_f, vec_t, load_vec, store_vec

// libtorch's exact GELU in fp32.
__device__ __forceinline__ float gelu_f(float x) {
    const float kAlpha = 0.70710678118654752440f;  // M_SQRT1_2
    return x * 0.5f * (1.0f + erff(x * kAlpha));
}

// libtorch's exact GELU backward in fp32: dy * d/dx gelu(x).
__device__ __forceinline__ float gelu_backward_f(float dy, float x) {
    const float kBeta = (float)(1.12837916709551257390 * 0.70710678118654752440 * 0.5);  // M_2_SQRTPI * M_SQRT1_2 * 0.5
    const float kAlpha = 0.70710678118654752440f;
    const float cdf = 0.5f * (1.0f + erff(x * kAlpha));
    const float pdf = expf(-0.5f * x * x) * kBeta;
    return dy * (cdf + x * pdf);
}

// out[r, c] = h * gelu(gate), VEC outputs per thread, grid-stride over the vectors of the output.
extern "C" __global__ void geglu_fwd(const store_t* __restrict__ proj, store_t* __restrict__ out, long long vectors,
                                     int inner) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const long long r = e / inner;
        const int c = (int)(e - r * inner);
        const store_t* row = proj + r * 2 * inner;
        const vec_t h = load_vec(row + c);
        const vec_t g = load_vec(row + inner + c);
        vec_t o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float gel = to_f(from_f(gelu_f(to_f(g.v[j]))));
            o.v[j] = from_f(to_f(h.v[j]) * gel);
        }
        store_vec(out + e, o);
    }
}

// dproj[r, c] = dout * gelu(gate), dproj[r, inner + c] = gelu'(gate) * (dout * h).
extern "C" __global__ void geglu_bwd(const store_t* __restrict__ dout, const store_t* __restrict__ proj,
                                     store_t* __restrict__ dproj, long long vectors, int inner) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const long long r = e / inner;
        const int c = (int)(e - r * inner);
        const long long base = r * 2 * inner + c;
        const vec_t d = load_vec(dout + e);
        const vec_t h = load_vec(proj + base);
        const vec_t g = load_vec(proj + base + inner);
        vec_t dh, dg;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float gate = to_f(g.v[j]);
            const float dy = to_f(d.v[j]);
            const float gel = to_f(from_f(gelu_f(gate)));
            dh.v[j] = from_f(dy * gel);
            const float dgel = to_f(from_f(dy * to_f(h.v[j])));
            dg.v[j] = from_f(gelu_backward_f(dgel, gate));
        }
        store_vec(dproj + base, dh);
        store_vec(dproj + base + inner, dg);
    }
}
