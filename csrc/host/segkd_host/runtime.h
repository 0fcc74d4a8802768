// Host execution layer: runs the unchanged CUDA kernels of csrc/ on the CPU, compiled by g++.
//
// Model. A launch runs its blocks one after another (in a seeded random order) on the calling
// thread. Each block runs its threads as cooperative fibers (one stack each; glibc ucontext, or a
// few instructions of its own on x86-64, see "execution contexts"): a
// thread runs until it reaches a barrier (__syncthreads*) or a warp collective (__shfl_*_sync,
// __ballot_sync, __any/__all_sync, __syncwarp, the wmma *_sync calls), then the scheduler resumes
// another runnable thread, picked at random with a seeded generator. So between two sync points
// threads run in a random order, which exposes a missing barrier or a read of another thread's
// result before it is written. A warp collective synchronises only the lanes named in its mask;
// a barrier waits for every thread of the block that has not exited (as on the GPU).
//
// Shared memory. `__shared__` variables are static thread_local storage: one copy per OS thread,
// shared by the fibers of the block that thread runs, and all of them together form this module's
// TLS block, which the layer finds with dl_iterate_phdr. Dynamic shared memory is one heap buffer
// of the launch's size. Both are filled with 0xff bytes (a NaN in fp32, fp16 and bf16; -1 as an
// integer) at every block start, so a read of shared memory no thread wrote shows up in the result.
// The block is saved before a launch and restored after it, for the module's other thread_locals.
//
// Checks that raise like the CUDA runtime (cudaGetLastError after the launch): block and grid
// dimensions, dynamic shared memory above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize
// (48 KiB unless raised) or an attribute above the device's opt-in. Failures inside a kernel
// (deadlock at a barrier or collective, a mask naming a lane that does not exist or has exited,
// misaligned __ldg vector or wmma accesses) end the launch with a sticky error whose text says what
// happened; the next cudaGetLastError returns (and clears) it. A fiber stack overflow hits a guard
// page (a crash, never silent corruption).
//
// Device attributes (SM count, shared memory opt-in, ...) come from a table that tests may
// override (segkd_host::set_attribute) to steer the launchers' plans at small sizes.
//
// Streams: every stream is the host thread; launches and memcpy/memset complete before they return.
#pragma once

#include <link.h>
#include <pthread.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SEGKD_HOST_ASAN 1
#endif

// Everything the layer defines stays private to the library that includes it: two libraries built
// on it (the test module, a mutant) loaded into one process must not share its state.
#pragma GCC visibility push(hidden)

// The kernels take the sm_80 code paths (wmma tiles for half / bfloat16).
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#define SEGKD_HOST_EXECUTION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

using std::isinf;
using std::isnan;

// ---- vector and index types ------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}  // NOLINT
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) int4 { int x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

// ---- runtime types -----------------------------------------------------------------------------
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 4,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
};
using cudaError = cudaError_t;
struct CUstream_st;
using cudaStream_t = CUstream_st*;
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrL2CacheSize = 89,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};
enum cudaMemcpyKind { cudaMemcpyHostToHost = 0, cudaMemcpyHostToDevice = 1, cudaMemcpyDeviceToHost = 2,
                      cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };

constexpr int warpSize = 32;

namespace segkd_host {

// ---- state -------------------------------------------------------------------------------------
enum class ThreadState { Runnable, Barrier, Warp, Done };
enum class WarpOp { None, Shfl, ShflUp, ShflDown, ShflXor, Ballot, Any, All, Sync, Custom };

// ---- execution contexts --------------------------------------------------------------------------
// A fiber switch saves the callee-saved registers on the current stack and swaps stack pointers.
// On x86-64 this is the few instructions below (swapcontext would also save and restore the
// signal mask with a system call on every switch, ten times slower, and a launch switches millions
// of times); elsewhere glibc's makecontext / swapcontext do the same job.
// (-DSEGKD_HOST_UCONTEXT forces the portable path; the layer's tests build both.)
#if defined(__x86_64__) && !defined(SEGKD_HOST_UCONTEXT)
#define SEGKD_HOST_FAST_SWITCH 1
// switch_stacks(&save, to): saves the current context at *save and resumes `to`.
__attribute__((naked, noinline)) inline void switch_stacks(void** /*save*/, void* /*to*/) {
  asm volatile(
      "pushq %rbp\n\t"
      "pushq %rbx\n\t"
      "pushq %r12\n\t"
      "pushq %r13\n\t"
      "pushq %r14\n\t"
      "pushq %r15\n\t"
      "subq $8, %rsp\n\t"
      "stmxcsr (%rsp)\n\t"
      "fnstcw 4(%rsp)\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "ldmxcsr (%rsp)\n\t"
      "fldcw 4(%rsp)\n\t"
      "addq $8, %rsp\n\t"
      "popq %r15\n\t"
      "popq %r14\n\t"
      "popq %r13\n\t"
      "popq %r12\n\t"
      "popq %rbx\n\t"
      "popq %rbp\n\t"
      "ret\n\t");
}
#endif

struct Context {
#ifdef SEGKD_HOST_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// A context that starts entry() on the given stack; entry must never return.
inline void init_context(Context& c, char* stack, size_t size, void (*entry)()) {
#ifdef SEGKD_HOST_ASAN
  // a reused stack still carries the poisoned frames of the fiber that ended on it
  __asan_unpoison_memory_region(stack, size);
#endif
#ifdef SEGKD_HOST_FAST_SWITCH
  auto top = (reinterpret_cast<std::uintptr_t>(stack) + size) & ~static_cast<std::uintptr_t>(15);
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                          // entry's (never used) return address
  *--slot = reinterpret_cast<uint64_t>(entry);          // where the first switch "returns" to
  for (int i = 0; i < 6; ++i) *--slot = 0;              // rbp rbx r12-r15
  *--slot = 0x1f80ull | (0x037full << 32);              // default mxcsr and x87 control word
  c.sp = slot;
#else
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
#endif
}

inline void switch_context(Context& from, Context& to) {
#ifdef SEGKD_HOST_FAST_SWITCH
  switch_stacks(&from.sp, to.sp);
#else
  swapcontext(&from.uc, &to.uc);
#endif
}

struct Fiber;
using CustomCollective = void (*)(Fiber* const* lanes, int count);

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // usable stack (above a guard page)
  size_t stack_size = 0;
  uint3 tid{0, 0, 0};
  int linear = 0, lane = 0, warp = 0;
  ThreadState state = ThreadState::Runnable;
  // barrier / collective payload
  int predicate = 0;
  WarpOp op = WarpOp::None;
  unsigned mask = 0;
  uint64_t value = 0, result = 0;
  int arg = 0, width = 32;
  CustomCollective custom = nullptr;
  void* custom_data = nullptr;
#ifdef SEGKD_HOST_ASAN
  void* fake_stack = nullptr;
#endif
};

struct DeviceProps {
  std::map<int, int> attrs;
  DeviceProps() { reset(); }
  // An sm_90-class device (H100-like figures); tests override entries to force plans.
  void reset() {
    attrs = {{cudaDevAttrMaxThreadsPerBlock, 1024}, {cudaDevAttrMaxBlockDimX, 1024},
             {cudaDevAttrMaxBlockDimY, 1024}, {cudaDevAttrMaxBlockDimZ, 64},
             {cudaDevAttrMaxGridDimX, 2147483647}, {cudaDevAttrMaxGridDimY, 65535},
             {cudaDevAttrMaxGridDimZ, 65535}, {cudaDevAttrMaxSharedMemoryPerBlock, 49152},
             {cudaDevAttrWarpSize, 32}, {cudaDevAttrMultiProcessorCount, 132},
             {cudaDevAttrComputeCapabilityMajor, 9}, {cudaDevAttrComputeCapabilityMinor, 0},
             {cudaDevAttrMaxSharedMemoryPerBlockOptin, 232448},
             {cudaDevAttrL2CacheSize, 50 * 1024 * 1024}};
  }
};

constexpr std::uintptr_t kDynamicSharedAlign = 128;

struct Stats {
  uint64_t launches = 0, blocks = 0, threads = 0, barriers = 0, collectives = 0;
};

// Launch recording (the static report's dry run): with State::record_only set, a launch that
// passes the configuration checks is appended to State::records instead of running. A pointer
// argument is kept with its address and whether the kernel may write through it (a pointer to
// non-const); the report maps each address to the tensor that holds it.
struct PointerArg {
  std::uintptr_t address = 0;
  bool writes = false;
};
struct LaunchRecord {
  std::string name;
  dim3 grid, block;
  size_t smem = 0;
  std::vector<PointerArg> pointers;
};

struct State {
  std::recursive_mutex mutex;
  DeviceProps props;
  int device = 0, device_count = 1;
  uint64_t seed = 0x5e9dull;
  std::mt19937_64 rng{0x5e9dull};
  cudaError_t last_error = cudaSuccess;  // launch-configuration errors (cleared by cudaGetLastError)
  cudaError_t sticky_error = cudaSuccess;  // errors inside a kernel
  std::string error_detail;
  std::map<const void*, int> max_dynamic_smem;  // per kernel
  bool poison = true;
  size_t stack_bytes = 0;
  Stats stats;
  bool record_only = false;
  std::vector<LaunchRecord> records;
  std::vector<PointerArg> pending_pointers;  // the pointer arguments of the launch being made

  // the running block
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  std::vector<int> runnable;
  Fiber* current = nullptr;
  Context scheduler;
  int alive = 0, at_barrier = 0;
  bool failed = false;
  std::string failure;
  std::vector<unsigned char> dynamic_smem;
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
#ifdef SEGKD_HOST_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
};

inline State& state() {
  static State s;
  return s;
}

inline Fiber* self() { return state().current; }

}  // namespace segkd_host

#define threadIdx (::segkd_host::self()->tid)
#define blockIdx (::segkd_host::state().block_idx)
#define blockDim (::segkd_host::state().block)
#define gridDim (::segkd_host::state().grid)


namespace segkd_host {

// ---- fiber switching ---------------------------------------------------------------------------
inline size_t default_stack_bytes() {
#ifdef SEGKD_HOST_ASAN
  return 512 * 1024;  // instrumented frames are larger
#else
  return 128 * 1024;
#endif
}

// Called in a fiber that stopped (waiting, yielding or done): resumes a random runnable thread
// directly, or the scheduler when none is runnable (all done, or a deadlock) or the block failed.
// dying: the caller never resumes.
inline void switch_away(bool dying = false) {
  State& g = state();
  Fiber* from = g.current;
  Context* to = &g.scheduler;
  Fiber* next = nullptr;
  if (!g.failed && !g.runnable.empty()) {
    const size_t pick = static_cast<size_t>(g.rng() % g.runnable.size());
    next = &g.fibers[static_cast<size_t>(g.runnable[pick])];
    g.runnable[pick] = g.runnable.back();
    g.runnable.pop_back();
    if (next == from) return;  // it picked the caller itself: keep running
    to = &next->ctx;
  }
  g.current = next;
#ifdef SEGKD_HOST_ASAN
  if (next != nullptr) __sanitizer_start_switch_fiber(dying ? nullptr : &from->fake_stack, next->stack, next->stack_size);
  else __sanitizer_start_switch_fiber(dying ? nullptr : &from->fake_stack, g.main_stack_bottom, g.main_stack_size);
#else
  (void)dying;
#endif
  switch_context(from->ctx, *to);
  // resumed (only fibers that are not dying get here)
#ifdef SEGKD_HOST_ASAN
  __sanitizer_finish_switch_fiber(from->fake_stack, nullptr, nullptr);
#endif
}

// A failure inside a kernel: the block (and the launch) ends, the message becomes the error text.
[[noreturn]] inline void fail(const std::string& what) {
  State& g = state();
  if (!g.failed) {
    g.failed = true;
    const Fiber* f = g.current;
    g.failure = what;
    if (f != nullptr) {
      char where[160];
      std::snprintf(where, sizeof where, " (block (%u, %u, %u), thread (%u, %u, %u))", g.block_idx.x, g.block_idx.y,
                    g.block_idx.z, f->tid.x, f->tid.y, f->tid.z);
      g.failure += where;
    }
  }
  g.runnable.clear();
  switch_away(true);
  __builtin_unreachable();
}

inline void make_runnable(Fiber& f);

// Every thread waiting at the barrier resumes; each gets the result of its __syncthreads_* variant
// (arg: 0 count, 1 and, 2 or) computed now, before any of them can reach the next barrier.
inline void release_barrier() {
  State& g = state();
  int count = 0, total = 0;
  for (const Fiber& o : g.fibers)
    if (o.state == ThreadState::Barrier) { ++total; count += o.predicate; }
  for (Fiber& o : g.fibers) {
    if (o.state != ThreadState::Barrier) continue;
    o.result = o.arg == 0 ? static_cast<uint64_t>(count) : (o.arg == 1 ? count == total : count > 0);
    make_runnable(o);
  }
  g.at_barrier = 0;
}

inline void fiber_main() {
  State& g = state();
#ifdef SEGKD_HOST_ASAN
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  g.body(g.body_ctx);
  Fiber* f = g.current;
  f->state = ThreadState::Done;
  --g.alive;
  // lanes of its warp waiting in a collective whose mask names this thread would wait forever
  for (int l = 0; l < 32; ++l) {
    const size_t t = static_cast<size_t>(f->warp * 32 + l);
    if (t < g.fibers.size() && g.fibers[t].state == ThreadState::Warp && (g.fibers[t].mask & (1u << f->lane)))
      fail("warp collective: its mask names a lane that has exited");
  }
  // exited threads no longer hold a barrier back
  if (g.alive > 0 && g.at_barrier == g.alive) release_barrier();
  switch_away(true);
  __builtin_unreachable();
}

inline void make_runnable(Fiber& f) {
  f.state = ThreadState::Runnable;
  state().runnable.push_back(f.linear);
}


inline std::string describe_deadlock() {
  State& g = state();
  std::string s = "deadlock: no thread can proceed;";
  int shown = 0;
  for (const Fiber& f : g.fibers) {
    if (f.state == ThreadState::Done || shown >= 6) continue;
    char buf[160];
    if (f.state == ThreadState::Barrier)
      std::snprintf(buf, sizeof buf, " thread %d waits at __syncthreads;", f.linear);
    else
      std::snprintf(buf, sizeof buf, " thread %d (warp %d lane %d) waits in a warp collective, mask %08x;", f.linear,
                    f.warp, f.lane, f.mask);
    s += buf;
    ++shown;
  }
  char tail[96];
  std::snprintf(tail, sizeof tail, " %d threads alive, %d at the barrier", g.alive, g.at_barrier);
  return s + tail;
}

inline void run_block() {
  State& g = state();
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  const size_t stack_bytes = g.stack_bytes ? g.stack_bytes : default_stack_bytes();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (static_cast<int>(g.fibers.size()) < n || (n > 0 && g.fibers[0].stack_size != stack_bytes)) {
    for (Fiber& f : g.fibers) munmap(f.stack - page, f.stack_size + page);
    g.fibers.assign(static_cast<size_t>(n), Fiber{});
    for (Fiber& f : g.fibers) {
      void* mem = mmap(nullptr, stack_bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
      if (mem == MAP_FAILED) throw std::bad_alloc();
      mprotect(mem, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
      f.stack = static_cast<char*>(mem) + page;
      f.stack_size = stack_bytes;
    }
  }
  g.runnable.clear();
  // pooled fibers beyond this block's size take no part (an earlier failed block may have left
  // them waiting)
  for (size_t i = static_cast<size_t>(n); i < g.fibers.size(); ++i) g.fibers[i].state = ThreadState::Done;
  for (int i = 0; i < n; ++i) {
    Fiber& f = g.fibers[static_cast<size_t>(i)];
    f.linear = i;
    f.tid = uint3{static_cast<unsigned>(i) % g.block.x, (static_cast<unsigned>(i) / g.block.x) % g.block.y,
                  static_cast<unsigned>(i) / (g.block.x * g.block.y)};
    f.lane = i % 32;
    f.warp = i / 32;
    f.op = WarpOp::None;
    init_context(f.ctx, f.stack, f.stack_size, fiber_main);
    make_runnable(f);
  }
  g.alive = n;
  g.at_barrier = 0;
  g.failed = false;
#ifdef SEGKD_HOST_ASAN
  {  // the scheduler runs on the calling thread's stack; fibers tell ASan when they switch to it
    pthread_attr_t attr;
    void* addr = nullptr;
    size_t size = 0;
    pthread_getattr_np(pthread_self(), &attr);
    pthread_attr_getstack(&attr, &addr, &size);
    pthread_attr_destroy(&attr);
    g.main_stack_bottom = addr;
    g.main_stack_size = size;
  }
#endif
  while (!g.failed) {
    if (g.runnable.empty()) {
      if (g.alive == 0) break;
      g.current = nullptr;
      g.failed = true;
      g.failure = describe_deadlock();
      break;
    }
    const size_t pick = static_cast<size_t>(g.rng() % g.runnable.size());
    const int next = g.runnable[pick];
    g.runnable[pick] = g.runnable.back();
    g.runnable.pop_back();
    Fiber& f = g.fibers[static_cast<size_t>(next)];
    g.current = &f;
#ifdef SEGKD_HOST_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, f.stack, f.stack_size);
#endif
    switch_context(g.scheduler, f.ctx);  // back here when no thread is runnable or the block failed
#ifdef SEGKD_HOST_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  }
  g.current = nullptr;
}

// ---- barriers ----------------------------------------------------------------------------------
inline int barrier(int predicate, int mode) {  // mode 0: count, 1: and, 2: or
  State& g = state();
  Fiber* f = g.current;
  if (f == nullptr) fail("__syncthreads called outside a kernel");
  ++g.stats.barriers;
  f->predicate = predicate != 0;
  f->arg = mode;
  f->state = ThreadState::Barrier;
  if (++g.at_barrier == g.alive) release_barrier();  // the last one releases every waiting thread
  switch_away();
  return static_cast<int>(f->result);
}

// ---- warp collectives --------------------------------------------------------------------------
inline void check_mask(unsigned mask, const char* what) {
  State& g = state();
  const Fiber* f = g.current;
  if (!(mask & (1u << f->lane))) fail(std::string(what) + ": the calling lane is not in the mask");
  const int n = static_cast<int>(g.fibers.size() > 0 ? g.block.x * g.block.y * g.block.z : 0);
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    const int t = f->warp * 32 + l;
    if (t >= n) fail(std::string(what) + ": the mask names a lane that does not exist in this block");
    if (g.fibers[static_cast<size_t>(t)].state == ThreadState::Done)
      fail(std::string(what) + ": the mask names a lane that has exited");
  }
}

inline uint64_t poison_bits() { return ~0ull; }

// Completes the collective of `mask` once every lane in it waits with the same mask.
inline void try_complete(Fiber* caller) {
  State& g = state();
  Fiber* lanes[32];
  int count = 0;
  const unsigned mask = caller->mask;
  for (int l = 0; l < 32; ++l) {
    if (!(mask & (1u << l))) continue;
    Fiber& o = g.fibers[static_cast<size_t>(caller->warp * 32 + l)];
    if (o.state != ThreadState::Warp || o.mask != mask) return;  // not everyone is there yet
    lanes[count++] = &o;
  }
  for (int i = 0; i < count; ++i)
    if (lanes[i]->op != caller->op || lanes[i]->custom != caller->custom)
      fail("warp collective: lanes of one mask called different collectives");
  ++g.stats.collectives;
  Fiber* by_lane[32] = {};
  for (int i = 0; i < count; ++i) by_lane[lanes[i]->lane] = lanes[i];
  switch (caller->op) {
    case WarpOp::Custom: caller->custom(lanes, count); break;
    case WarpOp::Ballot: case WarpOp::Any: case WarpOp::All: {
      uint64_t bits = 0;
      for (int i = 0; i < count; ++i)
        if (lanes[i]->value) bits |= 1ull << lanes[i]->lane;
      for (int i = 0; i < count; ++i) {
        Fiber* o = lanes[i];
        if (o->op == WarpOp::Ballot) o->result = bits;
        else if (o->op == WarpOp::Any) o->result = bits != 0;
        else o->result = bits == static_cast<uint64_t>(mask);
      }
      break;
    }
    case WarpOp::Sync: break;
    default: {
      for (int i = 0; i < count; ++i) {
        Fiber* o = lanes[i];
        const int w = o->width, lane = o->lane, seg = lane & ~(w - 1);
        int src = lane;
        switch (o->op) {
          case WarpOp::Shfl: src = seg + (o->arg & (w - 1)); break;
          case WarpOp::ShflUp: src = (lane - seg) >= o->arg ? lane - o->arg : lane; break;
          case WarpOp::ShflDown: src = (lane - seg) + o->arg < w ? lane + o->arg : lane; break;
          case WarpOp::ShflXor: src = lane ^ o->arg; if ((src & ~(w - 1)) != seg) src = lane; break;
          default: break;
        }
        // reading a lane outside the mask is undefined on the GPU: make it visible
        o->result = (src >= 0 && src < 32 && by_lane[src] != nullptr) ? by_lane[src]->value : poison_bits();
      }
    }
  }
  for (int i = 0; i < count; ++i) make_runnable(*lanes[i]);
}

inline uint64_t collective(WarpOp op, unsigned mask, uint64_t value, int arg, int width, const char* what,
                           CustomCollective custom = nullptr, void* data = nullptr) {
  Fiber* f = self();
  if (f == nullptr) fail(std::string(what) + " called outside a kernel");
  check_mask(mask, what);
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail(std::string(what) + ": width must be a power of 2 <= 32");
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  f->custom = custom;
  f->custom_data = data;
  f->state = ThreadState::Warp;
  try_complete(f);
  switch_away();
  f->op = WarpOp::None;
  return f->result;
}

template <typename T> inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 64 bits");
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T> inline T from_bits(uint64_t b) {
  T v;
  std::memcpy(&v, &b, sizeof(T));
  return v;
}

// ---- launches ----------------------------------------------------------------------------------
// The thread-local storage block of this module on the calling thread: it holds every __shared__
// variable of every kernel. Touching `anchor` makes the loader allocate the block before it is
// looked up.
struct TlsBlock {
  char* base = nullptr;
  size_t size = 0;
};

inline int find_tls(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<std::pair<std::uintptr_t, TlsBlock>*>(data);
  bool mine = false;
  size_t tls_size = 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const ElfW(Phdr)& ph = info->dlpi_phdr[i];
    if (ph.p_type == PT_LOAD) {
      const std::uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
      if (want->first >= lo && want->first < lo + ph.p_memsz) mine = true;
    }
    if (ph.p_type == PT_TLS) tls_size = ph.p_memsz;
  }
  if (!mine) return 0;
  want->second.base = static_cast<char*>(info->dlpi_tls_data);
  want->second.size = tls_size;
  return 1;
}

inline TlsBlock shared_block() {
  static thread_local char anchor;
  anchor = 0;
  std::pair<std::uintptr_t, TlsBlock> query{reinterpret_cast<std::uintptr_t>(&find_tls), TlsBlock{}};
  dl_iterate_phdr(find_tls, &query);
  return query.second;
}

inline void poison_shared(const TlsBlock& tls) {
  State& g = state();
  if (!g.poison) return;
  if (tls.base != nullptr) std::memset(tls.base, 0xff, tls.size);
  if (!g.dynamic_smem.empty()) std::memset(g.dynamic_smem.data(), 0xff, g.dynamic_smem.size());
}

inline cudaError_t config_error(const char* what) {
  State& g = state();
  g.last_error = cudaErrorInvalidConfiguration;
  g.error_detail = what;
  return g.last_error;
}

inline int attribute(int attr) {
  auto& a = state().props.attrs;
  auto it = a.find(attr);
  return it == a.end() ? 0 : it->second;
}

// Runs body(ctx) as the kernel of every thread of every block.
inline void launch(const void* kernel, const char* name, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                   void* ctx) {
  State& g = state();
  std::lock_guard<std::recursive_mutex> lock(g.mutex);
  if (g.current != nullptr) {
    fail("kernel launch from inside a kernel (dynamic parallelism) is not supported");
  }
  if (g.sticky_error != cudaSuccess) return;  // an earlier kernel failed: nothing else runs
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  std::string why;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) why = "a grid or block dimension is 0";
  else if (threads > static_cast<uint64_t>(attribute(cudaDevAttrMaxThreadsPerBlock))) why = "too many threads per block";
  else if (block.x > static_cast<unsigned>(attribute(cudaDevAttrMaxBlockDimX)) ||
           block.y > static_cast<unsigned>(attribute(cudaDevAttrMaxBlockDimY)) ||
           block.z > static_cast<unsigned>(attribute(cudaDevAttrMaxBlockDimZ))) why = "block dimension above the limit";
  else if (grid.x > static_cast<unsigned>(attribute(cudaDevAttrMaxGridDimX)) ||
           grid.y > static_cast<unsigned>(attribute(cudaDevAttrMaxGridDimY)) ||
           grid.z > static_cast<unsigned>(attribute(cudaDevAttrMaxGridDimZ))) why = "grid dimension above the limit";
  else {
    auto it = g.max_dynamic_smem.find(kernel);
    const int64_t allowed = it == g.max_dynamic_smem.end() ? attribute(cudaDevAttrMaxSharedMemoryPerBlock) : it->second;
    if (static_cast<int64_t>(smem) > allowed)
      why = "dynamic shared memory above the kernel's cudaFuncAttributeMaxDynamicSharedMemorySize";
  }
  if (!why.empty()) {
    config_error((std::string(name) + ": " + why).c_str());
    return;
  }
  ++g.stats.launches;
  if (g.record_only) {
    g.records.push_back(LaunchRecord{name, grid, block, smem, std::move(g.pending_pointers)});
    g.pending_pointers.clear();
    return;
  }
  g.grid = grid;
  g.block = block;
  g.body = body;
  g.body_ctx = ctx;
  // extern __shared__ arrays start on a 128-byte boundary on the GPU (kernels declare __align__(128)
  // and place wmma tiles by it): the same here, whatever the allocator returns
  g.dynamic_smem.assign(smem + (smem ? kDynamicSharedAlign - 1 : 0), 0);
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  // Blocks run in a random order (the GPU gives no order either) unless there are very many.
  std::vector<uint64_t> order;
  if (blocks <= (1u << 20)) {
    order.resize(blocks);
    for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
    std::shuffle(order.begin(), order.end(), g.rng);
  }
  // The TLS block also holds other thread_local variables of the module (pybind11 keeps some):
  // nothing reads them while kernels run, and the whole block is restored after the launch.
  const TlsBlock tls = shared_block();
  std::vector<char> saved_tls;
  if (g.poison && tls.base != nullptr) saved_tls.assign(tls.base, tls.base + tls.size);
  for (uint64_t b = 0; b < blocks; ++b) {
    const uint64_t i = order.empty() ? b : order[b];
    g.block_idx = dim3(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                       static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y)));
    poison_shared(tls);
    run_block();
    ++g.stats.blocks;
    g.stats.threads += threads;
    if (g.failed) {
      g.sticky_error = cudaErrorLaunchFailure;
      g.error_detail = std::string(name) + ": " + g.failure;
      break;
    }
  }
  if (!saved_tls.empty()) std::memcpy(tls.base, saved_tls.data(), saved_tls.size());
  g.dynamic_smem.clear();
  g.dynamic_smem.shrink_to_fit();
}

template <typename V> void note_pointer(std::vector<PointerArg>& out, const V& v) {
  if constexpr (std::is_pointer_v<V>) {
    out.push_back(PointerArg{reinterpret_cast<std::uintptr_t>(v), !std::is_const_v<std::remove_pointer_t<V>>});
  }
}

template <typename... P> struct Launch {
  void (*fn)(P...);
  dim3 grid, block;
  size_t smem;
  const char* name;

  template <typename... A> void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // Arguments are converted to the parameter types once and copied, as a real launch does.
    struct Ctx {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{fn, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(std::forward<A>(a))...)};
    State& g = state();
    g.pending_pointers.clear();
    if (g.record_only) std::apply([&g](const auto&... v) { (note_pointer(g.pending_pointers, v), ...); }, ctx.args);
    launch(reinterpret_cast<const void*>(fn), name, grid, block, smem,
           [](void* c) {
             auto* x = static_cast<Ctx*>(c);
             auto args = x->args;  // each thread gets its own copy of the parameters
             std::apply(x->fn, args);
           },
           &ctx);
  }
};

template <typename... P>
Launch<P...> make_launch(void (*fn)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const char* name) {
  return Launch<P...>{fn, grid, block, smem, name};
}

template <typename T> T* dynamic_shared() {
  State& g = state();
  if (g.dynamic_smem.empty()) return nullptr;
  const auto at = reinterpret_cast<std::uintptr_t>(g.dynamic_smem.data());
  return reinterpret_cast<T*>(at + (kDynamicSharedAlign - at % kDynamicSharedAlign) % kDynamicSharedAlign);
}

// ---- test controls -----------------------------------------------------------------------------
inline void set_seed(uint64_t seed) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  state().seed = seed;
  state().rng.seed(seed);
}
inline void set_attribute(int attr, int value) {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  state().props.attrs[attr] = value;
}
inline void reset_attributes() {
  std::lock_guard<std::recursive_mutex> lock(state().mutex);
  state().props.reset();
  state().max_dynamic_smem.clear();
}

}  // namespace segkd_host

// ---- device functions --------------------------------------------------------------------------
inline void __syncthreads() { segkd_host::barrier(0, 0); }
inline int __syncthreads_count(int p) { return segkd_host::barrier(p, 0); }
inline int __syncthreads_and(int p) { return segkd_host::barrier(p, 1); }
inline int __syncthreads_or(int p) { return segkd_host::barrier(p, 2); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  segkd_host::collective(segkd_host::WarpOp::Sync, mask, 0, 0, 32, "__syncwarp");
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return segkd_host::from_bits<T>(
      segkd_host::collective(segkd_host::WarpOp::Shfl, mask, segkd_host::to_bits(v), src, width, "__shfl_sync"));
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return segkd_host::from_bits<T>(segkd_host::collective(segkd_host::WarpOp::ShflUp, mask, segkd_host::to_bits(v),
                                                         static_cast<int>(delta), width, "__shfl_up_sync"));
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return segkd_host::from_bits<T>(segkd_host::collective(segkd_host::WarpOp::ShflDown, mask, segkd_host::to_bits(v),
                                                         static_cast<int>(delta), width, "__shfl_down_sync"));
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return segkd_host::from_bits<T>(segkd_host::collective(segkd_host::WarpOp::ShflXor, mask, segkd_host::to_bits(v),
                                                         lane_mask, width, "__shfl_xor_sync"));
}
inline unsigned __ballot_sync(unsigned mask, int p) {
  return static_cast<unsigned>(
      segkd_host::collective(segkd_host::WarpOp::Ballot, mask, p != 0, 0, 32, "__ballot_sync"));
}
inline int __any_sync(unsigned mask, int p) {
  return static_cast<int>(segkd_host::collective(segkd_host::WarpOp::Any, mask, p != 0, 0, 32, "__any_sync"));
}
inline int __all_sync(unsigned mask, int p) {
  return static_cast<int>(segkd_host::collective(segkd_host::WarpOp::All, mask, p != 0, 0, 32, "__all_sync"));
}
// The lanes of the caller's warp that have not exited (the emulation keeps a warp converged).
inline unsigned __activemask() {
  auto& g = segkd_host::state();
  const auto* f = g.current;
  const int n = static_cast<int>(g.block.x * g.block.y * g.block.z);
  unsigned m = 0;
  for (int l = 0; l < 32; ++l) {
    const int t = f->warp * 32 + l;
    if (t < n && g.fibers[static_cast<size_t>(t)].state != segkd_host::ThreadState::Done) m |= 1u << l;
  }
  return m;
}

// Single-threaded between sync points: a read-modify-write is atomic.
inline float atomicAdd(float* p, float v) { const float o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { const double o = *p; *p = o + v; return o; }
inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { const unsigned o = *p; *p = o + v; return o; }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  const unsigned long long o = *p; *p = o + v; return o;
}
inline int atomicMax(int* p, int v) { const int o = *p; *p = o > v ? o : v; return o; }
inline int atomicMin(int* p, int v) { const int o = *p; *p = o < v ? o : v; return o; }
inline int atomicCAS(int* p, int cmp, int v) { const int o = *p; if (o == cmp) *p = v; return o; }
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long cmp, unsigned long long v) {
  const unsigned long long o = *p; if (o == cmp) *p = v; return o;
}

// Read-only loads; vector loads must be aligned to their size, as on the GPU.
template <typename T> inline T __ldg(const T* p) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0) segkd_host::fail("__ldg: misaligned address");
  return *p;
}

// Fast-math intrinsics: the host uses the accurate functions (at least as accurate as the GPU's).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }

// ---- runtime API -------------------------------------------------------------------------------
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorMisalignedAddress: return "cudaErrorMisalignedAddress";
  }
  return "cudaErrorUnknown";
}
// The text of the last error, with what the host layer saw (which kernel, which check).
inline const char* cudaGetErrorString(cudaError_t e) {
  auto& g = segkd_host::state();
  static std::string text;  // (not thread_local: the module's TLS block is poisoned during launches)
  text = std::string("host execution layer: ") + (g.error_detail.empty() ? cudaGetErrorName(e) : g.error_detail);
  return text.c_str();
}
inline cudaError_t cudaGetLastError() {
  auto& g = segkd_host::state();
  std::lock_guard<std::recursive_mutex> lock(g.mutex);
  cudaError_t e = g.sticky_error != cudaSuccess ? g.sticky_error : g.last_error;
  g.sticky_error = g.last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() {
  auto& g = segkd_host::state();
  return g.sticky_error != cudaSuccess ? g.sticky_error : g.last_error;
}
inline cudaError_t cudaGetDevice(int* d) { *d = segkd_host::state().device; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int d) {
  auto& g = segkd_host::state();
  if (d < 0 || d >= g.device_count) return cudaErrorInvalidDevice;
  g.device = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDeviceCount(int* n) { *n = segkd_host::state().device_count; return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int device) {
  auto& g = segkd_host::state();
  if (device < 0 || device >= g.device_count) return cudaErrorInvalidDevice;
  std::lock_guard<std::recursive_mutex> lock(g.mutex);
  auto it = g.props.attrs.find(static_cast<int>(attr));
  if (it == g.props.attrs.end()) return cudaErrorInvalidValue;
  *v = it->second;
  return cudaSuccess;
}
template <typename F> inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  auto& g = segkd_host::state();
  std::lock_guard<std::recursive_mutex> lock(g.mutex);
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > segkd_host::attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)) {
      g.error_detail = "cudaFuncSetAttribute: dynamic shared memory above the device's opt-in";
      return cudaErrorInvalidValue;
    }
    g.max_dynamic_smem[reinterpret_cast<const void*>(func)] = value;
  }
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t = nullptr) {
  std::memset(p, v, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemset(void* p, int v, size_t n) { return cudaMemsetAsync(p, v, n); }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind, cudaStream_t = nullptr) {
  std::memmove(d, s, n);
  return cudaSuccess;
}
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) { return cudaMemcpyAsync(d, s, n, k); }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() {
  return segkd_host::state().sticky_error;
}

#pragma GCC visibility pop
