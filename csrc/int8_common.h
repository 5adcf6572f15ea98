#pragma once
// lowbit int8 kernels: u8 activations (with zero point) x s8 weights -> int32 accumulators, with a
// fused epilogue (none / per-channel requantization to u8|s8 / float dequantization).
//
// Packed weight layout, shared by every ISA path so that the run-time ISA can change between calls:
//   [nblocks][k4][16][4] int8: blocks of 16 output channels; K is split into groups of 4 (padded with
//   zeros to k4*4); one 64-byte row holds the 4 k-values of each of the 16 channels of a block.
// This is the natural operand of AVX-512 VNNI vpdpbusd (16 channels x 4 k per zmm); the AVX2 path
// widens 16 bytes (4 channels x 4 k) to int16 and uses vpmaddwd against a 4 x int16 broadcast of the
// activations (x - x_zp), which is exact for every input (no int16 saturation, unlike vpmaddubsw).
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "qops.h"
#include "epilogue.h"

namespace lowbit {
namespace int8 {

constexpr int kBlockN = 16;  // output channels per packed block
constexpr int kGroupK = 4;   // k values per group

struct AlignedFree {
    void operator()(void* p) const noexcept;
};
void* aligned_alloc64(size_t bytes);

template <class T>
using AlignedPtr = std::unique_ptr<T[], AlignedFree>;

struct Packed {
    int64_t n = 0, k = 0, k4 = 0, nblocks = 0;
    AlignedPtr<int8_t> data;  // [nblocks][k4][16][4]
    std::vector<int32_t> colsum;  // [nblocks * 16], sum_k w[n, k] (0 for padding channels)
    std::vector<int64_t> l1;      // [n], sum_k |w[n, k]|: |acc - bias| <= 255 * l1[n] (accumulator bound)
    const int8_t* block(int64_t b) const { return data.get() + b * k4 * (kBlockN * kGroupK); }
    size_t nbytes() const { return static_cast<size_t>(nblocks * k4 * kBlockN * kGroupK); }
};

// w: int8 [n, k] with row stride ldw (elements).
std::unique_ptr<Packed> pack(const int8_t* w, int64_t n, int64_t k, int64_t ldw);

// What happens to acc[m, n] (the kinds: epilogue.h; bits is not an int8 epilogue) (already including bias and the zero-point correction) before it is
// stored at out[m * ldo + col_off + n]. Per-channel arrays are indexed [col_off + n].
struct Epi {
    EpiKind kind = EpiKind::none;
    const int32_t* m0 = nullptr;
    const int32_t* rshift = nullptr;
    int32_t out_zp = 0, qmin = 0, qmax = 255;
    const float* scale = nullptr;
    const float* fbias = nullptr;  // may be null
    void* out = nullptr;
    int64_t ldo = 0;
    int64_t col_off = 0;
    // Fused residual add (requant_u8 only): the requantized code c (zero point out_zp) is added to the
    // residual code r = add_res[m * ldo + col] with qops' single-rounding add (add.a_zp = out_zp) and the
    // result stored instead: out = clamp(((m_a (c - out_zp) + m_b (r - r_zp) + 2^(R-1)) >> R) + zo, lo, hi).
    const uint8_t* add_res = nullptr;  // null: no fused add
    qops::AddParams add;
};

// Rows of the (virtual) activation matrix A [M, K] as uint8 codes.
struct Rows {
    virtual ~Rows() = default;
    int64_t k = 0;
    // Returns a pointer to K bytes of row m: either into the source or into `scratch` (>= k bytes).
    virtual const uint8_t* row(int64_t m, uint8_t* scratch) const = 0;
    // Direct access, for kernels that read the source in place: the K bytes of row m are runs() runs of
    // run_len() bytes each (a convolution: one per kernel row or per tap), and run_ptrs(m, p, buf) sets
    // p[t] to the start of run t: into the source, or into buf (>= runs() * run_len() bytes, the caller's,
    // kept until the pointers are used) where a run must be assembled (padding). runs() == 0: not
    // available.
    virtual int64_t runs() const { return 0; }
    virtual int64_t run_len() const { return 0; }
    virtual void run_ptrs(int64_t /*m*/, const uint8_t** /*p*/, uint8_t* /*buf*/) const {}
    // run_ptrs of rows [m, m + count): p[r * runs() + t], buf + r * runs() * run_len().
    virtual void run_ptrs_many(int64_t m, int64_t count, const uint8_t** p, uint8_t* buf) const {
        const int64_t nr = runs(), len = run_len();
        for (int64_t r = 0; r < count; ++r) run_ptrs(m + r, p + r * nr, buf + r * nr * len);
    }
};

struct DenseRows final : Rows {
    const uint8_t* x = nullptr;
    int64_t ld = 0;
    const uint8_t* row(int64_t m, uint8_t* /*scratch*/) const override { return x + m * ld; }
    int64_t runs() const override { return 1; }
    int64_t run_len() const override { return k; }
    void run_ptrs(int64_t m, const uint8_t** p, uint8_t* /*buf*/) const override { p[0] = x + m * ld; }
};

// Everything a chunk worker needs. corr[n] (n local to the packed weights, padded to nblocks*16) is
// added to the raw dot products: bias[n] for paths that subtract x_zp from the activations, and
// bias[n] - x_zp * colsum[n] for the u8 (VNNI) path.
struct GemmJob {
    const Rows* a = nullptr;
    int64_t m = 0;
    int32_t zp = 0;
    const Packed* w = nullptr;
    const int32_t* corr = nullptr;
    Epi epi;
};

// Epilogue of a tile T [rows][ldt] int32 of raw dot products covering output rows [row0, row0+rows)
// and local columns [n0, n0+cols): writes epi(T + corr) to the output.
void epilogue_scalar(const Epi& e, const int32_t* T, int64_t ldt, int64_t row0, int64_t rows, int64_t n0,
                     int64_t cols, const int32_t* corr);
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(LOWBIT_INT8_NO_X86)  // (the latter: test builds)
#define LOWBIT_INT8_X86 1
void epilogue_avx2(const Epi& e, const int32_t* T, int64_t ldt, int64_t row0, int64_t rows, int64_t n0,
                   int64_t cols, const int32_t* corr);
#endif

// Per-ISA workers: compute rows [m0, m1) x packed blocks [b0, b1) of the job.
void chunk_portable(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1);
#ifdef LOWBIT_INT8_X86
void chunk_avx2(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1);
void chunk_vnni(const GemmJob& j, int64_t m0, int64_t m1, int64_t b0, int64_t b1);
#endif

// The int8 kernel family actually used under the current ISA cap ("portable", "avx2" or "vnni").
Isa int8_isa();

// The kernel the last int8 call of this thread ran (for `lowbit profile`): its ISA path, the driver
// ("gemm", "conv-1x1", "conv-im2col", "depthwise") and whether a residual add was fused in the epilogue.
struct KernelPath {
    Isa isa = Isa::portable;
    const char* kind = "";
    bool fused_add = false;
};
KernelPath last_kernel_path();

// C = epi(A . W^T + bias); bias (int32, indexed [col_off + n]) may be null.
void gemm(const Rows& a, int64_t m, int32_t zp, const Packed& w, const int32_t* bias, const Epi& e);

struct ConvShape {
    int64_t b = 0, c = 0, h = 0, w = 0;  // input, NHWC in memory
    int64_t n = 0, kh = 1, kw = 1;       // output channels, kernel
    int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1, groups = 1;
    int64_t ho = 0, wo = 0;
};

// General convolution through the GEMM: x NHWC uint8, one packed weight per group with K order
// (kh, kw, c/groups); output NHWC (rows = b*ho*wo, ldo = n).
void conv2d_gemm(const uint8_t* x, const ConvShape& s, int32_t zp, const std::vector<const Packed*>& w,
                 const int32_t* bias, const Epi& e);
// Depthwise (groups == c == n): w int8 [c, kh, kw].
void conv2d_depthwise(const uint8_t* x, const ConvShape& s, int32_t zp, const int8_t* w, const int32_t* bias,
                      const Epi& e);

// Depthwise row workers: compute output rows [r0, r1) of (b*ho) into the output.
struct DwJob {
    const uint8_t* x = nullptr;
    const ConvShape* s = nullptr;
    int32_t zp = 0;
    const int8_t* w = nullptr;          // [c][kh*kw]
    const int16_t* wpair = nullptr;     // AVX2 paired weights (see int8_avx2.cpp), may be null
    const int8_t* wq = nullptr;         // VNNI weights [c/16][kh][ceil(kw/4)][16][4] (int8_dw_vnni.cpp)
    const int32_t* corr = nullptr;      // [c]
    Epi epi;
};
void dw_rows_portable(const DwJob& j, int64_t r0, int64_t r1);
#ifdef LOWBIT_INT8_X86
void dw_pack_avx2(const int8_t* w, int64_t c, int64_t taps, std::vector<int16_t>& out);
void dw_rows_avx2(const DwJob& j, int64_t r0, int64_t r1);
void dw_pack_vnni(const int8_t* w, int64_t c, int64_t kh, int64_t kw, std::vector<int8_t>& out);
void dw_rows_vnni(const DwJob& j, int64_t r0, int64_t r1);
#endif

// Thread-local scratch buffer number `slot` (0..7) of at least `bytes` bytes, 64-byte aligned, grown on
// demand and kept for the next call on the same thread (contents are not preserved on growth).
void* scratch_bytes(int slot, size_t bytes);
template <class T>
T* scratch(int slot, size_t count) {
    return static_cast<T*>(scratch_bytes(slot, count * sizeof(T)));
}

}  // namespace int8
}  // namespace lowbit
