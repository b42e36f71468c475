// Group norm over channels-last maps, with an optional SiLU after it, forward and backward.
//
// Compiled at run time by NVRTC (src/group_norm.cpp) once per (GPU architecture, storage type,
// vector width), with
//   STORE_KIND  0 = float, 1 = bfloat16, 2 = float16 (the type of x, y, dy, dx, weight and bias)
//   VEC         elements per vector access (1, 2, 4 or 8; it divides the channels per group)
// No CUDA header is included: bf16 and fp16 are carried as 16-bit integers and converted here.
//
// Layout: x is [N, L, C] in memory (NCHW's logical shape with channels-last strides, L = H * W),
// G groups of Cg = C / G consecutive channels. Everything accumulates in fp32; every result is
// computed with libtorch's formulas (aten/src/ATen/native/cuda/group_norm_kernel.cu and the SiLU
// kernels), so it differs from libtorch's NCHW kernels only by the order of the sums:
//   forward   y = x * a + b with a = rstd * gamma[c], b = beta[c] - mean * a; SiLU on y rounded to
//             the storage type, as two separate ops would see it
//   backward  dz = dy (or SiLU's backward on the rounded y); per (n, c): ds = sum dz * x,
//             db = sum dz; per (n, g): s1 = sum_c ds * gamma, s2 = sum_c db * gamma,
//             c2 = (s2 * mean - s1) * rstd^3 / M, c3 = -c2 * mean - s2 * rstd / M (M = L * Cg);
//             dx = rstd * gamma[c] * dz + c2 * x + c3; dgamma[c] = sum_n (ds - db * mean) * rstd,
//             dbeta[c] = sum_n db
// Every reduction runs in a fixed order (no atomics): the results are the same in every run.

#include "store_types.cuh"  // store_t, to_f, from_f, vec_t, load_vec, store_vec

// SiLU of a value already rounded to the storage type, rounded again (libtorch's silu kernel).
__device__ __forceinline__ float silu_f(float z) { return to_f(from_f(z / (1.0f + expf(-z)))); }

// SiLU's backward at z (rounded), rounded to the storage type (libtorch's silu_backward kernel).
__device__ __forceinline__ float silu_grad(float dy, float z) {
    const float sig = 1.0f / (1.0f + expf(-z));
    return to_f(from_f(dy * sig * (1.0f + z * (1.0f - sig))));
}

// Chan's parallel combination of (count, mean, M2) triples.
__device__ __forceinline__ void combine(float& c, float& m, float& m2, float cb, float mb, float m2b) {
    if (cb == 0.0f) {
        return;
    }
    const float nc = c + cb;
    const float delta = mb - m;
    m += delta * (cb / nc);
    m2 += m2b + delta * delta * (c * cb / nc);
    c = nc;
}

// Block (s, n) reads rows [s * rows, (s + 1) * rows) of sample n. Thread t covers VEC channels at
// column tc = t % TC (TC = C / VEC) of every k-th row from t / TC (k = blockDim.x / TC), and keeps
// shifted sums; the block combines its threads per group in a fixed order.
// part: [N, S, G, 3] (count, mean, M2).
extern "C" __global__ void gn_stats(const store_t* __restrict__ x, float* __restrict__ part, int L, int C,
                                    int G, int S, int rows) {
    const int TC = C / VEC;
    const int k = blockDim.x / TC;
    const int t = threadIdx.x;
    const int s = blockIdx.x;
    const int n = blockIdx.y;
    const int tc = t % TC;
    const int kr = t / TC;
    float shift = 0.0f, sum = 0.0f, sq = 0.0f;
    int count = 0;
    const int r_begin = s * rows;
    const int r_end = min(L, r_begin + rows);
    const store_t* base = x + (size_t)n * L * C + (size_t)tc * VEC;
    for (int r = r_begin + kr; r < r_end; r += k) {
        const vec_t v = load_vec(base + (size_t)r * C);
        if (count == 0) {
            shift = to_f(v.v[0]);
        }
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const float d = to_f(v.v[i]) - shift;
            sum += d;
            sq += d * d;
        }
        count += VEC;
    }
    extern __shared__ float sh[];
    const int B = blockDim.x;
    const float cnt = (float)count;
    sh[t] = cnt;
    sh[B + t] = count > 0 ? shift + sum / cnt : 0.0f;
    sh[2 * B + t] = count > 0 ? fmaxf(sq - sum * sum / cnt, 0.0f) : 0.0f;
    __syncthreads();
    const int cols = (C / G) / VEC;
    for (int g = t; g < G; g += B) {
        float gc = 0.0f, gm = 0.0f, gm2 = 0.0f;
        for (int rr = 0; rr < k; ++rr) {
            for (int j = 0; j < cols; ++j) {
                const int i = rr * TC + g * cols + j;
                combine(gc, gm, gm2, sh[i], sh[B + i], sh[2 * B + i]);
            }
        }
        float* out = part + (((size_t)n * S + s) * G + g) * 3;
        out[0] = gc;
        out[1] = gm;
        out[2] = gm2;
    }
}

// One warp per (n, g): lane l combines partials l, l + 32, l + 64, ... in order, then the lanes'
// triples meet in a fixed tree (16, 8, 4, 2, 1 apart); mean and rstd = 1/sqrt(var + eps) with the
// biased variance, as libtorch's, in fp32 holding values of the storage type. (One thread per
// (n, g) walking all S partials was a chain of S dependent loads: ~70 us a call on an H100.)
extern "C" __global__ void gn_stats_finish(const float* __restrict__ part, float* __restrict__ mean,
                                           float* __restrict__ rstd, int N, int G, int S, float eps) {
    const int i = (int)(((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32);
    const int lane = threadIdx.x % 32;
    if (i >= N * G) {
        return;  // whole warps leave together: blockDim.x is a multiple of 32
    }
    const int n = i / G;
    const int g = i % G;
    float c = 0.0f, m = 0.0f, m2 = 0.0f;
    for (int s = lane; s < S; s += 32) {
        const float* p = part + (((size_t)n * S + s) * G + g) * 3;
        combine(c, m, m2, p[0], p[1], p[2]);
    }
#pragma unroll
    for (int d = 16; d > 0; d /= 2) {
        const float cb = __shfl_down_sync(0xffffffffu, c, d);
        const float mb = __shfl_down_sync(0xffffffffu, m, d);
        const float m2b = __shfl_down_sync(0xffffffffu, m2, d);
        if (lane < d) {
            combine(c, m, m2, cb, mb, m2b);
        }
    }
    if (lane != 0) {
        return;
    }
    const float var = c > 0.0f ? fmaxf(m2 / c, 0.0f) : 0.0f;
    // Rounded to the storage type, as libtorch returns (and then uses) its statistics.
    mean[i] = to_f(from_f(m));
    rstd[i] = to_f(from_f(rsqrtf(var + eps)));
}

// y = x * a + b (then SiLU), VEC channels per thread, grid-stride over the vectors.
extern "C" __global__ void gn_apply(const store_t* __restrict__ x, const store_t* __restrict__ gamma,
                                    const store_t* __restrict__ beta, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, store_t* __restrict__ y, long long vectors,
                                    int L, int C, int G, int silu) {
    const int cg = C / G;
    const long long per_sample = (long long)L * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const int c0 = (int)(e % C);
        const int ng = (int)(e / per_sample) * G + c0 / cg;
        const float mu = mean[ng];
        const float rs = rstd[ng];
        const vec_t v = load_vec(x + e);
        vec_t o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float a = rs * to_f(gamma[c0 + j]);
            const float b = -a * mu + to_f(beta[c0 + j]);
            const float z = to_f(from_f(to_f(v.v[j]) * a + b));
            o.v[j] = from_f(silu ? silu_f(z) : z);
        }
        store_vec(y + e, o);
    }
}

// The gradient reaching the norm's output: dy, or SiLU's backward at the recomputed (rounded) output.
__device__ __forceinline__ float grad_at_norm(float dy, float x, float a, float b, int silu) {
    if (!silu) {
        return dy;
    }
    const float z = to_f(from_f(x * a + b));
    return silu_grad(dy, z);
}

// Block (s, n) as in gn_stats; per channel, sum dz * x and sum dz over the block's rows, combined
// over the block's rows in a fixed order. part_ds, part_db: [N, S, C].
extern "C" __global__ void gn_bwd_partial(const store_t* __restrict__ dy, const store_t* __restrict__ x,
                                          const store_t* __restrict__ gamma, const store_t* __restrict__ beta,
                                          const float* __restrict__ mean, const float* __restrict__ rstd,
                                          float* __restrict__ part_ds, float* __restrict__ part_db, int L, int C,
                                          int G, int S, int rows, int silu) {
    const int TC = C / VEC;
    const int k = blockDim.x / TC;
    const int t = threadIdx.x;
    const int s = blockIdx.x;
    const int n = blockIdx.y;
    const int tc = t % TC;
    const int kr = t / TC;
    const int c0 = tc * VEC;
    const int g = c0 / (C / G);
    const float mu = mean[n * G + g];
    const float rs = rstd[n * G + g];
    float a[VEC], b[VEC], ds[VEC], db[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        a[j] = rs * to_f(gamma[c0 + j]);
        b[j] = -a[j] * mu + to_f(beta[c0 + j]);
        ds[j] = 0.0f;
        db[j] = 0.0f;
    }
    const int r_begin = s * rows;
    const int r_end = min(L, r_begin + rows);
    const size_t offset = (size_t)n * L * C + c0;
    for (int r = r_begin + kr; r < r_end; r += k) {
        const vec_t xv = load_vec(x + offset + (size_t)r * C);
        const vec_t dv = load_vec(dy + offset + (size_t)r * C);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float xf = to_f(xv.v[j]);
            const float dz = grad_at_norm(to_f(dv.v[j]), xf, a[j], b[j], silu);
            ds[j] += dz * xf;
            db[j] += dz;
        }
    }
    extern __shared__ float sh[];  // [2][k][C]
    const int KC = k * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        sh[kr * C + c0 + j] = ds[j];
        sh[KC + kr * C + c0 + j] = db[j];
    }
    __syncthreads();
    for (int c = t; c < C; c += blockDim.x) {
        float sds = 0.0f, sdb = 0.0f;
        for (int rr = 0; rr < k; ++rr) {
            sds += sh[rr * C + c];
            sdb += sh[KC + rr * C + c];
        }
        const size_t o = ((size_t)n * S + s) * C + c;
        part_ds[o] = sds;
        part_db[o] = sdb;
    }
}

// Block (x, n) of 256 threads: 32 channels from 32 * x, 8 threads each; thread (j, c) sums
// partials j, j + 8, j + 16, ... in order, then thread 0 of each channel adds the 8 in order (a
// fixed order: the same sums in every run). ds, db: [N, C].
extern "C" __global__ void gn_bwd_channel_sums(const float* __restrict__ part_ds, const float* __restrict__ part_db,
                                               float* __restrict__ ds, float* __restrict__ db, int N, int C, int S) {
    const int cx = threadIdx.x % 32;
    const int j = threadIdx.x / 32;
    const int c = blockIdx.x * 32 + cx;
    const int n = blockIdx.y;
    __shared__ float sh[2][8][32];
    float sds = 0.0f, sdb = 0.0f;
    if (c < C) {
        for (int s = j; s < S; s += 8) {
            const size_t o = ((size_t)n * S + s) * C + c;
            sds += part_ds[o];
            sdb += part_db[o];
        }
    }
    sh[0][j][cx] = sds;
    sh[1][j][cx] = sdb;
    __syncthreads();
    if (j != 0 || c >= C) {
        return;
    }
    sds = 0.0f;
    sdb = 0.0f;
#pragma unroll
    for (int r = 0; r < 8; ++r) {
        sds += sh[0][r][cx];
        sdb += sh[1][r][cx];
    }
    ds[(size_t)n * C + c] = sds;
    db[(size_t)n * C + c] = sdb;
}

// Threads [0, N * G): the coefficients c2, c3 of (n, g) into coef [N, G, 2]. Threads [N * G,
// N * G + C) when want_affine: dgamma and dbeta of channel c (fp32) into daffine [2, C].
extern "C" __global__ void gn_bwd_coefficients(const float* __restrict__ ds, const float* __restrict__ db,
                                               const store_t* __restrict__ gamma, const float* __restrict__ mean,
                                               const float* __restrict__ rstd, float* __restrict__ coef,
                                               float* __restrict__ daffine, int N, int L, int C, int G,
                                               int want_affine) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int cg = C / G;
    if (i < N * G) {
        const int n = i / G;
        const int g = i % G;
        float s1 = 0.0f, s2 = 0.0f;
        for (int j = 0; j < cg; ++j) {
            const int c = g * cg + j;
            const float w = to_f(gamma[c]);
            s1 += ds[n * C + c] * w;
            s2 += db[n * C + c] * w;
        }
        const float scale = 1.0f / ((float)cg * (float)L);
        const float mu = mean[i];
        const float rs = rstd[i];
        const float c2 = (s2 * mu - s1) * rs * rs * rs * scale;
        coef[2 * i] = c2;
        coef[2 * i + 1] = -c2 * mu - s2 * rs * scale;
        return;
    }
    const int c = i - N * G;
    if (!want_affine || c >= C) {
        return;
    }
    const int g = c / cg;
    float dgamma = 0.0f, dbeta = 0.0f;
    for (int n = 0; n < N; ++n) {
        dgamma += (ds[n * C + c] - db[n * C + c] * mean[n * G + g]) * rstd[n * G + g];
        dbeta += db[n * C + c];
    }
    daffine[c] = dgamma;
    daffine[C + c] = dbeta;
}

// dx = rstd * gamma[c] * dz + c2 * x + c3, VEC channels per thread, grid-stride.
extern "C" __global__ void gn_bwd_dx(const store_t* __restrict__ dy, const store_t* __restrict__ x,
                                     const store_t* __restrict__ gamma, const store_t* __restrict__ beta,
                                     const float* __restrict__ mean, const float* __restrict__ rstd,
                                     const float* __restrict__ coef, store_t* __restrict__ dx, long long vectors,
                                     int L, int C, int G, int silu) {
    const int cg = C / G;
    const long long per_sample = (long long)L * C;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < vectors;
         i += (long long)gridDim.x * blockDim.x) {
        const long long e = i * VEC;
        const int c0 = (int)(e % C);
        const int ng = (int)(e / per_sample) * G + c0 / cg;
        const float mu = mean[ng];
        const float rs = rstd[ng];
        const float c2 = coef[2 * ng];
        const float c3 = coef[2 * ng + 1];
        const vec_t xv = load_vec(x + e);
        const vec_t dv = load_vec(dy + e);
        vec_t o;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float w = to_f(gamma[c0 + j]);
            const float a = rs * w;
            const float b = -a * mu + to_f(beta[c0 + j]);
            const float xf = to_f(xv.v[j]);
            const float dz = grad_at_norm(to_f(dv.v[j]), xf, a, b, silu);
            o.v[j] = from_f(a * dz + c2 * xf + c3);
        }
        store_vec(dx + e, o);
    }
}
