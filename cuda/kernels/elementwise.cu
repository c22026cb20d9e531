// elementwise.cu: unary maps, binary ops with NumPy broadcasting, scalar forms (affine, powf,
// clamp), comparisons, where, broadcast copies, dtype casts and fills; forwards and the fused
// backwards of the differentiable ones.
//
// Layout: dense row-major buffers. Broadcasting inputs are read through a `Layout` (output dims,
// per-input strides with 0 on broadcast axes); when all shapes agree the host sets
// LAYOUT_CONTIGUOUS and offsets are the element index itself.
// Parallel decomposition: one thread per output element, grid-stride loop, 256 threads a block.
// Each thread reads its inputs once and writes its outputs once, so these kernels are bound by
// memory bandwidth; the binary backward writes both input gradients at the output shape and the
// host reduces broadcast axes afterwards with the sum kernel.
// Tuned variants (`*_vec_*`: unary and binary forwards and backwards, scalar forwards) for
// buffers that are one dense run whose length is a multiple of the 16-byte vector (4 f32, 8 bf16)
// at 16-byte aligned addresses: one thread per 16 bytes, so a warp moves 512 contiguous bytes per
// access with a quarter (f32) or an eighth (bf16) of the load and store instructions. A binary
// input may also be broadcast along one run of adjacent axes, e.g. a bias [C] over [N, C] or an
// AdaLN shift [B, 1, C] over [B, L, C]: with `inner` the length of the axes after the run and
// `span` that of the run and those axes, output index e reads it at (e / span) * inner +
// e % inner, one division and one modulo per 16 bytes (32-bit where the sizes allow) instead of
// the general kernel's per-axis divisions for every element. Or it may be constant along the
// trailing axes and vary along one run before them (a per-head scale [1, H, 1, 1] over
// [B, H, T, D]): one element per vector (load_operand). The per-element kernels above are the general ones and the reference variant
// (`MVAR_EW_KERNEL=scalar` forces them).
// Numerics: every value is computed in f32, bf16 widened on load and rounded once on store.
//
// Op codes mirror cuda/src/ops/elementwise.rs (`unary::*`, `binary::*`, `scalar::*`, `cmp::*`).

#define U_NEG 0
#define U_EXP 1
#define U_LOG 2
#define U_SQRT 3
#define U_RSQRT 4
#define U_TANH 5
#define U_SIGMOID 6
#define U_SILU 7
#define U_GELU_TANH 8
#define U_RELU 9
#define U_ABS 10
#define U_SQUARE 11

#define B_ADD 0
#define B_SUB 1
#define B_MUL 2
#define B_DIV 3
#define B_MAX 4
#define B_MIN 5

#define S_AFFINE 0
#define S_POWF 1
#define S_CLAMP 2

#define C_EQ 0
#define C_NE 1
#define C_LT 2
#define C_LE 3
#define C_GT 4
#define C_GE 5

#define SQRT_2_OVER_PI 0.7978845608028654f
#define GELU_C 0.044715f

__device__ __forceinline__ float sigmoid_f(float x) {
    // Split by sign so that expf never overflows.
    if (x >= 0.0f) return 1.0f / (1.0f + expf(-x));
    float e = expf(x);
    return e / (1.0f + e);
}

__device__ __forceinline__ float unary_forward(int op, float x) {
    switch (op) {
        case U_NEG: return -x;
        case U_EXP: return expf(x);
        case U_LOG: return logf(x);
        case U_SQRT: return sqrtf(x);
        case U_RSQRT: return rsqrtf(x);
        case U_TANH: return tanhf(x);
        case U_SIGMOID: return sigmoid_f(x);
        case U_SILU: return x * sigmoid_f(x);
        case U_GELU_TANH: {
            float u = SQRT_2_OVER_PI * (x + GELU_C * x * x * x);
            return 0.5f * x * (1.0f + tanhf(u));
        }
        case U_RELU: return fmaxf(x, 0.0f);
        case U_ABS: return fabsf(x);
        case U_SQUARE: return x * x;
    }
    return __int_as_float(0x7fc00000);  // unknown op: NaN, never silently plausible
}

// dL/dx from the saved value s (the output for exp, sqrt, rsqrt, tanh, sigmoid; the input for
// the others, as the CPU reference saves them) and dL/dy.
__device__ __forceinline__ float unary_backward(int op, float s, float g) {
    switch (op) {
        case U_NEG: return -g;
        case U_EXP: return g * s;
        case U_LOG: return g / s;
        case U_SQRT: return g * 0.5f / s;
        case U_RSQRT: return -g * 0.5f * s * s * s;
        case U_TANH: return g * (1.0f - s * s);
        case U_SIGMOID: return g * s * (1.0f - s);
        case U_SILU: {
            float sg = sigmoid_f(s);
            return g * (sg + s * sg * (1.0f - sg));
        }
        case U_GELU_TANH: {
            float t = tanhf(SQRT_2_OVER_PI * (s + GELU_C * s * s * s));
            float du = SQRT_2_OVER_PI * (1.0f + 3.0f * GELU_C * s * s);
            return g * (0.5f * (1.0f + t) + 0.5f * s * (1.0f - t * t) * du);
        }
        case U_RELU: return s > 0.0f ? g : 0.0f;
        case U_ABS: return s > 0.0f ? g : (s < 0.0f ? -g : 0.0f);
        case U_SQUARE: return g * (s + s);
    }
    return __int_as_float(0x7fc00000);
}

__device__ __forceinline__ float binary_forward(int op, float a, float b) {
    switch (op) {
        case B_ADD: return a + b;
        case B_SUB: return a - b;
        case B_MUL: return a * b;
        case B_DIV: return a / b;
        case B_MAX: return a >= b ? a : b;
        case B_MIN: return a <= b ? a : b;
    }
    return __int_as_float(0x7fc00000);
}

// (dL/da, dL/db) at one element; ties of max/min split the gradient evenly (as PyTorch).
__device__ __forceinline__ void binary_backward(int op, float a, float b, float g, float* da, float* db) {
    switch (op) {
        case B_ADD: *da = g; *db = g; return;
        case B_SUB: *da = g; *db = -g; return;
        case B_MUL: *da = g * b; *db = g * a; return;
        case B_DIV: *da = g / b; *db = -g * a / (b * b); return;
        case B_MAX:
        case B_MIN: {
            bool a_wins = (op == B_MAX) ? (a > b) : (a < b);
            if (a == b) { *da = 0.5f * g; *db = 0.5f * g; }
            else if (a_wins) { *da = g; *db = 0.0f; }
            else { *da = 0.0f; *db = g; }
            return;
        }
    }
    *da = *db = __int_as_float(0x7fc00000);
}

template <typename T>
__device__ void unary_fwd_impl(T* out, const T* x, i64 n, int op) {
    GRID_STRIDE(i, n) Io<T>::store(out, i, unary_forward(op, Io<T>::load(x, i)));
}

template <typename T>
__device__ void unary_bwd_impl(T* dx, const T* saved, const T* g, i64 n, int op) {
    GRID_STRIDE(i, n) Io<T>::store(dx, i, unary_backward(op, Io<T>::load(saved, i), Io<T>::load(g, i)));
}

template <typename T>
__device__ void binary_fwd_impl(T* out, const T* a, const T* b, i64 n, int op, Layout l) {
    GRID_STRIDE(i, n) {
        float x = Io<T>::load(a, offset_of(l, 0, i));
        float y = Io<T>::load(b, offset_of(l, 1, i));
        Io<T>::store(out, i, binary_forward(op, x, y));
    }
}

// Gradients of both inputs at the output shape; a null output pointer skips that input.
template <typename T>
__device__ void binary_bwd_impl(T* ga, T* gb, const T* a, const T* b, const T* g, i64 n, int op, Layout l) {
    GRID_STRIDE(i, n) {
        float x = Io<T>::load(a, offset_of(l, 0, i));
        float y = Io<T>::load(b, offset_of(l, 1, i));
        float da, db;
        binary_backward(op, x, y, Io<T>::load(g, i), &da, &db);
        if (ga) Io<T>::store(ga, i, da);
        if (gb) Io<T>::store(gb, i, db);
    }
}

template <typename T>
__device__ void scalar_fwd_impl(T* out, const T* x, i64 n, int op, float p0, float p1) {
    GRID_STRIDE(i, n) {
        float v = Io<T>::load(x, i);
        float r;
        if (op == S_AFFINE) r = v * p0 + p1;
        else if (op == S_POWF) r = powf(v, p0);
        else r = fminf(fmaxf(v, p0), p1);
        Io<T>::store(out, i, r);
    }
}

template <typename T>
__device__ void scalar_bwd_impl(T* dx, const T* x, const T* g, i64 n, int op, float p0, float p1) {
    GRID_STRIDE(i, n) {
        float v = Io<T>::load(x, i), gi = Io<T>::load(g, i);
        float r;
        if (op == S_AFFINE) r = gi * p0;
        else if (op == S_POWF) r = gi * p0 * powf(v, p0 - 1.0f);
        else r = (v >= p0 && v <= p1) ? gi : 0.0f;
        Io<T>::store(dx, i, r);
    }
}

// Comparisons read values natively (i64 exactly, bf16 widened) and write a u8 mask.
template <typename T> __device__ __forceinline__ double as_double(T v) { return (double)v; }
template <> __device__ __forceinline__ double as_double<bf16_t>(bf16_t v) { return (double)bf16_to_f32(v); }

template <typename T>
__device__ void compare_impl(u8* out, const T* a, const T* b, i64 n, int op, Layout l) {
    GRID_STRIDE(i, n) {
        double x = as_double(a[offset_of(l, 0, i)]);
        double y = as_double(b[offset_of(l, 1, i)]);
        bool r;
        switch (op) {
            case C_EQ: r = x == y; break;
            case C_NE: r = x != y; break;
            case C_LT: r = x < y; break;
            case C_LE: r = x <= y; break;
            case C_GT: r = x > y; break;
            default: r = x >= y; break;
        }
        out[i] = r ? 1 : 0;
    }
}

// where: inputs (cond, a, b) in that order in the layout.
template <typename T>
__device__ void where_impl(T* out, const u8* cond, const T* a, const T* b, i64 n, Layout l) {
    GRID_STRIDE(i, n) {
        out[i] = cond[offset_of(l, 0, i)] ? a[offset_of(l, 1, i)] : b[offset_of(l, 2, i)];
    }
}

// Broadcast copy (broadcast_to) and strided copies in general: input 0 of the layout.
template <typename T>
__device__ void expand_impl(T* out, const T* x, i64 n, Layout l) {
    GRID_STRIDE(i, n) out[i] = x[offset_of(l, 0, i)];
}

template <typename T>
__device__ void fill_impl(T* out, i64 n, float v) {
    GRID_STRIDE(i, n) Io<T>::store(out, i, v);
}

// The tuned variants: i counts 16-byte vectors of N elements. The op is the same for the whole
// launch, so each kernel dispatches on it once (unary_dispatch and friends) into a loop compiled
// for that one op: with the switch inside the per-element loop, ptxas kept it there (an indirect
// branch, BRX, and its compares for every element: eight per bf16 vector), which left bf16 GELU
// bound by instruction issue rather than by memory.

// Calls F::run<OP>(args...) with the op code as a compile-time constant; an unknown code runs
// OP = -1, for which the op functions return NaN (never silently plausible).
template <class F, typename... A>
__device__ __forceinline__ void unary_dispatch(int op, A... a) {
    switch (op) {
        case U_NEG: F::template run<U_NEG>(a...); return;
        case U_EXP: F::template run<U_EXP>(a...); return;
        case U_LOG: F::template run<U_LOG>(a...); return;
        case U_SQRT: F::template run<U_SQRT>(a...); return;
        case U_RSQRT: F::template run<U_RSQRT>(a...); return;
        case U_TANH: F::template run<U_TANH>(a...); return;
        case U_SIGMOID: F::template run<U_SIGMOID>(a...); return;
        case U_SILU: F::template run<U_SILU>(a...); return;
        case U_GELU_TANH: F::template run<U_GELU_TANH>(a...); return;
        case U_RELU: F::template run<U_RELU>(a...); return;
        case U_ABS: F::template run<U_ABS>(a...); return;
        case U_SQUARE: F::template run<U_SQUARE>(a...); return;
        default: F::template run<-1>(a...); return;
    }
}

template <class F, typename... A>
__device__ __forceinline__ void binary_dispatch(int op, A... a) {
    switch (op) {
        case B_ADD: F::template run<B_ADD>(a...); return;
        case B_SUB: F::template run<B_SUB>(a...); return;
        case B_MUL: F::template run<B_MUL>(a...); return;
        case B_DIV: F::template run<B_DIV>(a...); return;
        case B_MAX: F::template run<B_MAX>(a...); return;
        case B_MIN: F::template run<B_MIN>(a...); return;
        default: F::template run<-1>(a...); return;
    }
}

template <typename T>
struct UnaryFwdVec {
    template <int OP>
    static __device__ __forceinline__ void run(T* out, const T* x, i64 nvec) {
        constexpr int N = Vec16<T>::N;
        GRID_STRIDE(i, nvec) {
            float v[N];
            Vec16<T>::load(x + i * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = unary_forward(OP, v[k]);
            Vec16<T>::store(out + i * N, v);
        }
    }
};

template <typename T>
__device__ void unary_fwd_vec_impl(T* out, const T* x, i64 nvec, int op) {
    unary_dispatch<UnaryFwdVec<T>>(op, out, x, nvec);
}

template <typename T>
struct UnaryBwdVec {
    template <int OP>
    static __device__ __forceinline__ void run(T* dx, const T* saved, const T* g, i64 nvec) {
        constexpr int N = Vec16<T>::N;
        GRID_STRIDE(i, nvec) {
            float s[N], d[N];
            Vec16<T>::load(saved + i * N, s);
            Vec16<T>::load(g + i * N, d);
#pragma unroll
            for (int k = 0; k < N; ++k) d[k] = unary_backward(OP, s[k], d[k]);
            Vec16<T>::store(dx + i * N, d);
        }
    }
};

template <typename T>
__device__ void unary_bwd_vec_impl(T* dx, const T* saved, const T* g, i64 nvec, int op) {
    unary_dispatch<UnaryBwdVec<T>>(op, dx, saved, g, nvec);
}

// Where a binary input sits for output element e (a multiple of N): e itself when inner is 0 (the
// input has the output's shape), else (e / span) * inner + e % inner (broadcast along one run of
// axes; inner a multiple of N, so a vector never straddles two input rows).
__device__ __forceinline__ i64 run_offset(i64 e, i64 inner, i64 span) {
    if (inner == 0) return e;
    if (e <= 0xffffffffLL && span <= 0xffffffffLL) {
        const unsigned int u = (unsigned int)e, sp = (unsigned int)span, in = (unsigned int)inner;
        return (i64)(u / sp) * inner + (i64)(u % in);
    }
    return (e / span) * inner + e % inner;
}

// The N input values of output vector e. inner >= 0: a vector of the input at run_offset. inner
// < 0: the input is constant along the last -inner output elements (a multiple of N) and varies
// along one run of `span` elements before them, broadcast before that (a per-head scale [1, H,
// 1, 1] over [B, H, T, D], a per-row value [A, 1] over [A, C]): one element, at
// (e / -inner) % span, for all N.
template <typename T>
__device__ __forceinline__ void load_operand(const T* p, i64 e, i64 inner, i64 span, float* v) {
    constexpr int N = Vec16<T>::N;
    if (inner >= 0) {
        Vec16<T>::load(p + run_offset(e, inner, span), v);
        return;
    }
    const i64 rep = -inner;
    i64 at;
    if (e <= 0xffffffffLL && rep <= 0xffffffffLL && span <= 0xffffffffLL) {
        at = (i64)(((unsigned int)e / (unsigned int)rep) % (unsigned int)span);
    } else {
        at = (e / rep) % span;
    }
    const float x = Io<T>::load(p, at);
#pragma unroll
    for (int k = 0; k < N; ++k) v[k] = x;
}

template <typename T>
struct BinaryFwdVec {
    template <int OP>
    static __device__ __forceinline__ void run(T* out, const T* a, const T* b, i64 nvec, i64 inner_a, i64 span_a,
                                               i64 inner_b, i64 span_b) {
        constexpr int N = Vec16<T>::N;
        GRID_STRIDE(i, nvec) {
            const i64 e = i * N;
            float x[N], y[N];
            load_operand(a, e, inner_a, span_a, x);
            load_operand(b, e, inner_b, span_b, y);
#pragma unroll
            for (int k = 0; k < N; ++k) x[k] = binary_forward(OP, x[k], y[k]);
            Vec16<T>::store(out + i * N, x);
        }
    }
};

template <typename T>
__device__ void binary_fwd_vec_impl(T* out, const T* a, const T* b, i64 nvec, int op, i64 inner_a,
                                    i64 span_a, i64 inner_b, i64 span_b) {
    binary_dispatch<BinaryFwdVec<T>>(op, out, a, b, nvec, inner_a, span_a, inner_b, span_b);
}

template <typename T>
struct BinaryBwdVec {
    template <int OP>
    static __device__ __forceinline__ void run(T* ga, T* gb, const T* a, const T* b, const T* g, i64 nvec,
                                               i64 inner_a, i64 span_a, i64 inner_b, i64 span_b) {
        constexpr int N = Vec16<T>::N;
        GRID_STRIDE(i, nvec) {
            const i64 e = i * N;
            float x[N], y[N], d[N], da[N], db[N];
            load_operand(a, e, inner_a, span_a, x);
            load_operand(b, e, inner_b, span_b, y);
            Vec16<T>::load(g + i * N, d);
#pragma unroll
            for (int k = 0; k < N; ++k) binary_backward(OP, x[k], y[k], d[k], &da[k], &db[k]);
            if (ga) Vec16<T>::store(ga + i * N, da);
            if (gb) Vec16<T>::store(gb + i * N, db);
        }
    }
};

template <typename T>
__device__ void binary_bwd_vec_impl(T* ga, T* gb, const T* a, const T* b, const T* g, i64 nvec, int op,
                                    i64 inner_a, i64 span_a, i64 inner_b, i64 span_b) {
    binary_dispatch<BinaryBwdVec<T>>(op, ga, gb, a, b, g, nvec, inner_a, span_a, inner_b, span_b);
}

template <typename T>
struct ScalarFwdVec {
    template <int OP>
    static __device__ __forceinline__ void run(T* out, const T* x, i64 nvec, float p0, float p1) {
        constexpr int N = Vec16<T>::N;
        GRID_STRIDE(i, nvec) {
            float v[N];
            Vec16<T>::load(x + i * N, v);
#pragma unroll
            for (int k = 0; k < N; ++k) {
                if (OP == S_AFFINE) v[k] = v[k] * p0 + p1;
                else if (OP == S_POWF) v[k] = powf(v[k], p0);
                else v[k] = fminf(fmaxf(v[k], p0), p1);
            }
            Vec16<T>::store(out + i * N, v);
        }
    }
};

template <typename T>
__device__ void scalar_fwd_vec_impl(T* out, const T* x, i64 nvec, int op, float p0, float p1) {
    // As scalar_fwd_impl: anything but affine and powf is the clamp.
    if (op == S_AFFINE) ScalarFwdVec<T>::template run<S_AFFINE>(out, x, nvec, p0, p1);
    else if (op == S_POWF) ScalarFwdVec<T>::template run<S_POWF>(out, x, nvec, p0, p1);
    else ScalarFwdVec<T>::template run<S_CLAMP>(out, x, nvec, p0, p1);
}

#define FLOAT_KERNELS(T, S)                                                                          \
    extern "C" __global__ void unary_fwd_##S(T* out, const T* x, i64 n, int op) {                  \
        unary_fwd_impl<T>(out, x, n, op);                                                           \
    }                                                                                               \
    extern "C" __global__ void unary_bwd_##S(T* dx, const T* s, const T* g, i64 n, int op) {       \
        unary_bwd_impl<T>(dx, s, g, n, op);                                                         \
    }                                                                                               \
    extern "C" __global__ void binary_fwd_##S(T* out, const T* a, const T* b, i64 n, int op,      \
                                             Layout l) {                                            \
        binary_fwd_impl<T>(out, a, b, n, op, l);                                                    \
    }                                                                                               \
    extern "C" __global__ void binary_bwd_##S(T* ga, T* gb, const T* a, const T* b, const T* g,   \
                                             i64 n, int op, Layout l) {                             \
        binary_bwd_impl<T>(ga, gb, a, b, g, n, op, l);                                              \
    }                                                                                               \
    extern "C" __global__ void scalar_fwd_##S(T* out, const T* x, i64 n, int op, float p0,         \
                                             float p1) {                                            \
        scalar_fwd_impl<T>(out, x, n, op, p0, p1);                                                  \
    }                                                                                               \
    extern "C" __global__ void scalar_bwd_##S(T* dx, const T* x, const T* g, i64 n, int op,        \
                                             float p0, float p1) {                                  \
        scalar_bwd_impl<T>(dx, x, g, n, op, p0, p1);                                                \
    }                                                                                               \
    extern "C" __global__ void unary_fwd_vec_##S(T* out, const T* x, i64 nvec, int op) {           \
        unary_fwd_vec_impl<T>(out, x, nvec, op);                                                    \
    }                                                                                               \
    extern "C" __global__ void unary_bwd_vec_##S(T* dx, const T* s, const T* g, i64 nvec, int op) { \
        unary_bwd_vec_impl<T>(dx, s, g, nvec, op);                                                  \
    }                                                                                               \
    extern "C" __global__ void binary_fwd_vec_##S(T* out, const T* a, const T* b, i64 nvec, int op, \
                                                 i64 inner_a, i64 span_a, i64 inner_b, i64 span_b) { \
        binary_fwd_vec_impl<T>(out, a, b, nvec, op, inner_a, span_a, inner_b, span_b);              \
    }                                                                                               \
    extern "C" __global__ void binary_bwd_vec_##S(T* ga, T* gb, const T* a, const T* b, const T* g, \
                                                 i64 nvec, int op, i64 inner_a, i64 span_a,         \
                                                 i64 inner_b, i64 span_b) {                         \
        binary_bwd_vec_impl<T>(ga, gb, a, b, g, nvec, op, inner_a, span_a, inner_b, span_b);        \
    }                                                                                               \
    extern "C" __global__ void scalar_fwd_vec_##S(T* out, const T* x, i64 nvec, int op, float p0,  \
                                                 float p1) {                                        \
        scalar_fwd_vec_impl<T>(out, x, nvec, op, p0, p1);                                           \
    }

FLOAT_KERNELS(float, f32)
FLOAT_KERNELS(bf16_t, bf16)

// Activations under bf16 autocast (`unary` in ops/src/elementwise.rs): f32 x in, f32 y out, and
// a bf16 copy of x kept for the backward, which reads it instead of x. The saved activation
// (VAR's FFN hidden layer, four times the model width) takes half the memory, as under PyTorch's
// autocast, where that tensor is bf16 to begin with; written in the forward's pass, it costs 2
// more bytes an element there and saves 2 in the backward. The gradient is the op's at the
// bf16-rounded x (the CPU reference casts, then runs the f32 backward: the same numbers).
// Per-element kernels (reference) and vector kernels of 8 elements a thread (two 16-byte f32
// vectors and one 16-byte bf16 vector), for a length that divides by 8 at 16-byte aligned
// addresses.
__device__ void unary_fwd_keep_bf16_impl(float* out, bf16_t* kept, const float* x, i64 n, int op) {
    GRID_STRIDE(i, n) {
        const float v = x[i];
        out[i] = unary_forward(op, v);
        Io<bf16_t>::store(kept, i, v);
    }
}

__device__ void unary_bwd_from_bf16_impl(float* dx, const bf16_t* kept, const float* g, i64 n, int op) {
    GRID_STRIDE(i, n) dx[i] = unary_backward(op, Io<bf16_t>::load(kept, i), g[i]);
}

struct UnaryFwdKeepBf16Vec {
    template <int OP>
    static __device__ __forceinline__ void run(float* out, bf16_t* kept, const float* x, i64 nvec) {
        GRID_STRIDE(i, nvec) {
            float v[8];
            Vec16<float>::load(x + i * 8, v);
            Vec16<float>::load(x + i * 8 + 4, v + 4);
            Vec16<bf16_t>::store(kept + i * 8, v);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = unary_forward(OP, v[k]);
            Vec16<float>::store(out + i * 8, v);
            Vec16<float>::store(out + i * 8 + 4, v + 4);
        }
    }
};

struct UnaryBwdFromBf16Vec {
    template <int OP>
    static __device__ __forceinline__ void run(float* dx, const bf16_t* kept, const float* g, i64 nvec) {
        GRID_STRIDE(i, nvec) {
            float s[8], d[8];
            Vec16<bf16_t>::load(kept + i * 8, s);
            Vec16<float>::load(g + i * 8, d);
            Vec16<float>::load(g + i * 8 + 4, d + 4);
#pragma unroll
            for (int k = 0; k < 8; ++k) d[k] = unary_backward(OP, s[k], d[k]);
            Vec16<float>::store(dx + i * 8, d);
            Vec16<float>::store(dx + i * 8 + 4, d + 4);
        }
    }
};

extern "C" __global__ void unary_fwd_keep_bf16_f32(float* out, bf16_t* kept, const float* x, i64 n, int op) {
    unary_fwd_keep_bf16_impl(out, kept, x, n, op);
}
extern "C" __global__ void unary_bwd_from_bf16_f32(float* dx, const bf16_t* kept, const float* g, i64 n, int op) {
    unary_bwd_from_bf16_impl(dx, kept, g, n, op);
}
extern "C" __global__ void unary_fwd_keep_bf16_vec_f32(float* out, bf16_t* kept, const float* x, i64 nvec,
                                                       int op) {
    unary_dispatch<UnaryFwdKeepBf16Vec>(op, out, kept, x, nvec);
}
extern "C" __global__ void unary_bwd_from_bf16_vec_f32(float* dx, const bf16_t* kept, const float* g, i64 nvec,
                                                       int op) {
    unary_dispatch<UnaryBwdFromBf16Vec>(op, dx, kept, g, nvec);
}

#define ANY_KERNELS(T, S)                                                                            \
    extern "C" __global__ void compare_##S(u8* out, const T* a, const T* b, i64 n, int op,         \
                                          Layout l) {                                               \
        compare_impl<T>(out, a, b, n, op, l);                                                       \
    }                                                                                               \
    extern "C" __global__ void where_##S(T* out, const u8* c, const T* a, const T* b, i64 n,       \
                                        Layout l) {                                                 \
        where_impl<T>(out, c, a, b, n, l);                                                          \
    }                                                                                               \
    extern "C" __global__ void expand_##S(T* out, const T* x, i64 n, Layout l) {                   \
        expand_impl<T>(out, x, n, l);                                                               \
    }                                                                                               \
    extern "C" __global__ void fill_##S(T* out, i64 n, float v) { fill_impl<T>(out, n, v); }

ANY_KERNELS(float, f32)
ANY_KERNELS(bf16_t, bf16)
ANY_KERNELS(i64, i64)
ANY_KERNELS(u8, u8)

// Strided copies of raw words: a permute whose innermost run is a whole number of 4-, 8- or
// 16-byte words moves them one thread and one offset computation per word (the host rescales
// the layout to words; see strided_copy in cuda/src/ops/elementwise.rs).
#define WORD_COPY_KERNELS(T, S)                                                                      \
    extern "C" __global__ void expand_##S(T* out, const T* x, i64 n, Layout l) {                   \
        expand_impl<T>(out, x, n, l);                                                               \
    }

WORD_COPY_KERNELS(unsigned int, w4)
WORD_COPY_KERNELS(unsigned long long, w8)
WORD_COPY_KERNELS(Word16, w16)

// Casts between every pair of element kinds, through f32 (exact for bf16 <-> f32 widening and
// for integers below 2^24, which is what tensors of ids and masks hold).
#define CAST(TA, SA, TB, SB)                                                                         \
    extern "C" __global__ void cast_##SA##_to_##SB(TB* out, const TA* x, i64 n) {                  \
        GRID_STRIDE(i, n) Io<TB>::store(out, i, Io<TA>::load(x, i));                                \
    }

CAST(float, f32, bf16_t, bf16)
CAST(float, f32, i64, i64)
CAST(float, f32, u8, u8)
CAST(bf16_t, bf16, float, f32)
CAST(bf16_t, bf16, i64, i64)
CAST(bf16_t, bf16, u8, u8)
CAST(i64, i64, float, f32)
CAST(i64, i64, bf16_t, bf16)
CAST(i64, i64, u8, u8)
CAST(u8, u8, float, f32)
CAST(u8, u8, bf16_t, bf16)
CAST(u8, u8, i64, i64)
