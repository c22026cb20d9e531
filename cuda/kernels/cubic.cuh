// cubic.cuh: the taps of bicubic resampling along one axis, shared by interp.cu (the bicubic
// op) and quant_step.cu (codes -> bicubic -> Phi), so the two compute bitwise the same weights.
// PyTorch's F.interpolate(mode='bicubic', align_corners=False): scale = in/out (f32),
// src = (o + 0.5)*scale - 0.5 (not clamped), i0 = floor(src), t = src - i0, taps i0-1 .. i0+2
// clamped to [0, in-1] with weights W(t+1), W(t), W(1-t), W(2-t) of the cubic convolution kernel
// with A = -0.75, all in f32. When in == out, t = 0 and the weights are exactly (0, 1, 0, 0).

#define CUBIC_A (-0.75f)

// The four clamped input indices and weights that output o reads along an axis.
__device__ __forceinline__ void cubic_taps(i64 o, i64 in, i64 out, i64* idx, float* wt) {
    float scale = (float)in / (float)out;
    float src = ((float)o + 0.5f) * scale - 0.5f;
    float f = floorf(src);
    float t = src - f;
    i64 i0 = (i64)f;
#pragma unroll
    for (int k = 0; k < 4; ++k) idx[k] = min(max(i0 - 1 + k, (i64)0), in - 1);
    const float a = CUBIC_A;
    float d0 = t + 1.0f, d2 = 1.0f - t, d3 = 2.0f - t;
    wt[0] = ((a * d0 - 5.0f * a) * d0 + 8.0f * a) * d0 - 4.0f * a;  // 1 <= d0 < 2
    wt[1] = ((a + 2.0f) * t - (a + 3.0f)) * t * t + 1.0f;            // 0 <= t < 1
    wt[2] = ((a + 2.0f) * d2 - (a + 3.0f)) * d2 * d2 + 1.0f;         // 0 < d2 <= 1
    wt[3] = ((a * d3 - 5.0f * a) * d3 + 8.0f * a) * d3 - 4.0f * a;  // 1 < d3 <= 2
}
