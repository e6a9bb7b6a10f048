// The fused passes of fastopt.comm's DDP comm hooks on the CPU (see comm.h; spec: fastopt/reference/comm.py).
#include "comm.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "fastopt/api.h"
#include "fastopt/elementwise.h"

namespace fastopt {
namespace {

inline uint32_t mag_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return u & 0x7FFFFFFFu;
}

// [begin, end) of thread t's share of n elements among nt threads (static, contiguous, in index order).
inline void share(int64_t n, int t, int nt, int64_t& b, int64_t& e) {
  b = n * t / nt;
  e = n * (t + 1) / nt;
}

constexpr int kBins = 2048;  // the top 11 bits of a magnitude key (sign bit excluded)
constexpr int64_t kParallelMin = 1 << 15;  // fewer elements: one thread (a parallel region costs more)

}  // namespace

void comm_psgd_pre(int64_t x_, int64_t e_, int64_t n, int64_t mem_, const std::vector<int64_t>& seg_off,
                   const std::vector<int64_t>& seg_len) {
  check_arg(seg_off.size() == seg_len.size(), "comm_psgd_pre: segment lists differ in length");
  float* x = as_ptr<float>(x_);
  float* e = as_ptr<float>(e_);
  float* mem = as_ptr<float>(mem_);
  const int64_t nseg = static_cast<int64_t>(seg_off.size());
  std::vector<int64_t> dst(nseg + 1, 0);
  for (int64_t s = 0; s < nseg; ++s) dst[s + 1] = dst[s] + seg_len[s];
#pragma omp parallel if (n > kParallelMin)
  {
    if (e != nullptr) {
#pragma omp for schedule(static)
      for (int64_t i = 0; i < n; ++i) {
        const float v = x[i] + e[i];
        x[i] = v;
        e[i] = v;
      }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < nseg; ++s)
      if (seg_len[s] > 0) std::memcpy(mem + dst[s], x + seg_off[s], sizeof(float) * seg_len[s]);
  }
}

void comm_psgd_scatter(int64_t x_, int64_t mem_, const std::vector<int64_t>& seg_off,
                       const std::vector<int64_t>& seg_len, double world) {
  check_arg(seg_off.size() == seg_len.size(), "comm_psgd_scatter: segment lists differ in length");
  float* x = as_ptr<float>(x_);
  float* mem = as_ptr<float>(mem_);
  const float w = static_cast<float>(world);
  int64_t k = 0;
  for (size_t s = 0; s < seg_off.size(); ++s) {
    float* dst = x + seg_off[s];
    const float* src = mem + k;
    const int64_t len = seg_len[s];
#pragma omp parallel for schedule(static) if (len > 65536)
    for (int64_t j = 0; j < len; ++j) dst[j] = src[j] / w;
    k += len;
  }
}

void comm_psgd_error(int64_t x_, int64_t e_, int64_t n) {
  const float* x = as_ptr<const float>(x_);
  float* e = as_ptr<float>(e_);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t i = 0; i < n; ++i) e[i] = e[i] - x[i];
}

int64_t comm_topk_compress(int64_t g_, int64_t e_, int64_t n, int64_t k, int64_t vals_, int64_t idx_, int phase,
                           bool zero_g) {
  check_arg(n >= 0 && k >= 0 && k <= n, "comm_topk_compress: need 0 <= k <= n");
  check_arg(phase >= 1 && phase <= 3, "comm_topk_compress: phase is 1, 2 or 3");
  float* g = as_ptr<float>(g_);
  float* e = as_ptr<float>(e_);
  float* x = e != nullptr ? e : g;  // x = g + e lives in e with error feedback
  const int maxt = omp_get_max_threads();
  constexpr int kSub = 4;  // interleaved sub-histograms: runs of equal bins do not serialize on one counter
  std::vector<int64_t> hist(static_cast<size_t>(maxt) * kBins * kSub, 0);
  const bool add = (phase & 1) && e != nullptr, select = (phase & 2) != 0;
  // pass 0: the error-feedback add, fused with the histogram of the top key bits
#pragma omp parallel if (n > kParallelMin)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b, end;
    share(n, t, nt, b, end);
    int64_t* h = hist.data() + static_cast<size_t>(t) * kBins * kSub;
    if (add && select) {
      for (int64_t i = b; i < end; ++i) {
        const float v = g[i] + e[i];
        e[i] = v;
        ++h[(mag_key(v) >> 20) * kSub + (i & (kSub - 1))];
      }
    } else if (add) {
      for (int64_t i = b; i < end; ++i) e[i] = g[i] + e[i];
    } else if (select) {
      for (int64_t i = b; i < end; ++i) ++h[(mag_key(x[i]) >> 20) * kSub + (i & (kSub - 1))];
    }
  }
  if (!select) return 0;
  float* vals = as_ptr<float>(vals_);
  int32_t* idx = as_ptr<int32_t>(idx_);
  int64_t above = 0;
  int b1 = -1;
  if (k > 0) {
    for (int bin = kBins - 1; bin >= 0; --bin) {
      int64_t c = 0;
      for (int t = 0; t < maxt; ++t)
        for (int u = 0; u < kSub; ++u) c += hist[(static_cast<size_t>(t) * kBins + bin) * kSub + u];
      if (above + c >= k) {
        b1 = bin;
        break;
      }
      above += c;
    }
  }
  // pass 1: every element at or above the threshold bin, in index order per thread; g zeroed
  struct Entry {
    int64_t i;
    float v;
  };
  std::vector<std::vector<Entry>> lists(maxt);
  std::vector<int> nts(1, 1);
#pragma omp parallel if (n > kParallelMin)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (t == 0) nts[0] = nt;
    int64_t b, end;
    share(n, t, nt, b, end);
    std::vector<Entry>& l = lists[t];
    if (b1 >= 0) {
      const uint32_t lo = static_cast<uint32_t>(b1) << 20;
      for (int64_t i = b; i < end; ++i) {
        const float v = x[i];
        if (mag_key(v) >= lo) l.push_back({i, v});
      }
    }
    if (zero_g) std::memset(g + b, 0, sizeof(float) * (end - b));
  }
  if (k == 0) return 0;
  // the exact k-th largest key among the threshold bin's candidates
  const int64_t need = k - above;
  std::vector<uint32_t> cand;
  for (auto& l : lists)
    for (const Entry& en : l)
      if (static_cast<int>(mag_key(en.v) >> 20) == b1) cand.push_back(mag_key(en.v));
  check_arg(need >= 1 && need <= static_cast<int64_t>(cand.size()), "comm_topk_compress: internal count error");
  std::nth_element(cand.begin(), cand.begin() + (need - 1), cand.end(), std::greater<uint32_t>());
  const uint32_t thr = cand[need - 1];
  int64_t gt = 0;
  for (uint32_t c : cand) gt += c > thr;
  int64_t ties = need - gt;
  int64_t j = 0;
  for (auto& l : lists) {
    for (const Entry& en : l) {
      const uint32_t key = mag_key(en.v);
      bool take = key > thr;
      if (!take && key == thr && ties > 0) {
        take = true;
        --ties;
      }
      if (take) {
        vals[j] = en.v;
        idx[j] = static_cast<int32_t>(en.i);
        if (e != nullptr) e[en.i] = 0.0f;
        ++j;
      }
    }
  }
  check_arg(j == k, "comm_topk_compress: internal selection error");
  return j;
}

void comm_topk_decompress(int64_t out_, int64_t n, int64_t vals_, int64_t idx_, int64_t k, int64_t rank_stride,
                          int64_t world) {
  check_arg(world >= 1 && k >= 0, "comm_topk_decompress: need world >= 1 and k >= 0");
  float* out = as_ptr<float>(out_);
  const float* vals = as_ptr<const float>(vals_);
  const int32_t* idx = as_ptr<const int32_t>(idx_);
  // every index is checked before anything is written (they come from other ranks)
  for (int64_t r = 0; r < world; ++r)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = idx[r * rank_stride + j];
      check_arg(i >= 0 && i < n, "comm_topk_decompress: an index is out of range");
    }
  for (int64_t r = 0; r < world; ++r) {
    const float* v = vals + r * rank_stride;
    const int32_t* ix = idx + r * rank_stride;
#pragma omp parallel for schedule(static) if (k > 65536)
    for (int64_t j = 0; j < k; ++j) out[ix[j]] += v[j];  // one rank's indices are distinct
  }
  const float w = static_cast<float>(world);
  std::vector<uint8_t> done((n + 7) / 8, 0);
  for (int64_t r = 0; r < world; ++r)
    for (int64_t j = 0; j < k; ++j) {
      const int32_t i = idx[r * rank_stride + j];
      const uint8_t bit = static_cast<uint8_t>(1u << (i & 7));
      if (!(done[i >> 3] & bit)) {
        done[i >> 3] |= bit;
        out[i] = out[i] / w;
      }
    }
}

namespace {

// The chunk bodies are written to vectorize; built twice (AVX2 and the baseline) and picked at run time.
// Every operation is an exact IEEE one (no contraction: -ffp-contract=off), so both copies give the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTOPT_COMM_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTOPT_COMM_CLONES
#endif

// x = g + e into e (feedback) and the chunk's sum of squares in fp64 (8 lanes, then summed in lane order).
FASTOPT_COMM_CLONES
double qsgd_chunk_norm(const float* g, float* e, int64_t len, bool feedback) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  if (feedback) {
    for (; j + 8 <= len; j += 8)
      for (int t = 0; t < 8; ++t) {
        const float v = g[j + t] + e[j + t];
        e[j + t] = v;
        lanes[t] += static_cast<double>(v) * static_cast<double>(v);
      }
    for (; j < len; ++j) {
      const float v = g[j] + e[j];
      e[j] = v;
      lanes[j & 7] += static_cast<double>(v) * static_cast<double>(v);
    }
  } else {
    for (; j + 8 <= len; j += 8)
      for (int t = 0; t < 8; ++t) lanes[t] += static_cast<double>(g[j + t]) * static_cast<double>(g[j + t]);
    for (; j < len; ++j) lanes[j & 7] += static_cast<double>(g[j]) * static_cast<double>(g[j]);
  }
  double ss = 0.0;
  for (int t = 0; t < 8; ++t) ss += lanes[t];
  return ss;
}

// Levels and sign bytes of one chunk (norm > 0), and with feedback the residual e = x - sent.
FASTOPT_COMM_CLONES
void qsgd_chunk_levels(const float* x, float* e, int64_t len, uint32_t i0, float norm, float sf, uint32_t key,
                       uint8_t* q, uint8_t* neg) {
  const float scale = norm / sf;
  const int32_t smax = static_cast<int32_t>(sf);
  for (int64_t j = 0; j < len; ++j) {
    const float v = x[j];
    const float l = std::fabs(v) / norm * sf;
    const float fl = std::floor(l);
    const uint32_t h = fmix32((i0 + static_cast<uint32_t>(j)) * 0x9E3779B1u ^ key);
    const float u = static_cast<float>(static_cast<int32_t>(h >> 8)) * (1.0f / 16777216.0f);
    int32_t lv = static_cast<int32_t>(fl) + (u < l - fl ? 1 : 0);
    lv = lv > smax ? smax : lv;
    q[j] = static_cast<uint8_t>(lv);
    uint32_t bitsv;
    std::memcpy(&bitsv, &v, 4);
    neg[j] = static_cast<uint8_t>(bitsv >> 31);
    if (e != nullptr) {
      const float a = static_cast<float>(lv) * scale;
      e[j] = v - (bitsv >> 31 ? -a : a);
    }
  }
}

// acc[j] += +-(q_j * scale), eight elements (one sign byte, BITS magnitude bytes) at a time; the sign is
// applied by flipping the sign bit (what unary minus does).
// FIRST: acc = 0 + v (acc's old contents ignored); LAST: then acc / w -- the same operations, in the same
// order, as zeroing, adding every rank's values and dividing, in one pass.
template <int BITS, bool FIRST, bool LAST>
FASTOPT_COMM_CLONES void qsgd_chunk_accum(float* __restrict acc, const uint8_t* __restrict mags,
                                          const uint8_t* __restrict signs, int64_t len, float scale, float w) {
  constexpr int kPer = 8 / BITS;
  constexpr uint32_t kMask = (1u << BITS) - 1u;
  const int64_t groups = (len + 7) / 8;
  for (int64_t gi = 0; gi < groups; ++gi) {
    const uint32_t sb = signs[gi];
    const uint8_t* mb = mags + gi * BITS;
    float vals[8];
    for (int t = 0; t < 8; ++t) {
      const uint32_t q = (static_cast<uint32_t>(mb[t / kPer]) >> ((t % kPer) * BITS)) & kMask;
      const float a = static_cast<float>(static_cast<int32_t>(q)) * scale;
      uint32_t ab;
      std::memcpy(&ab, &a, 4);
      ab ^= ((sb >> t) & 1u) << 31;
      std::memcpy(&vals[t], &ab, 4);
    }
    const int64_t m = std::min<int64_t>(8, len - gi * 8);
    for (int t = 0; t < m; ++t) {
      float r = (FIRST ? 0.0f : acc[gi * 8 + t]) + vals[t];
      if (LAST) r = r / w;
      acc[gi * 8 + t] = r;
    }
  }
}

template <bool FIRST, bool LAST>
void qsgd_accum_fl(int bits, float* acc, const uint8_t* mags, const uint8_t* signs, int64_t len, float scale,
                   float w) {
  if (bits == 2) qsgd_chunk_accum<2, FIRST, LAST>(acc, mags, signs, len, scale, w);
  else if (bits == 4) qsgd_chunk_accum<4, FIRST, LAST>(acc, mags, signs, len, scale, w);
  else qsgd_chunk_accum<8, FIRST, LAST>(acc, mags, signs, len, scale, w);
}

void qsgd_accum(int bits, float* acc, const uint8_t* mags, const uint8_t* signs, int64_t len, float scale, float w,
                bool first, bool last) {
  if (first && last) qsgd_accum_fl<true, true>(bits, acc, mags, signs, len, scale, w);
  else if (first) qsgd_accum_fl<true, false>(bits, acc, mags, signs, len, scale, w);
  else if (last) qsgd_accum_fl<false, true>(bits, acc, mags, signs, len, scale, w);
  else qsgd_accum_fl<false, false>(bits, acc, mags, signs, len, scale, w);
}

}  // namespace

void comm_qsgd_compress(int64_t g_, int64_t e_, int64_t n, int64_t chunk, int bits, uint32_t key, int64_t norms_,
                        int64_t mags_, int64_t signs_, int phase, bool feedback) {
  check_arg(bits == 2 || bits == 4 || bits == 8, "comm_qsgd_compress: bits is 2, 4 or 8");
  check_arg(chunk > 0 && chunk % 8 == 0 && chunk <= (1 << 20),
            "comm_qsgd_compress: chunk must be a multiple of 8 in [8, 2^20]");
  check_arg(!feedback || e_ != 0, "comm_qsgd_compress: error feedback needs e");
  check_arg(phase >= 1 && phase <= 3, "comm_qsgd_compress: phase is 1, 2 or 3");
  const float* g = as_ptr<const float>(g_);
  float* e = as_ptr<float>(e_);
  float* norms = as_ptr<float>(norms_);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const bool norms_here = (phase & 1) != 0, codes = (phase & 2) != 0;
  const float* x = feedback ? e : g;
  uint8_t* mags = as_ptr<uint8_t>(mags_);
  uint8_t* signs = as_ptr<uint8_t>(signs_);
  const float sf = static_cast<float>((1 << bits) - 1);
  const int per_byte = 8 / bits;
  const int64_t mag_bytes = (n * bits + 7) / 8;
  // phase 3: each chunk's norm and then its codes while it is in the cache (one pass over x)
#pragma omp parallel if (n > kParallelMin)
  {
    std::vector<uint8_t> q(codes ? chunk : 0), neg(codes ? chunk : 0);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * chunk, len = std::min(n, b + chunk) - b;
      if (norms_here)
        norms[c] = static_cast<float>(std::sqrt(qsgd_chunk_norm(g + b, feedback ? e + b : nullptr, len, feedback)));
      if (!codes) continue;
      const float norm = norms[c];
      if (norm > 0.0f) {
        qsgd_chunk_levels(x + b, feedback ? e + b : nullptr, len, static_cast<uint32_t>(b), norm, sf, key, q.data(),
                          neg.data());
      } else {  // (x is all zeros, or too small to square: nothing is sent, the residual keeps x)
        std::fill(q.begin(), q.begin() + len, 0);
        for (int64_t j = 0; j < len; ++j) neg[j] = static_cast<uint8_t>(std::signbit(x[b + j]));
      }
      const int64_t len8 = (len + 7) / 8 * 8;
      for (int64_t j = len; j < len8; ++j) q[j] = neg[j] = 0;
      uint8_t* m = mags + b / per_byte;
      const int64_t nb = std::min<int64_t>(len8 / per_byte, mag_bytes - b / per_byte);
      for (int64_t k = 0; k < nb; ++k) {
        uint32_t acc = 0;
        for (int t = 0; t < per_byte; ++t) acc |= static_cast<uint32_t>(q[k * per_byte + t]) << (t * bits);
        m[k] = static_cast<uint8_t>(acc);
      }
      uint8_t* sg = signs + b / 8;
      for (int64_t k = 0; k < len8 / 8; ++k) {
        uint32_t acc = 0;
        for (int t = 0; t < 8; ++t) acc |= static_cast<uint32_t>(neg[k * 8 + t]) << t;
        sg[k] = static_cast<uint8_t>(acc);
      }
    }
  }
}

void comm_qsgd_decompress(int64_t out_, int64_t n, int64_t chunk, int bits, int64_t base, int64_t rank_stride,
                          int64_t norms_off, int64_t mags_off, int64_t signs_off, int64_t world) {
  check_arg(bits == 2 || bits == 4 || bits == 8, "comm_qsgd_decompress: bits is 2, 4 or 8");
  check_arg(chunk > 0 && chunk % 8 == 0, "comm_qsgd_decompress: chunk must be a positive multiple of 8");
  check_arg(world >= 1, "comm_qsgd_decompress: world must be >= 1");
  float* out = as_ptr<float>(out_);
  const int64_t chunks = (n + chunk - 1) / chunk;
  const float sf = static_cast<float>((1 << bits) - 1);
  const int per_byte = 8 / bits;
  const float w = static_cast<float>(world);
#pragma omp parallel for schedule(static) if (n > kParallelMin)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t b = c * chunk, len = std::min(n, b + chunk) - b;
    float* o = out + b;
    for (int64_t r = 0; r < world; ++r) {
      const uint8_t* rb = as_ptr<const uint8_t>(base + r * rank_stride);
      const float norm = reinterpret_cast<const float*>(rb + norms_off)[c];
      qsgd_accum(bits, o, rb + mags_off + b / per_byte, rb + signs_off + b / 8, len, norm / sf, w, r == 0,
                 r == world - 1);
    }
  }
}

}  // namespace fastopt
