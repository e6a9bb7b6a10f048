// cuda_on_cpu.h -- a small CUDA execution layer on the CPU, so that CI (no GPU) runs fastopt's CUDA
// kernels (csrc/cuda/*.cu) unchanged.  Test-only: the .cu files are compiled a second time as C++
// (g++ -x c++ -DFASTOPT_CUDA_ON_CPU -Icsrc/cuda_on_cpu/include) into a separate module
// (tests/_cuda_on_cpu_build.py); the shipped fastopt._C never sees this file.
//
// Execution model
//  * A launch (FASTOPT_LAUNCH, fastopt/launch.cuh) runs its blocks one after another, in blockIdx order.
//  * The threads of a block are fibers (ucontext, one stack each, a guard page below it), all live at
//    once: every thread keeps its registers and locals across __syncthreads and warp collectives, as
//    on a GPU.  A fiber runs until it reaches a synchronization point (__syncthreads, a __shfl_*_sync /
//    __any_sync) or returns.  The scheduler runs the lowest-numbered warp with runnable threads (lane by
//    lane) until all its threads wait or return, releases the first warp whose 32 lanes wait at a
//    collective, and opens __syncthreads when every live thread waits there; FASTOPT_COC_ORDER=reverse
//    takes the warps from the highest.  So warp 0 runs as far ahead as CUDA allows before warp 1 starts:
//    a missing __syncthreads makes a thread read what another warp has not written yet -- a wrong result
//    every run, not a rare race.
//  * __syncthreads: a barrier of the block's live threads (threads that returned are not waited for, as on
//    sm_70+).  A thread waiting at __syncthreads while another of its warp waits at a warp collective, or
//    a warp collective that a lane has exited, is a deadlock on a GPU: here the launch fails with an error.
//  * Warp collectives run in lockstep: each lane writes its value to the warp's exchange row, the warp
//    waits for all 32 lanes, then each lane reads its source lane (two rows alternate, so the next
//    collective cannot overwrite a value still to be read).  Only full masks (0xffffffff) are supported.
//  * __shared__ variables are static: one copy for the (sequential) blocks of a launch; shared memory
//    is not cleared between blocks (neither is it on a GPU).
//  * atomicAdd: one block's fibers run on one OS thread and switch only at synchronization points, so a
//    read-modify-write is atomic; launches are serialized by a mutex.  __threadfence is a no-op (the blocks
//    run in turn: every write is seen by the blocks after it).
//  * Every launch is counted under its kernel expression's text (`increment_steps_kernel`,
//    `lowbit_kernel<Op, T>`, ...): launch_counts(), exposed to the tests by bindings.cpp.
//  * cudaGetLastError reports an invalid launch configuration (an empty grid, a block of 0 or more than
//    1024 threads) or a failed launch (a deadlock, an unsupported mask), like the runtime does.
//  * Arithmetic: the host branches of the `#if __CUDA_ARCH__` helpers run (fp16 conversions, expf in
//    fastopt/elementwise.h) and g++ contracts no multiply-add (-ffp-contract=off), so the results are
//    those of the cpu backend's formulas, not nvcc's FMA contraction.
#pragma once

#ifndef FASTOPT_CUDA_ON_CPU
#error "cuda_on_cpu.h is for the CUDA-on-CPU test build only (-DFASTOPT_CUDA_ON_CPU)"
#endif

#include <math.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

// ---- keywords ----
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static

// ---- runtime types ----
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 { unsigned int x, y; };
struct alignas(16) uint4 { unsigned int x, y, z, w; };
inline uint2 make_uint2(unsigned int x, unsigned int y) { return uint2{x, y}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return uint4{x, y, z, w}; }

namespace fastopt_coc {

constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 128 * 1024;

enum class State : unsigned char { kRunnable, kAtBlockBarrier, kAtWarpCollective, kDone };

struct Thread {
  dim3 idx;
  int linear = 0;
  State state = State::kDone;
  unsigned int collectives = 0;  // warp collectives done: picks the exchange row
  ucontext_t ctx;
};

struct Exec {
  std::mutex mu;  // one launch at a time
  std::vector<Thread> threads;
  char* stacks = nullptr;
  size_t page = 0;
  ucontext_t sched;
  ucontext_t proto;
  dim3 block_idx, block_dim, grid_dim;
  int nthreads = 0;
  void (*fn)(const void*) = nullptr;
  const void* arg = nullptr;
  uint64_t exchange[kMaxThreads / 32][2][32];
  std::string error;
  bool reverse = false;
};

inline Exec g_exec;
inline std::mutex g_counts_mu;
inline std::map<std::string, long> g_launch_counts;  // kernel expression -> launches

inline void count_launch(const char* name) {
  std::lock_guard<std::mutex> lock(g_counts_mu);
  ++g_launch_counts[name];
}

inline std::map<std::string, long> launch_counts() {
  std::lock_guard<std::mutex> lock(g_counts_mu);
  return g_launch_counts;
}
inline thread_local Thread* g_cur = nullptr;
inline thread_local cudaError_t g_last_error = cudaSuccess;
inline thread_local std::string g_last_message;

// A failure inside a kernel thread (deadlock, unsupported use): recorded; the launch stops after the
// current scheduling round and cudaGetLastError reports it.  The thread never runs again.
inline void fail_here(const std::string& why) {
  Exec& e = g_exec;
  if (e.error.empty()) e.error = why;
  Thread* t = g_cur;
  t->state = State::kDone;
  swapcontext(&t->ctx, &e.sched);
}

inline void yield(State s) {
  Thread* t = g_cur;
  t->state = s;
  swapcontext(&t->ctx, &g_exec.sched);
  g_cur = t;
}

inline void entry() {
  g_exec.fn(g_exec.arg);
  g_cur->state = State::kDone;  // returns to sched through uc_link
}

inline void init_once(Exec& e) {
  if (e.stacks != nullptr) return;
  e.page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t total = kStackBytes * kMaxThreads;
  void* mem = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) std::abort();
  e.stacks = static_cast<char*>(mem);
  for (int i = 0; i < kMaxThreads; ++i) mprotect(e.stacks + i * kStackBytes, e.page, PROT_NONE);  // guard page
  e.threads.resize(kMaxThreads);
  getcontext(&e.proto);
  const char* order = std::getenv("FASTOPT_COC_ORDER");
  e.reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
}

// Runs one block to completion.  Returns false (e.error set) on a deadlock or a failure.
inline bool run_block(Exec& e) {
  const int n = e.nthreads;
  for (int i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.linear = i;
    t.idx = dim3(i % e.block_dim.x, (i / e.block_dim.x) % e.block_dim.y, i / (e.block_dim.x * e.block_dim.y));
    t.state = State::kRunnable;
    t.collectives = 0;
    t.ctx = e.proto;
    t.ctx.uc_stack.ss_sp = e.stacks + i * kStackBytes + e.page;
    t.ctx.uc_stack.ss_size = kStackBytes - e.page;
    t.ctx.uc_link = &e.sched;
    makecontext(&t.ctx, entry, 0);
  }
  const int nwarps = (n + 31) / 32;
  for (;;) {
    // Run the lowest-numbered warp (highest, reversed) that has runnable threads, lane after lane, until
    // each of its threads waits or has returned: a warp runs as far as it can before the next one starts,
    // so a thread reading what another warp writes without a __syncthreads between reads it unwritten.
    bool ran = false;
    for (int wk = 0; wk < nwarps && !ran; ++wk) {
      const int w = e.reverse ? nwarps - 1 - wk : wk;
      const int lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
      for (int k = lo; k < hi; ++k) {
        Thread& t = e.threads[k];
        if (t.state != State::kRunnable) continue;
        ran = true;
        g_cur = &t;
        swapcontext(&e.sched, &t.ctx);
        g_cur = nullptr;
        if (!e.error.empty()) return false;
      }
    }
    if (ran) continue;
    // Everyone is done or waiting.  Release the first warp whose lanes all wait at a collective, else the
    // block barrier when every live thread waits there.
    bool released = false, live = false;
    for (int wk = 0; wk < nwarps; ++wk) {
      const int w = e.reverse ? nwarps - 1 - wk : wk;
      const int lo = w * 32, hi = lo + 32 < n ? lo + 32 : n;
      int at_warp = 0, done = 0;
      for (int i = lo; i < hi; ++i) {
        at_warp += e.threads[i].state == State::kAtWarpCollective;
        done += e.threads[i].state == State::kDone;
      }
      live = live || done < hi - lo;
      if (at_warp == 0 || released) continue;
      if (at_warp == hi - lo) {
        for (int i = lo; i < hi; ++i) e.threads[i].state = State::kRunnable;
        released = true;
      } else if (done > 0) {
        e.error = "a warp collective (full mask) waits for a lane that has exited (warp " + std::to_string(w) + ")";
        return false;
      }
    }
    if (released) continue;
    if (!live) return true;
    bool all_at_barrier = true;
    for (int i = 0; i < n; ++i) {
      const State s = e.threads[i].state;
      all_at_barrier = all_at_barrier && (s == State::kDone || s == State::kAtBlockBarrier);
    }
    if (!all_at_barrier) {
      e.error = "deadlock: threads wait at __syncthreads while others of their warp wait at a warp collective";
      return false;
    }
    for (int i = 0; i < n; ++i) {
      if (e.threads[i].state == State::kAtBlockBarrier) e.threads[i].state = State::kRunnable;
    }
  }
}

inline void set_error(cudaError_t err, const std::string& why) {
  g_last_error = err;
  g_last_message = why;
}

inline void run_grid(dim3 grid, dim3 block, void (*fn)(const void*), const void* arg) {
  const uint64_t nblocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  const uint64_t nthreads = static_cast<uint64_t>(block.x) * block.y * block.z;
  if (nblocks == 0 || nthreads == 0 || nthreads > kMaxThreads || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration, "invalid configuration argument (grid " + std::to_string(nblocks) +
                                                 " blocks of " + std::to_string(nthreads) + " threads)");
    return;
  }
  Exec& e = g_exec;
  std::lock_guard<std::mutex> lock(e.mu);
  init_once(e);
  e.fn = fn;
  e.arg = arg;
  e.grid_dim = grid;
  e.block_dim = block;
  e.nthreads = static_cast<int>(nthreads);
  e.error.clear();
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        e.block_idx = dim3(x, y, z);
        if (!run_block(e)) {
          set_error(cudaErrorLaunchFailure, "unspecified launch failure: " + e.error + " (block " +
                                                std::to_string(x) + ", " + std::to_string(y) + ", " +
                                                std::to_string(z) + ")");
          return;
        }
      }
    }
  }
}

template <typename F>
struct Launch {
  dim3 grid, block;
  F kernel;
  const char* name;
  // The arguments are copied once, as CUDA copies them to the device; every thread calls the kernel
  // with them (by value: each thread gets its own copy of the parameters).
  template <typename... A>
  void operator()(const A&... args) const {
    count_launch(name);
    auto call = [&] { kernel(args...); };
    run_grid(grid, block, [](const void* c) { (*static_cast<const decltype(call)*>(c))(); }, &call);
  }
};

template <typename F>
Launch<F> make_launch(dim3 grid, dim3 block, size_t /*smem*/, cudaStream_t /*stream*/, F kernel, const char* name) {
  return Launch<F>{grid, block, kernel, name};
}

// ---- warp collectives ----
inline uint64_t* exchange(unsigned mask, const void* v, size_t bytes) {
  Thread* t = g_cur;
  if (mask != 0xffffffffu) fail_here("only full-mask warp collectives are supported");
  const int warp = t->linear >> 5, lane = t->linear & 31;
  if ((warp + 1) * 32 > g_exec.nthreads) fail_here("a full-mask warp collective in a partial warp");
  uint64_t* row = g_exec.exchange[warp][t->collectives++ & 1];
  row[lane] = 0;
  std::memcpy(&row[lane], v, bytes);
  yield(State::kAtWarpCollective);
  return row;
}

inline int lane_id() { return g_cur->linear & 31; }

template <typename T>
T shfl_from(unsigned mask, T v, int src, int width) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  const int lane = lane_id();
  const uint64_t* row = exchange(mask, &v, sizeof(T));
  if (src < 0 || src > 31 || src / width != lane / width) return v;
  T r;
  std::memcpy(&r, &row[src], sizeof(T));
  return r;
}

}  // namespace fastopt_coc

// ---- the CUDA names the kernels use ----
#define threadIdx (::fastopt_coc::g_cur->idx)
#define blockIdx (::fastopt_coc::g_exec.block_idx)
#define blockDim (::fastopt_coc::g_exec.block_dim)
#define gridDim (::fastopt_coc::g_exec.grid_dim)

#define FASTOPT_LAUNCH(grid, block, smem, stream, ...) \
  ::fastopt_coc::make_launch(grid, block, smem, stream, [](const auto&... fastopt_coc_a) { __VA_ARGS__(fastopt_coc_a...); }, \
                             #__VA_ARGS__)

inline void __syncthreads() { ::fastopt_coc::yield(::fastopt_coc::State::kAtBlockBarrier); }
inline void __threadfence() {}

template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fastopt_coc::shfl_from(mask, v, ::fastopt_coc::lane_id() + static_cast<int>(delta), width);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fastopt_coc::shfl_from(mask, v, ::fastopt_coc::lane_id() - static_cast<int>(delta), width);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::fastopt_coc::shfl_from(mask, v, ::fastopt_coc::lane_id() ^ lane_mask, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ::fastopt_coc::shfl_from(mask, v, (::fastopt_coc::lane_id() / width) * width + src % width, width);
}
inline int __any_sync(unsigned mask, int pred) {
  const int p = pred != 0;
  const uint64_t* row = ::fastopt_coc::exchange(mask, &p, sizeof(p));
  for (int l = 0; l < 32; ++l) {
    if (static_cast<int>(row[l]) != 0) return 1;
  }
  return 0;
}
inline int __all_sync(unsigned mask, int pred) {
  const int p = pred != 0;
  const uint64_t* row = ::fastopt_coc::exchange(mask, &p, sizeof(p));
  for (int l = 0; l < 32; ++l) {
    if (static_cast<int>(row[l]) == 0) return 0;
  }
  return 1;
}

template <typename T>
T __ldg(const T* p) { return *p; }

inline float atomicAdd(float* addr, float v) {
  const float old = *addr;
  *addr = old + v;
  return old;
}
inline int atomicAdd(int* addr, int v) {
  const int old = *addr;
  *addr = old + v;
  return old;
}

// ---- runtime API on host memory ----
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ::fastopt_coc::g_last_error;
  ::fastopt_coc::g_last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return ::fastopt_coc::g_last_error; }
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e == cudaSuccess) return "no error";
  return ::fastopt_coc::g_last_message.empty() ? "error" : ::fastopt_coc::g_last_message.c_str();
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t = nullptr) {
  std::memset(p, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int /*kind*/, cudaStream_t = nullptr) {
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
