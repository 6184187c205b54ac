// ROIAlignV2 (detectron2's ROIAlign with aligned=True) of channels-last maps [B, H, W, C] over
// R boxes into [R, P, P, C], and its adjoint (the gradient with respect to the map). The CPU op
// (src/roi_align.rs) defines the semantics; these kernels follow it step by step.
//
// The host resolves each box against the map in f64 (src/roi_align.rs `Region`: where it
// starts, its bin sizes, samples per bin and divisor) and uploads the rows per call;
// the kernels place every sample from them. Sample positions, bilinear weights and sums are
// f64 for every storage type, as on the CPU: positions rounded op by op like the CPU's (no
// fused multiply-adds, which nvcc would otherwise contract) decide which pixels a sample falls
// between exactly as the CPU does, so a sample a rounding away from a pixel boundary or from
// the map's edge takes the CPU's taps; the forward then adds the CPU's products in the CPU's
// order. The arithmetic is small next to the op's reads (FP64 runs at half the FP32 rate on
// an H100).
//
// Thread mapping: one thread per output element (box, bin row, bin column, channel), the
// channel fastest, so the lanes of a warp read consecutive channels of the same pixels (one
// 128-byte line per tap in f32) and, in the backward, add into consecutive channels.

#include "common.cuh"

namespace convmae {

// One box on the map (src/cuda.rs `RoiRegionRow` mirrors this layout; keep the two in step).
// Sample iy of bin row ph lies at y_start + ph * bin_h + (iy + 0.5) * bin_h / grid_h; x alike.
struct RoiRegion {
    double y_start, x_start;
    double bin_h, bin_w;
    double count;  // the bins' divisor: max(grid_h * grid_w, 1)
    int64_t image;
    int64_t grid_h, grid_w;  // samples per bin along each axis (0 for an inverted box)
};
static_assert(sizeof(RoiRegion) == 64, "src/cuda.rs mirrors this layout");

// A sample's two neighbours along one axis and their weights (src/roi_align.rs `Tap`).
struct RoiTap {
    int64_t lo, hi;
    double w_lo, w_hi;
};

// Sample i of bin p, rounded op by op as src/roi_align.rs `Axis::sample` is: the _rn
// intrinsics are never contracted into fused multiply-adds (a product followed by a sum below).
__device__ __forceinline__ double roi_sample(double start, double bin, int64_t grid, int64_t p, int64_t i) {
    return __dadd_rn(__dadd_rn(start, __dmul_rn((double)p, bin)), ((double)i + 0.5) * bin / (double)grid);
}

// The taps of the sample at v on an axis of `size` pixels; false when it lies more than a pixel
// off the map (the whole sample then counts 0). On the last pixel both taps are that pixel,
// with weights 1 and 0 (src/roi_align.rs `tap`).
__device__ __forceinline__ bool roi_tap(double v, int64_t size, RoiTap& t) {
    if (v < -1.0 || v > (double)size) return false;
    v = fmax(v, 0.0);
    const int64_t lo = (int64_t)floor(v);
    if (lo >= size - 1) {
        t = RoiTap{size - 1, size - 1, 1.0, 0.0};
        return true;
    }
    const double l = v - (double)lo;
    t = RoiTap{lo, lo + 1, 1.0 - l, l};
    return true;
}

// The output element a thread computes (forward) or spreads (backward), or false past the last.
struct RoiBin {
    int64_t r, ph, pw, ch;
};
__device__ __forceinline__ bool roi_bin(int64_t regions, int64_t chans, int64_t output, RoiBin& b) {
    const int64_t idx = global_thread();
    if (idx >= regions * output * output * chans) return false;
    b.ch = idx % chans;
    int64_t rest = idx / chans;
    b.pw = rest % output;
    rest /= output;
    b.ph = rest % output;
    b.r = rest / output;
    return true;
}

// out[r, ph, pw, c] = the mean over the bin's grid_h x grid_w samples of the map's bilinear
// value there, samples off the map counting 0: the CPU's loops (sample rows, sample columns,
// then the taps (lo, lo), (lo, hi), (hi, lo), (hi, hi)), summed in f64 in that order.
template <typename T>
__device__ __forceinline__ void roi_align_fwd(const T* __restrict__ x, const RoiRegion* __restrict__ regions, T* __restrict__ out,
                                              int64_t n_regions, int64_t height, int64_t width, int64_t chans, int64_t output) {
    RoiBin b;
    if (!roi_bin(n_regions, chans, output, b)) return;
    const RoiRegion g = regions[b.r];
    const T* image = x + g.image * height * width * chans + b.ch;
    double acc = 0.0;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        RoiTap ty;
        if (!roi_tap(roi_sample(g.y_start, g.bin_h, g.grid_h, b.ph, iy), height, ty)) continue;
        const int64_t ys[2] = {ty.lo, ty.hi};
        const double wys[2] = {ty.w_lo, ty.w_hi};
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
            RoiTap tx;
            if (!roi_tap(roi_sample(g.x_start, g.bin_w, g.grid_w, b.pw, ix), width, tx)) continue;
            const int64_t xs[2] = {tx.lo, tx.hi};
            const double wxs[2] = {tx.w_lo, tx.w_hi};
#pragma unroll
            for (int a = 0; a < 2; ++a)
#pragma unroll
                for (int c = 0; c < 2; ++c)
                    acc = __dadd_rn(acc, __dmul_rn(__dmul_rn(wys[a], wxs[c]), (double)image[(ys[a] * width + xs[c]) * chans]));
        }
    }
    out[((b.r * output + b.ph) * output + b.pw) * chans + b.ch] = (T)(acc / g.count);
}

// The adjoint: each bin's gradient, times its samples' bilinear weights / count, added into
// the map's gradient `dx` (zeroed by the host) at the samples' taps, with the CPU's products:
// a sample on the last row adds once there with weight w_lo + w_hi (the CPU gathers by map row,
// so merges the two), its columns always twice.
//
// By float atomics, as detectron2's CUDA kernel does. Their order is not deterministic, so
// where several samples touch one pixel (neighbouring bins, overlapping boxes) the gradient
// may differ in its last bits from run to run: the same sum up to rounding, which the GPU
// check's tolerance against the CPU allows. That is acceptable for this op: a fixed order
// would need the CPU's gather instead (each map row collecting from its image's boxes, with
// per-row box lists built on the device), and the atomics rarely contend, as a warp's lanes add
// into distinct channels of a pixel.
template <typename T>
__device__ __forceinline__ void roi_align_bwd(const T* __restrict__ grad, const RoiRegion* __restrict__ regions, T* __restrict__ dx,
                                              int64_t n_regions, int64_t height, int64_t width, int64_t chans, int64_t output) {
    RoiBin b;
    if (!roi_bin(n_regions, chans, output, b)) return;
    const RoiRegion g = regions[b.r];
    const double gv = (double)grad[((b.r * output + b.ph) * output + b.pw) * chans + b.ch];
    T* image = dx + g.image * height * width * chans + b.ch;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
        RoiTap ty;
        if (!roi_tap(roi_sample(g.y_start, g.bin_h, g.grid_h, b.ph, iy), height, ty)) continue;
        for (int64_t ix = 0; ix < g.grid_w; ++ix) {
            RoiTap tx;
            if (!roi_tap(roi_sample(g.x_start, g.bin_w, g.grid_w, b.pw, ix), width, tx)) continue;
            // Map row y gets the sample's columns at weight wy (no arrays indexed at run time:
            // those would live in local memory).
            const auto add_row = [&](int64_t y, double wy) {
                atomicAdd(&image[(y * width + tx.lo) * chans], (T)(wy * tx.w_lo / g.count * gv));
                atomicAdd(&image[(y * width + tx.hi) * chans], (T)(wy * tx.w_hi / g.count * gv));
            };
            if (ty.lo == ty.hi) {
                add_row(ty.lo, ty.w_lo + ty.w_hi);
            } else {
                add_row(ty.lo, ty.w_lo);
                add_row(ty.hi, ty.w_hi);
            }
        }
    }
}

}  // namespace convmae

using namespace convmae;

// f32 and f64, the CPU op's types (atomicAdd on double exists from sm_60). No 16-bit forms:
// src/roi_align.rs names the op and the dtype in its error for those.
#define ROI_ALIGN_KERNELS(T, TNAME)                                                                                     \
    extern "C" __global__ void roi_align_fwd_##TNAME(const T* x, const RoiRegion* regions, T* out, int64_t n_regions,   \
                                                     int64_t height, int64_t width, int64_t chans, int64_t output) {    \
        roi_align_fwd<T>(x, regions, out, n_regions, height, width, chans, output);                                    \
    }                                                                                                                   \
    extern "C" __global__ void roi_align_bwd_##TNAME(const T* grad, const RoiRegion* regions, T* dx, int64_t n_regions, \
                                                     int64_t height, int64_t width, int64_t chans, int64_t output) {    \
        roi_align_bwd<T>(grad, regions, dx, n_regions, height, width, chans, output);                                  \
    }

ROI_ALIGN_KERNELS(float, f32)
ROI_ALIGN_KERNELS(double, f64)
