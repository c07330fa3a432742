// Work sharing for the native CPU kernels (cpu_qmatmul.cc, cpu_attention.cc) on XLA's intra-op thread pool.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace jaxserve {

// Runs fn(i) for i in [0, n) on the caller and up to `threads - 1` pool tasks; returns when all are done.
// Items are claimed through an atomic counter, so uneven items balance themselves.
inline void parallel_for(xla::ffi::ThreadPool& pool, int64_t n, const std::function<void(int64_t)>& fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::function<void(int64_t)> fn;
    int64_t n;
  };
  auto state = std::make_shared<State>();
  state->fn = fn;
  state->n = n;
  auto work = [](State& s) {
    for (int64_t i; (i = s.next.fetch_add(1)) < s.n;) {
      s.fn(i);
      s.done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([state, work] { work(*state); });
  work(*state);
  // NOTE: only items a started task claimed are outstanding, so this wait ends even if no task ever starts.
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
    if (spins < 4096) _mm_pause(); else std::this_thread::yield();
  }
}

}  // namespace jaxserve
