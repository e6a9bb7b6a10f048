// Gradient compression for data parallelism (fastopt.comm): the fused CPU passes of the DDP comm hooks.
// Every pointer is a raw address of a contiguous fp32 / int32 / uint8 buffer that the Python wrapper
// (fastopt/comm/_kernels.py) validated; the torch spec of each pass is fastopt/reference/comm.py.
//
// PowerSGD (torch's powerSGD_hook, bit for bit: only the elementwise parts are here, the products and
// the orthogonalization stay torch's):
//   psgd_pre:  x += e; e = x (the copy torch keeps as input_tensor_cp; e == 0: no error feedback: e
//              untouched), and mem = the uncompressed segments of x, gathered (torch.cat)
//   psgd_scatter: x[seg] = mem / world  (the averaged uncompressed tensors back into the bucket)
//   psgd_error:   e = e - x             (the new error: input_tensor_cp - input_tensor)
// Top-k with error feedback:
//   topk_compress: x = g + e (into e; or g without feedback), then the k largest |x| (ties: lowest
//              index first) into vals / idx (int32, ascending), e = x - sent (0 where sent), and g = 0
//              (the bucket becomes the accumulator of the decompression)
//   topk_decompress: out[idx_r] += vals_r for every rank r in order (out is 0), then out[touched] /= world
// QSGD (Alistarh et al.), per chunk of `chunk` elements: norm = ||x||_2 (fp64 sum, fp32 result),
// s = 2^bits - 1 levels, level l = |x| / norm * s, q = floor(l) + (u < l - floor(l)) with
// u = (fmix32(i * 0x9E3779B1 ^ key) >> 8) * 2^-24 (i: the index in the tensor), packed as `bits`-bit
// magnitudes (LSB first) plus one sign bit per element; the value sent is +-(q * (norm / s)).
//   qsgd_compress: phase 1: x = g + e (into e with feedback) and the chunk norms; phase 2: codes, and
//              with feedback e = x - sent
//   qsgd_decompress: out[i] = (0 + v_0[i] + v_1[i] + ...) / world over the ranks' packed codes
#pragma once

#include <cstdint>
#include <vector>

namespace fastopt {

void comm_psgd_pre(int64_t x, int64_t e, int64_t n, int64_t mem, const std::vector<int64_t>& seg_off,
                   const std::vector<int64_t>& seg_len);
void comm_psgd_scatter(int64_t x, int64_t mem, const std::vector<int64_t>& seg_off,
                       const std::vector<int64_t>& seg_len, double world);
void comm_psgd_error(int64_t x, int64_t e, int64_t n);

// Returns the number of elements sent (k).  phase: 1 the error-feedback add only, 2 the selection only
// (x already in e), 3 both.
int64_t comm_topk_compress(int64_t g, int64_t e, int64_t n, int64_t k, int64_t vals, int64_t idx, int phase,
                           bool zero_g);
void comm_topk_decompress(int64_t out, int64_t n, int64_t vals, int64_t idx, int64_t k, int64_t rank_stride,
                          int64_t world);

// phase: 1 the add and the norms, 2 the codes (norms given), 3 both.
void comm_qsgd_compress(int64_t g, int64_t e, int64_t n, int64_t chunk, int bits, uint32_t key, int64_t norms,
                        int64_t mags, int64_t signs, int phase, bool feedback);
void comm_qsgd_decompress(int64_t out, int64_t n, int64_t chunk, int bits, int64_t base, int64_t rank_stride,
                          int64_t norms_off, int64_t mags_off, int64_t signs_off, int64_t world);

}  // namespace fastopt
