// The cp.async primitives of <cuda_pipeline.h> for the host execution layer:
// __pipeline_memcpy_async, __pipeline_commit, __pipeline_wait_prior.
//
// A copy is not made when it is issued: it joins the thread's open batch, __pipeline_commit closes
// the batch, and __pipeline_wait_prior(n) makes the copies of every committed batch but the newest
// n. So a kernel that reads its destination before waiting reads stale (poisoned) shared memory,
// as it could on a GPU, and fails its tests instead of passing by luck. Size 4, 8 or 16 bytes, both
// pointers aligned to it, zfill (trailing bytes written as zero instead of copied) at most the size,
// as the CUDA documentation requires; a violation fails the launch. Copies still pending when the
// thread's block ends are dropped (a GPU would complete them, but no thread could read them).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "runtime.h"

#pragma GCC visibility push(hidden)

namespace segkd_host {
namespace pipeline {

struct Copy {
  void* dst;
  const void* src;
  size_t bytes, zfill;
};

struct ThreadCopies {
  std::vector<Copy> open;                  // issued since the last commit
  std::vector<std::vector<Copy>> batches;  // committed, oldest first
};

struct Pending {
  std::pair<uint64_t, uint64_t> epoch{~0ull, ~0ull};  // (launch, block) the entries belong to
  std::map<const Fiber*, ThreadCopies> threads;
};

inline ThreadCopies& mine(const char* what) {
  static Pending pending;
  Fiber* f = self();
  if (f == nullptr) fail(std::string(what) + " called outside a kernel");
  const State& g = state();
  const std::pair<uint64_t, uint64_t> now{g.stats.launches, g.stats.blocks};
  if (pending.epoch != now) {  // a new block (or launch): earlier threads' leftovers are dropped
    pending.threads.clear();
    pending.epoch = now;
  }
  return pending.threads[f];
}

inline void perform(const Copy& c) {
  std::memcpy(c.dst, c.src, c.bytes - c.zfill);
  if (c.zfill) std::memset(static_cast<char*>(c.dst) + (c.bytes - c.zfill), 0, c.zfill);
}

}  // namespace pipeline
}  // namespace segkd_host

#pragma GCC visibility pop

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align, size_t zfill = 0) {
  auto& t = segkd_host::pipeline::mine("__pipeline_memcpy_async");
  if (size_and_align != 4 && size_and_align != 8 && size_and_align != 16)
    segkd_host::fail("__pipeline_memcpy_async: size must be 4, 8 or 16 bytes");
  if (reinterpret_cast<std::uintptr_t>(dst) % size_and_align != 0 ||
      reinterpret_cast<std::uintptr_t>(src) % size_and_align != 0)
    segkd_host::fail("__pipeline_memcpy_async: pointer not aligned to the copy size");
  if (zfill > size_and_align) segkd_host::fail("__pipeline_memcpy_async: zfill above the copy size");
  t.open.push_back({dst, src, size_and_align, zfill});
}

inline void __pipeline_commit() {
  auto& t = segkd_host::pipeline::mine("__pipeline_commit");
  t.batches.push_back(std::move(t.open));
  t.open.clear();
}

inline void __pipeline_wait_prior(size_t prior) {
  auto& t = segkd_host::pipeline::mine("__pipeline_wait_prior");
  while (t.batches.size() > prior) {
    for (const auto& c : t.batches.front()) segkd_host::pipeline::perform(c);
    t.batches.erase(t.batches.begin());
  }
}
