// The emulator's runtime: fibers, barriers, launches (see fd_cuda_emu.h).
#include "fd_cuda_emu.h"

#include <cstdio>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's context switch is written for x86-64"
#endif

// fd_emu_swap(&save_sp, load_sp): push the callee-saved registers, store the stack pointer in
// *save_sp, switch to load_sp, pop and return into the other context. MXCSR and the x87 control
// word are shared by every fiber (nobody changes them).
asm(R"(
.pushsection .text
.globl fd_emu_swap
.type fd_emu_swap,@function
fd_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size fd_emu_swap, .-fd_emu_swap
.popsection
)");
extern "C" void fd_emu_swap(void** save_sp, void* load_sp);

namespace fd_emu {

// Emulator state is per OS thread (the bindings release the GIL; fibers never migrate).
thread_local uint3 g_thread_idx;
thread_local uint3 g_block_idx;
thread_local dim3 g_block_dim;
thread_local dim3 g_grid_dim;

namespace {

constexpr size_t kStack = 256 * 1024;  // per fiber; kernels keep arrays of a few KB
constexpr int kSlot = 64;
constexpr size_t kCanary = 64;  // guard bytes after dynamic shared memory

enum class State { Ready, Waiting, Done };

struct Fiber {
  void* sp = nullptr;
  uint3 tid{};
  State state = State::Ready;
  bool at_block_barrier = false;
};

struct Barrier {
  int size = 0;
  int arrived = 0;
  unsigned long long gen = 0;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Barrier> warp_bars;
  std::vector<unsigned char> warp_slots;  // [warps x 32 x kSlot]
  std::vector<unsigned char> smem;        // dynamic shared memory + kCanary guard bytes
  size_t smem_size = 0;
  Barrier block_bar;
  int cur = -1;
  int live = 0;
  void* sched_sp = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
};

thread_local Block* g_block = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
thread_local unsigned long long g_events = 0;  // barrier arrivals, departures, finished threads
thread_local unsigned long long g_launches = 0;
thread_local unsigned long long g_blocks_run = 0;  // also the epoch of static shared memory
thread_local std::vector<std::pair<const void*, unsigned long long>> g_poisoned;

// Fiber stacks: mmap'd once per OS thread and reused, each with a PROT_NONE guard page below it
// (a stack overflow faults instead of corrupting a neighbour).
struct StackPool {
  std::vector<unsigned char*> tops;
  size_t page = 4096;
  unsigned char* top(size_t i) {
    while (tops.size() <= i) {
      page = (size_t)sysconf(_SC_PAGESIZE);
      void* m = mmap(nullptr, kStack + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (m == MAP_FAILED) throw std::runtime_error("CUDA emulator: cannot map a fiber stack");
      mprotect(m, page, PROT_NONE);
      tops.push_back(static_cast<unsigned char*>(m) + page + kStack);
    }
    return tops[i];
  }
  ~StackPool() {
    for (unsigned char* t : tops) munmap(t - kStack - page, kStack + page);
  }
};
thread_local StackPool g_stacks;

int linear_tid(const uint3& t) {
  return (int)(t.x + g_block_dim.x * (t.y + g_block_dim.y * t.z));
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
__attribute__((noinline)) void yield() {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.cur];
  fd_emu_swap(&f.sp, b.sched_sp);
}

// Returns true for the thread whose arrival completes the barrier (it continues at once).
bool wait_at(Barrier& bar, bool block_level) {
  Block& b = *g_block;
  Fiber& f = b.fibers[b.cur];
  const unsigned long long gen = bar.gen;
  ++g_events;
  if (++bar.arrived == bar.size) {
    bar.arrived = 0;
    ++bar.gen;
    return true;
  }
  f.state = State::Waiting;
  f.at_block_barrier = block_level;
  while (bar.gen == gen) yield();
  ++g_events;
  f.state = State::Ready;
  f.at_block_barrier = false;
  return false;
}

[[noreturn]] void fiber_main() {
  Block& b = *g_block;
  try {
    (*b.body)();
  } catch (const std::exception& e) {
    if (b.error.empty()) b.error = e.what();
  } catch (...) {
    if (b.error.empty()) b.error = "a thread threw a non-std exception";
  }
  Fiber& f = b.fibers[b.cur];
  f.state = State::Done;
  --b.live;
  ++g_events;
  void* dead = nullptr;
  fd_emu_swap(&dead, b.sched_sp);
  std::abort();  // a finished fiber is never resumed
}

void prepare(Fiber& f, size_t i) {
  uintptr_t top = reinterpret_cast<uintptr_t>(g_stacks.top(i)) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;                                         // fake return address of fiber_main
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);  // where the first swap returns to
  for (int k = 0; k < 6; ++k) *--sp = 0;             // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.state = State::Ready;
}

// Runs fiber i until it blocks or finishes.
void resume(Block& b, int i) {
  Fiber& f = b.fibers[i];
  if (f.state == State::Done) return;
  b.cur = i;
  g_thread_idx = f.tid;
  fd_emu_swap(&b.sched_sp, f.sp);
}

void run_block(Block& b) {
  const int n = (int)b.fibers.size();
  const int nw = (int)b.warp_bars.size();
  b.live = n;
  for (int i = 0; i < n; ++i) prepare(b.fibers[i], (size_t)i);
  b.block_bar = Barrier{n, 0, 0};
  for (int w = 0; w < nw; ++w) b.warp_bars[w] = Barrier{std::min(32, n - w * 32), 0, 0};
  std::memset(b.smem.data(), 0xFF, b.smem_size);  // shared memory starts as garbage (NaN)
  std::memset(b.smem.data() + b.smem_size, 0xA5, kCanary);
  // The order threads run in between barriers varies from block to block and launch to launch,
  // so that a missing __syncthreads shows up whichever way round the racing threads are (a
  // reader running before its writer reads poison or stale data): threads forward, reverse or
  // shuffled, one step (to the next barrier) each per round; or warp by warp (forward or reverse),
  // each warp run until it blocks at __syncthreads, so that one warp gets ahead of the others
  // across its shuffles and mma.
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const unsigned long long kind = (g_launches + g_blocks_run++) % 5;
  if (kind == 1 || kind == 4) {
    std::reverse(order.begin(), order.end());
  } else if (kind == 2) {
    unsigned long long st = 0x9E3779B97F4A7C15ull ^ g_blocks_run;
    for (int i = n - 1; i > 0; --i) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i], order[(int)((st >> 33) % (unsigned long long)(i + 1))]);
    }
  }
  const bool warp_greedy = kind >= 3;
  while (b.live > 0) {
    const unsigned long long events = g_events;
    if (warp_greedy) {
      for (int k = 0; k < nw && b.error.empty(); ++k) {
        const int w = kind == 3 ? k : nw - 1 - k;
        const int lo = w * 32, hi = std::min(n, lo + 32);
        for (;;) {  // this warp until it stops making progress (blocked at __syncthreads / done)
          const unsigned long long ev = g_events;
          for (int i = lo; i < hi && b.error.empty(); ++i) resume(b, i);
          if (!b.error.empty() || g_events == ev) break;
        }
      }
    } else {
      for (int i : order) {
        resume(b, i);
        if (!b.error.empty()) break;
      }
    }
    if (!b.error.empty()) break;
    if (g_events == events) {
      int at_block = 0, done = n - b.live;
      for (const Fiber& f : b.fibers) at_block += f.at_block_barrier;
      b.error = "deadlock: " + std::to_string(at_block) + " thread(s) wait at __syncthreads, " +
                std::to_string(done) + " finished, " + std::to_string(b.live - at_block) +
                " wait at a warp-collective: a barrier not reached by every thread";
      break;
    }
  }
  if (b.error.empty()) {
    for (size_t k = 0; k < kCanary; ++k) {
      if (b.smem[b.smem_size + k] != 0xA5) {
        b.error = "a write past the end of dynamic shared memory (" +
                  std::to_string(b.smem_size) + " bytes)";
        break;
      }
    }
  }
}

}  // namespace

void block_barrier() { wait_at(g_block->block_bar, true); }

bool warp_barrier() {
  Block& b = *g_block;
  const int w = linear_tid(b.fibers[b.cur].tid) / 32;
  return wait_at(b.warp_bars[w], false);
}

unsigned char* warp_slot(int lane) {
  Block& b = *g_block;
  const int w = linear_tid(b.fibers[b.cur].tid) / 32;
  return b.warp_slots.data() + ((size_t)w * 32 + lane) * kSlot;
}

void check_full_warp(const char* what) {
  Block& b = *g_block;
  const int w = linear_tid(b.fibers[b.cur].tid) / 32;
  if (b.warp_bars[w].size != 32) fail((std::string(what) + " in a partial warp").c_str());
}

unsigned char* dyn_smem() { return g_block->smem.data(); }

void poison_shared(void* p, size_t bytes) {
  for (auto& e : g_poisoned) {
    if (e.first == p) {
      if (e.second != g_blocks_run) {
        e.second = g_blocks_run;
        std::memset(p, 0xFF, bytes);
      }
      return;
    }
  }
  g_poisoned.emplace_back(p, g_blocks_run);
  std::memset(p, 0xFF, bytes);
}

void fail(const char* what) { throw std::runtime_error(std::string("CUDA emulator: ") + what); }

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int n = (int)(block.x * block.y * block.z);
  Block b;
  b.fibers.resize(n);
  b.warp_bars.resize((n + 31) / 32);
  b.warp_slots.assign(b.warp_bars.size() * 32 * kSlot, 0);
  b.smem_size = smem;
  b.smem.assign(smem + kCanary, 0);
  b.body = &body;
  g_grid_dim = grid;
  g_block_dim = block;
  for (int i = 0; i < n; ++i) {
    b.fibers[i].tid = make_uint3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
  }
  Block* prev = g_block;
  g_block = &b;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = make_uint3(x, y, z);
        run_block(b);
        if (!b.error.empty()) {
          g_block = prev;
          throw std::runtime_error("CUDA emulator: block (" + std::to_string(x) + "," +
                                   std::to_string(y) + "," + std::to_string(z) + "): " + b.error);
        }
      }
  g_block = prev;
}

void launch(const std::function<void()>& body, dim3 grid, dim3 block, size_t smem,
            cudaStream_t) {
  const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 ||
      grid.z == 0 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (smem > 48 * 1024) {  // dynamic shared memory beyond 48 KB needs cudaFuncSetAttribute
    g_last_error = cudaErrorInvalidValue;
    return;
  }
  ++g_launches;
  run_grid(grid, block, smem, body);
}

float half_bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}

void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  // Every lane deposits its registers; the lane that completes the barrier (it runs on while
  // the others still wait) computes all 32 lanes' results into their slots; after the second
  // barrier each lane takes its own.
  struct Slot {
    uint32_t a[4], b[2];
    float c[4];
    float d[4];
  };
  static_assert(sizeof(Slot) <= kTagOffset, "mma slot too large");
  check_full_warp("mma.sync");
  const int lane = lane_id();
  const uint32_t tag = bf16 ? 0x3A000002u : 0x3A000001u;
  Slot* mine = reinterpret_cast<Slot*>(warp_slot(lane));
  for (int i = 0; i < 4; ++i) mine->a[i] = a[i], mine->c[i] = d[i];
  mine->b[0] = b0;
  mine->b[1] = b1;
  set_tag(lane, tag);
  if (warp_barrier()) {
    for (int l = 0; l < 32; ++l)
      if (get_tag(l) != tag) fail("mma.sync: lanes of a warp in different collectives");
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
      const Slot* r = reinterpret_cast<const Slot*>(warp_slot(l));
      const int g = l >> 2, t = l & 3;
      for (int reg = 0; reg < 4; ++reg) {
        const int row = g + 8 * (reg & 1), col = 2 * t + 8 * (reg >> 1);
        A[row][col] = half_bits_to_float((uint16_t)(r->a[reg] & 0xFFFFu), bf16);
        A[row][col + 1] = half_bits_to_float((uint16_t)(r->a[reg] >> 16), bf16);
      }
      for (int reg = 0; reg < 2; ++reg) {
        const int k = 2 * t + 8 * reg;
        B[k][g] = half_bits_to_float((uint16_t)(r->b[reg] & 0xFFFFu), bf16);
        B[k + 1][g] = half_bits_to_float((uint16_t)(r->b[reg] >> 16), bf16);
      }
    }
    for (int l = 0; l < 32; ++l) {
      Slot* r = reinterpret_cast<Slot*>(warp_slot(l));
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float acc = r->c[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        r->d[i] = acc;
      }
    }
  }
  warp_barrier();
  for (int i = 0; i < 4; ++i) d[i] = mine->d[i];
}

}  // namespace fd_emu

cudaError_t fd_emu_get_last_error() {
  const cudaError_t e = fd_emu::g_last_error;
  fd_emu::g_last_error = cudaSuccess;
  return e;
}

const char* fd_emu_error_string(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorInvalidValue: return "invalid argument";
    default: return "unknown error";
  }
}

int fd_emu_sm_count() {
  const char* s = std::getenv("FD_EMU_SMS");
  const int v = s ? std::atoi(s) : 2;
  return v > 0 ? v : 1;
}
