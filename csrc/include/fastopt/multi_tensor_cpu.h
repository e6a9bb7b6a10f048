// fastopt/multi_tensor_cpu.h -- the generic CPU multi-tensor launcher.
//
// Every tensor of a list is cut into chunks of kChunk elements; OpenMP runs over the chunks of all
// tensors together (static schedule), and `fn(tensor_index, start, length)` does one chunk with a
// plain, vectorizable inner loop.  Small workloads stay on the calling thread.
#pragma once

#include <cstdint>
#include <vector>

namespace fastopt {
namespace cpu {

constexpr int64_t kChunk = 65536;
constexpr int64_t kParallelThreshold = 32768;  // total elements below which one thread does it all

struct Chunk {
  int64_t tensor;
  int64_t start;
  int64_t length;
};

inline std::vector<Chunk> make_chunks(const int64_t* numels, int64_t n, int64_t* total) {
  std::vector<Chunk> chunks;
  *total = 0;
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t s = 0; s < numels[t]; s += kChunk) {
      const int64_t len = numels[t] - s < kChunk ? numels[t] - s : kChunk;
      chunks.push_back({t, s, len});
    }
    *total += numels[t];
  }
  return chunks;
}

template <typename Fn>
void multi_tensor_apply(const int64_t* numels, int64_t n, Fn&& fn) {
  int64_t total = 0;
  const std::vector<Chunk> chunks = make_chunks(numels, n, &total);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (total >= kParallelThreshold && nchunks > 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    fn(chunks[c].tensor, chunks[c].start, chunks[c].length);
  }
}

}  // namespace cpu
}  // namespace fastopt
