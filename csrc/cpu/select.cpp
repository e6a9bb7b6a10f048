// Magnitude selection on the CPU (csrc/cpu/select.h; spec: fastopt/reference/select.py): a radix select
// of the counts[g]-th smallest key of every group, over all tensors of the call at once.
//
// The key of x is |x| as fp32 bits with NaN as +inf (fastopt/sparse.h mag_key_bits): an unsigned 31-bit
// integer whose order is the order of |x|.  Three histogram passes fix the key's bits 30..20 (2048 bins),
// 19..10 and 9..0 (1024 bins each), each pass counting only the elements whose higher bits equal the prefix
// fixed so far.  The first two read every element; the second also collects its matching keys (the
// candidates of the third, known in number after the first: collected when at most half the elements),
// so that the third reads only those.  The work is cut into units of at most kUnit elements of
// one tensor; an OpenMP thread counts its units into private sub-histograms and adds them into the
// group's histogram (integer atomics: the counts, hence every result, do not depend on the threads).
// After a pass, the cut of group g is the bin b with below(b) < k <= below(b) + hist[b] (k: the rank
// still sought in the candidates), and k -= below(b).  After the third pass the key t is the threshold,
// k = r the number of elements equal to t that are pruned, hist[b] = c how many there are.
//
// The mask pass writes key > t, and key == t for the ties: when 0 < r < c, the ties are kept provisionally
// while each unit counts its ties, and a fix-up walks the few units holding a tie of flat rank >= c - r
// (the rule: ties are kept by the lowest flat index) and clears those.
#include "select.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "fastopt/api.h"
#include "fastopt/common.h"
#include "fastopt/dispatch.h"
#include "fastopt/sparse.h"

namespace fastopt {
namespace {

constexpr int64_t kUnit = 1 << 16;
constexpr int64_t kSerialBelow = 1 << 15;  // total elements below which one thread does it all
constexpr int kBins = 2048;
constexpr int kSub = 4;  // interleaved sub-histograms (consecutive equal bins do not chain their stores)
constexpr int64_t kSmallUnit = 4096;  // units below this count straight into the thread's int64 histogram

template <typename T> inline uint32_t key_at(const T* p, int64_t i) { return sparse::mag_key_bits(to_float(p[i])); }
template <> inline uint32_t key_at<float>(const float* p, int64_t i) { return sparse::mag_key_bits(p[i]); }
template <> inline uint32_t key_at<bf16_t>(const bf16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i].x & 0x7fffu) << 16;
  return u > 0x7f800000u ? 0x7f800000u : u;
}

struct Unit {
  int64_t tensor, start, len;
};

// pass 0: bins key >> 20 (11 bits); pass 1: (key >> 10) & 1023 where key >> 20 == prefix; pass 2:
// key & 1023 where key >> 10 == prefix.  S interleaved histograms of counters C, kBins apart.
template <int S, typename C, typename T>
void count_unit(const T* __restrict__ x, int64_t len, int pass, uint32_t prefix, C* __restrict__ sub) {
  if (pass == 0) {
    int64_t i = 0;
    for (; i + S <= len; i += S)
      for (int s = 0; s < S; ++s) ++sub[s * kBins + (key_at(x, i + s) >> 20)];
    for (; i < len; ++i) ++sub[key_at(x, i) >> 20];
    return;
  }
  const int shift = pass == 1 ? 20 : 10, low = pass == 1 ? 10 : 0;
  int64_t i = 0;
  for (; i + S <= len; i += S)
    for (int s = 0; s < S; ++s) {
      const uint32_t k = key_at(x, i + s);
      if ((k >> shift) == prefix) ++sub[s * kBins + ((k >> low) & 1023u)];
    }
  for (; i < len; ++i) {
    const uint32_t k = key_at(x, i);
    if ((k >> shift) == prefix) ++sub[(k >> low) & 1023u];
  }
}

// Pass 1 with compaction: counts like count_unit<1> and appends the matching keys (the candidates of pass 2).
template <typename T>
void collect_unit(const T* __restrict__ x, int64_t len, uint32_t prefix, int64_t* __restrict__ local,
                  std::vector<uint32_t>& keys) {
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t k = key_at(x, i);
    if ((k >> 20) == prefix) {
      ++local[(k >> 10) & 1023u];
      keys.push_back(k);
    }
  }
}

// Candidates of one group collected by one thread in pass 1.
struct Segment {
  int64_t group;
  std::vector<uint32_t> keys;
};

// Writes the unit's mask (key > t, ties kept when keep_ties) and returns its number of ties.
template <typename T>
int64_t mask_unit(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t len, uint32_t t, bool keep_ties) {
  int64_t ties = 0;
  if (keep_ties) {
    for (int64_t i = 0; i < len; ++i) {
      const uint32_t k = key_at(x, i);
      out[i] = static_cast<uint8_t>(k >= t);
      ties += k == t;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<uint8_t>(key_at(x, i) > t);
  }
  return ties;
}

// Clears the ties of the unit whose flat tie rank (first = `rank`) is >= `keep`.
template <typename T>
void fix_unit(const T* __restrict__ x, uint8_t* __restrict__ out, int64_t len, uint32_t t, int64_t rank,
              int64_t keep) {
  for (int64_t i = 0; i < len; ++i) {
    if (key_at(x, i) == t) {
      if (rank >= keep) out[i] = 0;
      ++rank;
    }
  }
}

}  // namespace

void check_select(const SelectArgs& a) {
  auto fail = [](const std::string& s) { throw std::invalid_argument("fastopt::magnitude_select: " + s); };
  const size_t n = a.ptrs.size();
  if (a.numels.size() != n || a.dtypes.size() != n || a.groups.size() != n) fail("list lengths differ");
  if (!a.masks.empty() && a.masks.size() != n) fail("one mask per tensor, or none");
  if (n == 0) fail("no tensors");
  if (a.groups[0] != 0) fail("the first group must be 0");
  for (size_t i = 1; i < n; ++i)
    if (a.groups[i] != a.groups[i - 1] && a.groups[i] != a.groups[i - 1] + 1) fail("groups must be 0, 1, ... in order");
  const size_t ngroups = static_cast<size_t>(a.groups[n - 1]) + 1;
  if (a.counts.size() != ngroups) fail("one count per group");
  std::vector<int64_t> sizes(ngroups, 0);
  for (size_t i = 0; i < n; ++i) {
    if (a.numels[i] < 0) fail("negative numel");
    if (a.dtypes[i] != kFloat32 && a.dtypes[i] != kFloat16 && a.dtypes[i] != kBFloat16) fail("unsupported dtype code");
    if (a.numels[i] > 0 && (a.ptrs[i] == 0 || (!a.masks.empty() && a.masks[i] == 0))) fail("null tensor address");
    sizes[a.groups[i]] += a.numels[i];
  }
  for (size_t g = 0; g < ngroups; ++g)
    if (a.counts[g] < 0 || a.counts[g] > sizes[g]) fail("count out of range for group " + std::to_string(g));
  if (a.thresholds == 0) fail("null thresholds");
}

void magnitude_select_cpu(const SelectArgs& a) {
  check_select(a);
  const int64_t n = static_cast<int64_t>(a.ptrs.size());
  const int64_t ngroups = static_cast<int64_t>(a.counts.size());
  std::vector<char> active(ngroups);
  for (int64_t g = 0; g < ngroups; ++g) active[g] = a.counts[g] > 0;
  std::vector<Unit> units;
  int64_t total = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (!active[a.groups[t]] && a.masks.empty()) continue;
    for (int64_t s = 0; s < a.numels[t]; s += kUnit) units.push_back({t, s, std::min(kUnit, a.numels[t] - s)});
    total += a.numels[t];
  }
  const int64_t nunits = static_cast<int64_t>(units.size());
  const bool parallel = total >= kSerialBelow && omp_get_max_threads() > 1;

  std::vector<uint32_t> prefix(ngroups, 0);
  std::vector<int64_t> rank(a.counts.begin(), a.counts.end());  // 1-based rank sought among the candidates
  std::vector<int64_t> ties(ngroups, 0);                        // c: elements equal to the threshold
  std::vector<int64_t> hist(static_cast<size_t>(ngroups) * kBins);
  // Pass 1 collects its matching keys (per thread and group) when there are at most total / 2 of them, and
  // pass 2 then reads those instead of the tensors.
  bool collect = false;
  std::vector<std::vector<Segment>> segments(std::max(omp_get_max_threads(), 1));
  std::vector<const Segment*> all_segments;
  for (int pass = 0; pass < 3; ++pass) {
    std::fill(hist.begin(), hist.end(), 0);
    const int bins = pass == 0 ? kBins : 1024;
    if (pass == 2 && collect)
      for (const auto& per_thread : segments)
        for (const auto& sg : per_thread) all_segments.push_back(&sg);
    const int64_t nsegments = static_cast<int64_t>(all_segments.size());
#pragma omp parallel if (parallel)
    {
      std::vector<uint32_t> sub(kSub * kBins, 0);
      std::vector<int64_t> local(kBins, 0);
      int64_t cur = -1;
      auto flush = [&]() {
        if (cur < 0) return;
        int64_t* h = hist.data() + cur * kBins;
        for (int b = 0; b < bins; ++b) {
          if (local[b]) {
#pragma omp atomic
            h[b] += local[b];
            local[b] = 0;
          }
        }
      };
      if (pass == 2 && collect) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t s = 0; s < nsegments; ++s) {
          const Segment& sg = *all_segments[s];
          if (sg.group != cur) { flush(); cur = sg.group; }
          const uint32_t p = prefix[cur];
          for (const uint32_t k : sg.keys)
            if ((k >> 10) == p) ++local[k & 1023u];
        }
      } else {
#pragma omp for schedule(static)
      for (int64_t u = 0; u < nunits; ++u) {
        const Unit& un = units[u];
        const int64_t g = a.groups[un.tensor];
        if (!active[g]) continue;
        if (g != cur) { flush(); cur = g; }
        if (pass == 1 && collect) {
          auto& mine = segments[omp_get_thread_num()];
          if (mine.empty() || mine.back().group != g) mine.push_back({g, {}});
          FASTOPT_DTYPE_SWITCH(a.dtypes[un.tensor], [&] {
            collect_unit(as_ptr<const scalar_t>(a.ptrs[un.tensor]) + un.start, un.len, prefix[g], local.data(),
                         mine.back().keys);
          });
          continue;
        }
        if (un.len < kSmallUnit) {  // (merging sub-histograms would cost more than the counting)
          FASTOPT_DTYPE_SWITCH(a.dtypes[un.tensor], [&] {
            count_unit<1>(as_ptr<const scalar_t>(a.ptrs[un.tensor]) + un.start, un.len, pass, prefix[g],
                          local.data());
          });
          continue;
        }
        FASTOPT_DTYPE_SWITCH(a.dtypes[un.tensor], [&] {
          count_unit<kSub>(as_ptr<const scalar_t>(a.ptrs[un.tensor]) + un.start, un.len, pass, prefix[g], sub.data());
        });
        for (int b = 0; b < bins; ++b) {
          uint32_t c = 0;
          for (int s = 0; s < kSub; ++s) { c += sub[s * kBins + b]; sub[s * kBins + b] = 0; }
          local[b] += c;
        }
      }
      }
      flush();
    }
    for (int64_t g = 0; g < ngroups; ++g) {
      if (!active[g]) continue;
      const int64_t* h = hist.data() + g * kBins;
      int64_t below = 0;
      int b = 0;
      while (b < bins - 1 && below + h[b] < rank[g]) below += h[b++];
      rank[g] -= below;
      prefix[g] = pass == 0 ? static_cast<uint32_t>(b) : (prefix[g] << 10) | static_cast<uint32_t>(b);
      ties[g] = h[b];
    }
    if (pass == 0) {
      int64_t candidates = 0;
      for (int64_t g = 0; g < ngroups; ++g) candidates += active[g] ? ties[g] : 0;
      collect = candidates <= total / 2;
    }
  }
  float* thr = as_ptr<float>(a.thresholds);
  for (int64_t g = 0; g < ngroups; ++g)
    thr[g] = active[g] ? bits_float(prefix[g]) : -std::numeric_limits<float>::infinity();
  if (a.masks.empty()) return;

  // The mask pass.  Group g: r = rank[g] ties pruned of c = ties[g]; partial when 0 < r < c.
  std::vector<char> partial(ngroups);
  for (int64_t g = 0; g < ngroups; ++g) partial[g] = active[g] && rank[g] < ties[g];
  std::vector<int64_t> unit_ties(nunits, 0);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t u = 0; u < nunits; ++u) {
    const Unit& un = units[u];
    const int64_t g = a.groups[un.tensor];
    uint8_t* out = as_ptr<uint8_t>(a.masks[un.tensor]) + un.start;
    if (!active[g]) {
      std::memset(out, 1, static_cast<size_t>(un.len));
      continue;
    }
    FASTOPT_DTYPE_SWITCH(a.dtypes[un.tensor], [&] {
      unit_ties[u] = mask_unit(as_ptr<const scalar_t>(a.ptrs[un.tensor]) + un.start, out, un.len, prefix[g],
                               partial[g] != 0);
    });
  }
  // Exclusive prefix of the ties per group, in unit (= flat) order; then fix the units past the kept ones.
  std::vector<int64_t> first(nunits, 0), seen(ngroups, 0);
  bool any = false;
  for (int64_t u = 0; u < nunits; ++u) {
    const int64_t g = a.groups[units[u].tensor];
    if (!partial[g]) continue;
    first[u] = seen[g];
    seen[g] += unit_ties[u];
    any = any || first[u] + unit_ties[u] > ties[g] - rank[g];
  }
  if (!any) return;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t u = 0; u < nunits; ++u) {
    const Unit& un = units[u];
    const int64_t g = a.groups[un.tensor];
    const int64_t keep = ties[g] - rank[g];
    if (!partial[g] || unit_ties[u] == 0 || first[u] + unit_ties[u] <= keep) continue;
    FASTOPT_DTYPE_SWITCH(a.dtypes[un.tensor], [&] {
      fix_unit(as_ptr<const scalar_t>(a.ptrs[un.tensor]) + un.start, as_ptr<uint8_t>(a.masks[un.tensor]) + un.start,
               un.len, prefix[g], first[u], keep);
    });
  }
}

}  // namespace fastopt
