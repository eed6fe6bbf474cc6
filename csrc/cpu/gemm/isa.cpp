// The one probe of what the GEMMs for few rows can run here: CPUID, the OS's saved state (XCR0) and, for AMX,
// Linux's permission to use the tile data (arch_prctl, asked once). Each answer is computed once per process.
#include "gemm.h"

#if defined(__x86_64__) && (defined(__clang__) || defined(__GNUC__))
#define FB_HAS_CPUID 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#else
#define FB_HAS_CPUID 0
#endif

namespace fastbert {
namespace cpu {
namespace gemm {
namespace {

#if FB_HAS_CPUID
bool avx512_bf16() {
  __builtin_cpu_init();
  return isa_level() == 2 && __builtin_cpu_supports("avx512bf16");
}

bool cpu_lists_amx_bf16() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool amx = (d >> 22 & 1u) && (d >> 24 & 1u);  // AMX-BF16, AMX-TILE
  if (!amx || isa_level() != 2 || !avx512_bf16()) return false;  // the epilogue runs on AVX-512 (BF16)
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  return (xcr0_lo & 0x60000u) == 0x60000u;  // the OS saves the tile config and tile data (XCR0 bits 17, 18)
}

bool os_grants_tiles() {
#if defined(__linux__)
  constexpr int kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
#else
  return false;
#endif
}
#endif

}  // namespace

bool has(Isa isa) {
#if FB_HAS_CPUID
  static const bool avx512 = isa_level() == 2;
  static const bool bf16 = avx512_bf16();
  static const bool amx = cpu_lists_amx_bf16() && os_grants_tiles();
  switch (isa) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx512Bf16: return bf16;
    case Isa::kAmxBf16: return amx;
  }
#endif
  return false;
}

const char* name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "AVX-512";
    case Isa::kAvx512Bf16: return "AVX512-BF16";
    case Isa::kAmxBf16: return "AMX-BF16 (with the OS's tile state)";
  }
  return "an unknown ISA";
}

}  // namespace gemm

bool amx_bf16_usable() { return gemm::has(gemm::Isa::kAmxBf16); }
bool avx512_bf16_usable() { return gemm::has(gemm::Isa::kAvx512Bf16); }
bool avx512_fp32_usable() { return gemm::has(gemm::Isa::kAvx512); }

}  // namespace cpu
}  // namespace fastbert
