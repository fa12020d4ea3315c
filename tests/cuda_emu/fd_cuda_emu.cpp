// The emulator's runtime: fibers, barriers, launches (see fd_cuda_emu.h).
#include "fd_cuda_emu.h"

#include <cstdio>
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
.text
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
)");
extern "C" void fd_emu_swap(void** save_sp, void* load_sp);

namespace fd_emu {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr size_t kStack = 256 * 1024;  // per fiber; kernels keep arrays of a few KB
constexpr int kSlot = 64;

enum class State { Ready, Waiting, Done };

struct Fiber {
  void* sp = nullptr;
  std::vector<unsigned char> stack;
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
  std::vector<unsigned char> smem;
  Barrier block_bar;
  int cur = -1;
  int live = 0;
  void* sched_sp = nullptr;
  const std::function<void()>* body = nullptr;
  std::string error;
};

Block* g_block = nullptr;
cudaError_t g_last_error = cudaSuccess;
unsigned long long g_events = 0;  // barrier arrivals, departures and finished threads
unsigned long long g_launches = 0;
unsigned long long g_blocks_run = 0;

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
  }
  Fiber& f = b.fibers[b.cur];
  f.state = State::Done;
  --b.live;
  ++g_events;
  void* dead = nullptr;
  fd_emu_swap(&dead, b.sched_sp);
  std::abort();  // a finished fiber is never resumed
}

void prepare(Fiber& f) {
  if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + kStack) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uintptr_t*>(top);
  *--sp = 0;                                              // fake return address of fiber_main
  *--sp = reinterpret_cast<uintptr_t>(&fiber_main);       // where the first swap returns to
  for (int i = 0; i < 6; ++i) *--sp = 0;                  // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.state = State::Ready;
}

void run_block(Block& b) {
  const int n = (int)b.fibers.size();
  b.live = n;
  for (int i = 0; i < n; ++i) prepare(b.fibers[i]);
  b.block_bar = Barrier{n, 0, 0};
  for (size_t w = 0; w < b.warp_bars.size(); ++w) {
    const int lanes = std::min(32, n - (int)w * 32);
    b.warp_bars[w] = Barrier{lanes, 0, 0};
  }
  std::memset(b.smem.data(), 0xFF, b.smem.size());
  // The order the threads run in between barriers: forward, reverse or shuffled, varying from
  // block to block and launch to launch, so that a missing __syncthreads shows up whichever way
  // round the racing threads are (a reader running before its writer reads poison or stale data).
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = i;
  const unsigned long long kind = (g_launches + g_blocks_run++) % 3;
  if (kind == 1) {
    std::reverse(order.begin(), order.end());
  } else if (kind == 2) {
    unsigned long long st = 0x9E3779B97F4A7C15ull ^ g_blocks_run;
    for (int i = n - 1; i > 0; --i) {
      st = st * 6364136223846793005ull + 1442695040888963407ull;
      std::swap(order[i], order[(int)((st >> 33) % (unsigned long long)(i + 1))]);
    }
  }
  while (b.live > 0) {
    const unsigned long long events = g_events;
    for (int i : order) {
      Fiber& f = b.fibers[i];
      if (f.state == State::Done) continue;
      b.cur = i;
      g_thread_idx = f.tid;
      fd_emu_swap(&b.sched_sp, f.sp);
      if (!b.error.empty()) break;
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

unsigned char* dyn_smem() { return g_block->smem.data(); }

void fail(const char* what) { throw std::runtime_error(std::string("CUDA emulator: ") + what); }

void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
  const int n = (int)(block.x * block.y * block.z);
  Block b;
  b.fibers.resize(n);
  b.warp_bars.resize((n + 31) / 32);
  b.warp_slots.assign(b.warp_bars.size() * 32 * kSlot, 0);
  b.smem.assign(smem ? smem : 1, 0);
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
  static_assert(sizeof(Slot) <= kSlot, "mma slot too large");
  const int lane = lane_id();
  Slot* mine = reinterpret_cast<Slot*>(warp_slot(lane));
  for (int i = 0; i < 4; ++i) mine->a[i] = a[i], mine->c[i] = d[i];
  mine->b[0] = b0;
  mine->b[1] = b1;
  if (warp_barrier()) {
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
