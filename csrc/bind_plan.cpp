// The plan runner: a converted integer model as one list of checked kernel calls over preallocated
// buffers (lowbit.runtime builds it once per input shape), run by one call without the GIL.
//
// Python (lowbit/runtime/plan.py) decides the steps and assigns every intermediate value a buffer by
// liveness; the plan owns the buffers (64-byte aligned). Each step is validated when it is added,
// with the same checks as the single-call bindings (bind_checks.h), and its operands are checked
// against the sizes of the buffers they name: buffer ids >= 0 are the plan's own buffers, -1 is the
// caller's input (only a convert step may read it) and -2 the caller's output (only a convert step may
// write it). run() checks the caller's input and output byte counts against the plan's, so no step can
// read or write out of bounds whatever Python passes.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "bind_checks.h"
#include "int8_common.h"
#include "qops.h"
#include "quantize.h"
#include "w46.h"

namespace py = pybind11;

namespace lowbit {

namespace {

void need(bool cond, const std::string& msg) {
    if (!cond) throw std::invalid_argument(msg);
}

constexpr int kExtIn = -1, kExtOut = -2;

// convert ops
enum class Cvt : int { quant = 0, dequant = 1, copy = 2 };
// layouts: 0 = same index, 1 = NCHW -> NHWC, 2 = NHWC -> NCHW (a [b, c, hw] <-> [b, hw, c] transpose)

struct Step {
    enum class Kind { convert, conv, gemm, add, clamp, pool, w46conv, w46gemm } kind = Kind::convert;
    int in0 = 0, in1 = 0, out = 0;
    ConvCall conv;
    GemmCall gemm;
    qops::AddParams add;
    qops::PoolShape pool;
    qops::PoolOp pool_op = qops::PoolOp::max;
    int32_t pool_zp = 0;
    Cvt cvt = Cvt::copy;
    int layout = 0;
    int64_t b = 0, c = 0, hw = 0, n = 0;
    int esize = 1;
    float scale = 1.0f;
    int32_t zp = 0, lo = 0, hi = 255;
    uint8_t xor_mask = 0;
    // 4.6-bit layers (w46.h): conv on NHWC codes (w46g) or linear on dense rows [n, K]
    std::shared_ptr<w46::Packed> w46w;
    w46::ConvGeom w46g{};
    const int32_t* w46_bias = nullptr;
    wb::Epi w46_e;
    int w46_zp = -1;
};

int64_t epi_out_bytes(int kind) {
    return (kind == static_cast<int>(EpiKind::requant_u8) || kind == static_cast<int>(EpiKind::requant_s8)) ? 1 : 4;
}

template <class F>
void relayout(int layout, int64_t b, int64_t c, int64_t hw, F&& f) {
    if (layout == 0 || c == 1 || hw == 1) {
        const int64_t n = b * c * hw;
        for (int64_t i = 0; i < n; ++i) f(i, i);
        return;
    }
    for (int64_t ib = 0; ib < b; ++ib) {
        const int64_t base = ib * c * hw;
        for (int64_t ic = 0; ic < c; ++ic)
            for (int64_t p = 0; p < hw; ++p) {
                const int64_t nchw = base + ic * hw + p, nhwc = base + p * c + ic;
                if (layout == 1)
                    f(nchw, nhwc);
                else
                    f(nhwc, nchw);
            }
    }
}

void run_convert(const Step& s, const void* src, void* dst, uint8_t* tmp) {
    switch (s.cvt) {
        case Cvt::quant: {  // QSpec.quantize: clamp(round_half_even(x / s) + z, lo, hi) in float32 (quantize.h)
            const float* x = static_cast<const float*>(src);
            uint8_t* y = static_cast<uint8_t*>(dst);
            quant::QuantParams qp;
            qp.scale = &s.scale;
            qp.zp = static_cast<float>(s.zp);
            qp.lo = static_cast<float>(s.lo);
            qp.hi = static_cast<float>(s.hi);
            if (s.layout == 0 || s.c == 1 || s.hw == 1) {
                quant::quantize_u8(x, y, 1, s.n, qp);
                return;
            }
            // one image at a time: quantize its NCHW planes in one pass into tmp (c * hw bytes), then
            // transpose the bytes
            uint8_t* t = tmp;
            for (int64_t ib = 0; ib < s.b; ++ib) {
                quant::quantize_u8(x + ib * s.c * s.hw, t, 1, s.c * s.hw, qp);
                relayout(s.layout, 1, s.c, s.hw, [&](int64_t i, int64_t o) { y[ib * s.c * s.hw + o] = t[i]; });
            }
            return;
        }
        case Cvt::dequant: {  // scale * (q - z) as float32
            const uint8_t* x = static_cast<const uint8_t*>(src);
            float* y = static_cast<float*>(dst);
            const float sc = s.scale;
            const int32_t z = s.zp;
            relayout(s.layout, s.b, s.c, s.hw,
                     [&](int64_t i, int64_t o) { y[o] = static_cast<float>(int32_t(x[i]) - z) * sc; });
            return;
        }
        case Cvt::copy:
            if (s.esize == 4) {
                const uint32_t* x = static_cast<const uint32_t*>(src);
                uint32_t* y = static_cast<uint32_t*>(dst);
                relayout(s.layout, s.b, s.c, s.hw, [&](int64_t i, int64_t o) { y[o] = x[i]; });
            } else {
                const uint8_t* x = static_cast<const uint8_t*>(src);
                uint8_t* y = static_cast<uint8_t*>(dst);
                const uint8_t m = s.xor_mask;
                relayout(s.layout, s.b, s.c, s.hw, [&](int64_t i, int64_t o) { y[o] = x[i] ^ m; });
            }
            return;
    }
}

class Plan {
   public:
    Plan(std::vector<int64_t> sizes, int64_t in_bytes, int64_t out_bytes)
        : sizes_(std::move(sizes)), in_bytes_(in_bytes), out_bytes_(out_bytes) {
        need(in_bytes >= 0 && out_bytes >= 0, "negative input or output size");
        for (int64_t s : sizes_) {
            need(s >= 0, "negative buffer size");
            bufs_.emplace_back(static_cast<uint8_t*>(int8::aligned_alloc64(static_cast<size_t>(s))));
            std::memset(bufs_.back().get(), 0, static_cast<size_t>(s));
        }
    }

    // Pointer of buffer `id` after checking it holds `bytes` (ext ids only where allowed).
    uint8_t* buf(int id, int64_t bytes, bool ext_ok, const char* what) {
        need(bytes >= 0, std::string(what) + ": negative size");
        if (id == kExtIn || id == kExtOut) {
            need(ext_ok, std::string(what) + ": this step cannot use the caller's input or output");
            need(bytes == (id == kExtIn ? in_bytes_ : out_bytes_),
                 std::string(what) + ": " + std::to_string(bytes) + " bytes, the caller's " +
                     (id == kExtIn ? "input" : "output") + " has " +
                     std::to_string(id == kExtIn ? in_bytes_ : out_bytes_));
            return nullptr;
        }
        need(id >= 0 && id < static_cast<int>(sizes_.size()), std::string(what) + ": no buffer " + std::to_string(id));
        need(bytes <= sizes_[static_cast<size_t>(id)],
             std::string(what) + ": needs " + std::to_string(bytes) + " bytes, buffer " + std::to_string(id) +
                 " holds " + std::to_string(sizes_[static_cast<size_t>(id)]));
        return bufs_[static_cast<size_t>(id)].get();
    }

    void add_convert(int src, int dst, int op, int64_t b, int64_t c, int64_t hw, int layout, int esize, double scale,
                     int zp, int lo, int hi, int xor_mask) {
        Step s;
        s.kind = Step::Kind::convert;
        need(op >= 0 && op <= 2, "convert: unknown op");
        need(layout >= 0 && layout <= 2, "convert: unknown layout");
        need(b >= 0 && c >= 0 && hw >= 0, "convert: negative shape");
        need(b == 0 || c == 0 || hw == 0 || b * c <= INT64_MAX / hw, "convert: shape overflows");
        s.cvt = static_cast<Cvt>(op);
        need(src != kExtOut && dst != kExtIn, "convert: reads the output or writes the input");
        int in_es = 1, out_es = 1;
        if (s.cvt == Cvt::quant) {
            in_es = 4;
            need(std::isfinite(scale) && scale > 0, "convert: the scale must be finite and positive");
            need(0 <= lo && lo <= hi && hi <= 255, "convert: quantized codes must lie in [0, 255]");
            need(zp >= -(1 << 24) && zp <= (1 << 24), "convert: zero point out of range");
        } else if (s.cvt == Cvt::dequant) {
            out_es = 4;
            need(std::isfinite(scale), "convert: the scale must be finite");
            need(zp >= -(1 << 24) && zp <= (1 << 24), "convert: zero point out of range");
        } else {
            need(esize == 1 || esize == 4, "convert: element size must be 1 or 4");
            need(xor_mask == 0 || (xor_mask == 0x80 && esize == 1), "convert: xor mask must be 0 or 0x80 on bytes");
            in_es = out_es = esize;
        }
        const int64_t n = b * c * hw;
        buf(src, n * in_es, true, "convert input");
        buf(dst, n * out_es, true, "convert output");
        need(src != dst || (layout == 0 && in_es == out_es) || n == 0, "convert: a relayout cannot run in place");
        s.in0 = src;
        s.out = dst;
        s.b = b;
        s.c = c;
        s.hw = hw;
        s.n = n;
        s.layout = layout;
        s.esize = esize;
        s.scale = static_cast<float>(scale);
        s.zp = zp;
        s.lo = lo;
        s.hi = hi;
        s.xor_mask = static_cast<uint8_t>(xor_mask);
        if (s.cvt == Cvt::quant && c * hw > tmp_bytes_) {  // the quantize step's per-image scratch
            tmp_.reset(static_cast<uint8_t*>(int8::aligned_alloc64(static_cast<size_t>(c * hw))));
            tmp_bytes_ = c * hw;
        }
        steps_.push_back(s);
    }

    void add_conv(int x, int out, int res, py::tuple in_shape, int x_zp, py::list weights, std::uintptr_t dw_weight,
                  int64_t n, py::tuple kernel, py::tuple stride, py::tuple padding, py::tuple dilation, int64_t groups,
                  std::uintptr_t bias, int kind, std::uintptr_t m0, std::uintptr_t rshift, int out_zp, int qmin,
                  int qmax, std::uintptr_t scale, std::uintptr_t fbias, int64_t add_m_a, int64_t add_m_b,
                  int add_rshift, int add_r_zp, int add_out_zp, int add_lo, int add_hi, py::object keep) {
        need(x >= 0 && out >= 0 && res >= -3, "conv: operands must be the plan's buffers");
        need(x != out && res != out, "conv: the output buffer must differ from its inputs");
        // first pass with placeholder pointers: the shapes, then the buffers they need
        Step s;
        s.kind = Step::Kind::conv;
        uint8_t* px = bufs_.at(static_cast<size_t>(x)).get();
        uint8_t* po = bufs_.at(static_cast<size_t>(out)).get();
        uint8_t* pr = res >= 0 ? buf(res, 0, false, "conv residual") : nullptr;
        s.conv = check_int8_conv2d(reinterpret_cast<std::uintptr_t>(px), in_shape, x_zp, weights, dw_weight, n, kernel,
                                   stride, padding, dilation, groups, bias, kind, reinterpret_cast<std::uintptr_t>(po),
                                   m0, rshift, out_zp, qmin, qmax, scale, fbias, reinterpret_cast<std::uintptr_t>(pr),
                                   add_m_a, add_m_b, add_rshift, add_r_zp, add_out_zp, add_lo, add_hi);
        const int8::ConvShape& cs = s.conv.s;
        buf(x, cs.b * cs.h * cs.w * cs.c, false, "conv input");
        const int64_t rows = cs.b * cs.ho * cs.wo;
        buf(out, rows * cs.n * s.conv.out_elem_size(), false, "conv output");
        if (res >= 0) buf(res, rows * cs.n, false, "conv residual");
        s.in0 = x;
        s.in1 = res;
        s.out = out;
        steps_.push_back(s);
        keep_.push_back(weights);
        keep_.push_back(keep);
    }

    void add_gemm(int x, int out, int64_t mrows, int64_t k, int x_zp, const int8::Packed& w, std::uintptr_t bias,
                  int kind, std::uintptr_t m0, std::uintptr_t rshift, int out_zp, int qmin, int qmax,
                  std::uintptr_t scale, std::uintptr_t fbias, py::object handle, py::object keep) {
        need(x >= 0 && out >= 0 && x != out, "gemm: operands must be two different buffers of the plan");
        Step s;
        s.kind = Step::Kind::gemm;
        s.gemm = check_int8_gemm(reinterpret_cast<std::uintptr_t>(bufs_.at(static_cast<size_t>(x)).get()), mrows, k, k,
                                 x_zp, w, bias, kind,
                                 reinterpret_cast<std::uintptr_t>(bufs_.at(static_cast<size_t>(out)).get()), m0,
                                 rshift, out_zp, qmin, qmax, scale, fbias);
        const int64_t es = epi_out_bytes(kind);
        buf(x, mrows * k, false, "gemm input");
        buf(out, mrows * w.n * es, false, "gemm output");
        s.in0 = x;
        s.out = out;
        steps_.push_back(s);
        keep_.push_back(handle);
        keep_.push_back(keep);
    }

    // A 4.6-bit convolution: x uint8 NHWC codes (in_shape b, c, h, w; NCHW semantics), out NHWC rows.
    void add_w46_conv(int x, int out, py::tuple in_shape, int x_zp, std::shared_ptr<w46::Packed> w, py::tuple kernel,
                      py::tuple stride, py::tuple padding, py::tuple dilation, int64_t groups, std::uintptr_t bias,
                      int kind, std::uintptr_t p0, std::uintptr_t p1, int out_zp, int qmin, int qmax,
                      py::object keep) {
        const char* what = "w46 conv";
        need(x >= 0 && out >= 0 && x != out, "w46 conv: operands must be two different buffers of the plan");
        need(w != nullptr, "w46 conv: no weights");
        need(py::len(in_shape) == 4 && py::len(kernel) == 2 && py::len(stride) == 2 && py::len(padding) == 2 &&
                 py::len(dilation) == 2,
             "w46 conv: in_shape has 4 entries, kernel/stride/padding/dilation 2");
        auto at = [](const py::tuple& t, int i) { return t[static_cast<size_t>(i)].cast<int64_t>(); };
        w46::ConvGeom g{at(in_shape, 0), at(in_shape, 1), at(in_shape, 2), at(in_shape, 3), at(kernel, 0),
                        at(kernel, 1), at(stride, 0), at(stride, 1), at(padding, 0), at(padding, 1),
                        at(dilation, 0), at(dilation, 1), 0, 0, groups, true, x_zp};
        need(g.B >= 0 && g.C >= 1 && g.H >= 1 && g.W >= 1, "w46 conv: bad input shape");
        need(g.sh >= 1 && g.sw >= 1 && g.dh >= 1 && g.dw >= 1 && g.ph >= 0 && g.pw >= 0 && g.kh >= 1 && g.kw >= 1 &&
                 groups >= 1,
             "w46 conv: bad stride / padding / dilation / kernel size");
        need(groups == w->G && g.C % groups == 0 && w->K == g.kh * g.kw * (g.C / groups),
             "w46 conv: the weights do not match the input channels / groups / kernel");
        g.Ho = wb::conv_out_size(g.H, g.kh, g.sh, g.ph, g.dh);
        g.Wo = wb::conv_out_size(g.W, g.kw, g.sw, g.pw, g.dw);
        need(g.Ho >= 1 && g.Wo >= 1, "w46 conv: empty output");
        const int64_t rows = g.B * g.Ho * g.Wo;
        Step s;
        s.kind = Step::Kind::w46conv;
        s.w46_e = check_w46_epi(what, kind, p0, p1, out_zp, qmin, qmax, *w, bias, 1, rows, x_zp);
        buf(x, g.B * g.H * g.W * g.C, false, "w46 conv input");
        buf(out, rows * w->N * epi_out_bytes(kind), false, "w46 conv output");
        s.w46g = g;
        push_w46(s, std::move(w), bias, x, out, x_zp, std::move(keep));
    }

    // A 4.6-bit linear layer on dense rows x [m, K].
    void add_w46_gemm(int x, int out, int64_t mrows, int x_zp, std::shared_ptr<w46::Packed> w, std::uintptr_t bias,
                      int kind, std::uintptr_t p0, std::uintptr_t p1, int out_zp, int qmin, int qmax,
                      py::object keep) {
        need(x >= 0 && out >= 0 && x != out, "w46 gemm: operands must be two different buffers of the plan");
        need(w != nullptr && w->G == 1, "w46 gemm: weights packed with groups != 1");
        need(mrows >= 0, "w46 gemm: negative row count");
        Step s;
        s.kind = Step::Kind::w46gemm;
        s.w46_e = check_w46_epi("w46 gemm", kind, p0, p1, out_zp, qmin, qmax, *w, bias, 1, mrows, x_zp);
        buf(x, mrows * w->K, false, "w46 gemm input");
        buf(out, mrows * w->N * epi_out_bytes(kind), false, "w46 gemm output");
        s.n = mrows;
        push_w46(s, std::move(w), bias, x, out, x_zp, std::move(keep));
    }

    void push_w46(Step& s, std::shared_ptr<w46::Packed> w, std::uintptr_t bias, int x, int out, int x_zp,
                  py::object keep) {
        s.w46_zp = x_zp;
        s.w46w = std::move(w);
        s.w46_bias = reinterpret_cast<const int32_t*>(bias);
        s.in0 = x;
        s.out = out;
        steps_.push_back(s);
        keep_.push_back(std::move(keep));
    }

    void add_add(int a, int b, int out, int64_t n, int64_t m_a, int64_t m_b, int rshift, int a_zp, int b_zp,
                 int out_zp, int lo, int hi) {
        need(a >= 0 && b >= 0 && out >= 0, "add: operands must be the plan's buffers");
        need(n >= 0, "add: negative element count");
        Step s;
        s.kind = Step::Kind::add;
        s.add = check_add(m_a, m_b, rshift, a_zp, b_zp, out_zp, lo, hi);
        buf(a, n, false, "add input a");
        buf(b, n, false, "add input b");
        buf(out, n, false, "add output");
        s.in0 = a;
        s.in1 = b;
        s.out = out;
        s.n = n;
        steps_.push_back(s);
    }

    void add_clamp(int x, int out, int64_t n, int lo, int hi) {
        need(x >= 0 && out >= 0, "clamp: operands must be the plan's buffers");
        need(n >= 0 && 0 <= lo && lo <= hi && hi <= 255, "clamp: bad size or bounds");
        Step s;
        s.kind = Step::Kind::clamp;
        buf(x, n, false, "clamp input");
        buf(out, n, false, "clamp output");
        s.in0 = x;
        s.out = out;
        s.n = n;
        s.lo = lo;
        s.hi = hi;
        steps_.push_back(s);
    }

    void add_pool(int x, int out, py::tuple in_shape, py::tuple out_hw, py::tuple geom, bool fixed, int op, int zp,
                  bool ceil_mode) {
        need(x >= 0 && out >= 0 && x != out, "pool: operands must be two different buffers of the plan");
        Step s;
        s.kind = Step::Kind::pool;
        s.pool = check_pool2d(in_shape, out_hw, geom, fixed, op, zp, ceil_mode);
        s.pool_op = static_cast<qops::PoolOp>(op);
        s.pool_zp = zp;
        buf(x, s.pool.b * s.pool.c * s.pool.h * s.pool.w, false, "pool input");
        buf(out, s.pool.b * s.pool.c * s.pool.ho * s.pool.wo, false, "pool output");
        s.in0 = x;
        s.out = out;
        steps_.push_back(s);
    }

    void run(std::uintptr_t in, int64_t in_bytes, std::uintptr_t out, int64_t out_bytes, std::uintptr_t timings) {
        need(in_bytes == in_bytes_, "plan input has " + std::to_string(in_bytes) + " bytes, the plan expects " +
                                        std::to_string(in_bytes_));
        need(out_bytes == out_bytes_, "plan output has " + std::to_string(out_bytes) + " bytes, the plan expects " +
                                          std::to_string(out_bytes_));
        need((in != 0 || in_bytes == 0) && (out != 0 || out_bytes == 0), "null input or output pointer");
        double* t = reinterpret_cast<double*>(timings);
        py::gil_scoped_release rel;
        for (size_t i = 0; i < steps_.size(); ++i) {
            const auto t0 = t ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
            exec(steps_[i], reinterpret_cast<const void*>(in), reinterpret_cast<void*>(out));
            if (t) t[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        }
    }

    size_t n_steps() const { return steps_.size(); }
    int64_t nbytes() const {
        int64_t s = 0;
        for (int64_t v : sizes_) s += v;
        return s;
    }
    std::uintptr_t buffer_ptr(int id) const {
        need(id >= 0 && id < static_cast<int>(sizes_.size()), "no such buffer");
        return reinterpret_cast<std::uintptr_t>(bufs_[static_cast<size_t>(id)].get());
    }

   private:
    const uint8_t* src(int id, const void* in) const {
        return id == kExtIn ? static_cast<const uint8_t*>(in) : bufs_[static_cast<size_t>(id)].get();
    }
    uint8_t* dst(int id, void* out) const {
        return id == kExtOut ? static_cast<uint8_t*>(out) : bufs_[static_cast<size_t>(id)].get();
    }

    wb::Out w46_out(const Step& s, void* out) const {
        wb::Out o;
        o.ptr = dst(s.out, out);
        o.ldo = s.w46w->N;
        return o;
    }

    void exec(const Step& s, const void* in, void* out) const {
        switch (s.kind) {
            case Step::Kind::convert:
                run_convert(s, src(s.in0, in), dst(s.out, out), tmp_.get());
                return;
            case Step::Kind::conv:
                if (s.conv.s.b) s.conv.run(src(s.in0, in));
                return;
            case Step::Kind::gemm:
                if (s.gemm.m && s.gemm.w->n) s.gemm.run(src(s.in0, in));
                return;
            case Step::Kind::add:
                qops::add_u8(src(s.in0, in), src(s.in1, in), dst(s.out, out), s.n, s.add);
                return;
            case Step::Kind::clamp: {
                const uint8_t* x = src(s.in0, in);
                uint8_t* y = dst(s.out, out);
                const uint8_t lo = static_cast<uint8_t>(s.lo), hi = static_cast<uint8_t>(s.hi);
                for (int64_t i = 0; i < s.n; ++i) y[i] = x[i] < lo ? lo : (x[i] > hi ? hi : x[i]);
                return;
            }
            case Step::Kind::pool:
                if (s.pool.b) qops::pool2d(src(s.in0, in), dst(s.out, out), s.pool, s.pool_op, s.pool_zp, true);
                return;
            case Step::Kind::w46conv:
                if (s.w46g.B) w46::conv2d(src(s.in0, in), s.w46g, *s.w46w, s.w46_bias, s.w46_e, w46_out(s, out));
                return;
            case Step::Kind::w46gemm:
                if (s.n) w46::linear(src(s.in0, in), s.n, s.w46w->K, *s.w46w, s.w46_bias, s.w46_e, w46_out(s, out),
                                     s.w46_zp);
                return;
        }
    }

    std::vector<int64_t> sizes_;
    std::vector<int8::AlignedPtr<uint8_t>> bufs_;
    int64_t in_bytes_ = 0, out_bytes_ = 0;
    std::vector<Step> steps_;
    int8::AlignedPtr<uint8_t> tmp_;
    int64_t tmp_bytes_ = 0;
    std::vector<py::object> keep_;  // the weights and tensors the steps point into
};

}  // namespace

void register_plan(py::module_& m) {
    py::class_<Plan>(m, "Plan", "A converted model as a checked list of kernel calls over preallocated buffers")
        .def(py::init<std::vector<int64_t>, int64_t, int64_t>(), py::arg("buffer_bytes"), py::arg("in_bytes"),
             py::arg("out_bytes"))
        .def("convert", &Plan::add_convert, py::arg("src"), py::arg("dst"), py::arg("op"), py::arg("b"), py::arg("c"),
             py::arg("hw"), py::arg("layout"), py::arg("esize"), py::arg("scale"), py::arg("zp"), py::arg("lo"),
             py::arg("hi"), py::arg("xor_mask"))
        .def("conv", &Plan::add_conv, py::arg("x"), py::arg("out"), py::arg("res"), py::arg("in_shape"),
             py::arg("x_zp"), py::arg("weights"), py::arg("dw_weight"), py::arg("n"), py::arg("kernel"),
             py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("bias"),
             py::arg("kind"), py::arg("m0"), py::arg("rshift"), py::arg("out_zp"), py::arg("qmin"), py::arg("qmax"),
             py::arg("scale"), py::arg("fbias"), py::arg("add_m_a"), py::arg("add_m_b"), py::arg("add_rshift"),
             py::arg("add_r_zp"), py::arg("add_out_zp"), py::arg("add_lo"), py::arg("add_hi"), py::arg("keep"))
        .def("gemm", &Plan::add_gemm, py::arg("x"), py::arg("out"), py::arg("m"), py::arg("k"), py::arg("x_zp"),
             py::arg("w"), py::arg("bias"), py::arg("kind"), py::arg("m0"), py::arg("rshift"), py::arg("out_zp"),
             py::arg("qmin"), py::arg("qmax"), py::arg("scale"), py::arg("fbias"), py::arg("handle"), py::arg("keep"))
        .def("w46_conv", &Plan::add_w46_conv, py::arg("x"), py::arg("out"), py::arg("in_shape"), py::arg("x_zp"),
             py::arg("w"), py::arg("kernel"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
             py::arg("groups"), py::arg("bias"), py::arg("kind"), py::arg("p0"), py::arg("p1"), py::arg("out_zp"),
             py::arg("qmin"), py::arg("qmax"), py::arg("keep"))
        .def("w46_gemm", &Plan::add_w46_gemm, py::arg("x"), py::arg("out"), py::arg("m"), py::arg("x_zp"), py::arg("w"),
             py::arg("bias"), py::arg("kind"), py::arg("p0"), py::arg("p1"), py::arg("out_zp"), py::arg("qmin"),
             py::arg("qmax"), py::arg("keep"))
        .def("add", &Plan::add_add, py::arg("a"), py::arg("b"), py::arg("out"), py::arg("n"), py::arg("m_a"),
             py::arg("m_b"), py::arg("rshift"), py::arg("a_zp"), py::arg("b_zp"), py::arg("out_zp"), py::arg("lo"),
             py::arg("hi"))
        .def("clamp", &Plan::add_clamp, py::arg("x"), py::arg("out"), py::arg("n"), py::arg("lo"), py::arg("hi"))
        .def("pool", &Plan::add_pool, py::arg("x"), py::arg("out"), py::arg("in_shape"), py::arg("out_hw"),
             py::arg("geometry"), py::arg("fixed"), py::arg("op"), py::arg("zp"), py::arg("ceil_mode"))
        .def("run", &Plan::run, py::arg("x"), py::arg("in_bytes"), py::arg("out"), py::arg("out_bytes"),
             py::arg("timings") = 0, "Run every step (without the GIL); timings: 0 or a float64 [n_steps] pointer.")
        .def_property_readonly("n_steps", &Plan::n_steps)
        .def_property_readonly("nbytes", &Plan::nbytes)
        .def("buffer_ptr", &Plan::buffer_ptr);
}

}  // namespace lowbit
