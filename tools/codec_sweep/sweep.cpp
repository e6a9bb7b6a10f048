// Exhaustive check of the cpu backend's vector encoders (csrc/cpu/quant_cpu.h): every fp32 pattern in
// [-1, 1] (every stride-th, argv[2]; 1 = all 2,130,706,434) quantized by quantize_block_vec (8 lanes) and,
// where the CPU has AVX-512, quantize_block_512, in blocks holding 1.0 so that the scale is 1, against the
// scalar quantize_code.  Built and run by tools/codec_sweep/run.py (argv[1]: the codebook's .bin file).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include <time.h>
#include "fastopt/quant.h"
#include "quant_cpu.h"
using namespace fastopt;
using namespace fastopt::cpu::FASTOPT_CPU_NS;
static std::vector<int32_t> load_book(const char* name) {
  FILE* f = fopen(name, "rb");
  if (!f) { perror(name); exit(2); } fseek(f, 0, SEEK_END); long sz = ftell(f); fseek(f, 0, SEEK_SET);
  std::vector<int32_t> v(sz / 4); if (fread(v.data(), 4, v.size(), f) != v.size()) exit(1); fclose(f); return v;
}
int main(int argc, char** argv) {
  auto book = load_book(argv[1]);
  const uint64_t stride = argc > 2 ? strtoull(argv[2], 0, 10) : 1;
  CodebookView b = codebook_view(book.data());
  FastBook fb(b);
  const bool four = b.nc == 16;
  const int block = four ? 128 : 256;
  std::vector<float> x(block); std::vector<uint8_t> codes(block), codes2(block);
  fprintf(stderr, "%s: ident %d zero0 %d search4 %d lin16 %d avx512 %d\n", argv[1], fb.ident, fb.zero0, fb.search4, fb.lin16, fb.avx512);
  uint64_t bad = 0, checked = 0;
  for (int sign = 0; sign < 2; ++sign) {
    const uint64_t lo = sign ? 0x80000000ull : 0, hi = sign ? 0xBF800000ull : 0x3F800000ull;
    uint64_t u = lo;
    while (u <= hi) {
      x[0] = 1.0f;
      int k = 1;
      for (; k < block && u <= hi; ++k, u += stride) { uint32_t w = (uint32_t)u; memcpy(&x[k], &w, 4); }
      for (; k < block; ++k) x[k] = 0.5f;
      float am = quantize_block_vec(b, fb, x.data(), block, codes.data());
      float am2 = fb.avx512 ? quantize_block_512(b, fb, x.data(), block, codes2.data()) : am;
      if (!fb.avx512) codes2 = codes;
      if (am != 1.0f || am2 != 1.0f) { printf("absmax %g %g\n", am, am2); return 1; }
      for (int j = 0; j < block; ++j) {
        const int ref = quantize_code(b, x[j]);
        const int got = four ? ((codes[j / 2] >> (4 * (j & 1))) & 0xF) : codes[j];
        const int got2 = four ? ((codes2[j / 2] >> (4 * (j & 1))) & 0xF) : codes2[j];
        ++checked;
        if ((ref != got || ref != got2) && bad++ < 10) printf("%s: x=%a (0x%08x) ref %d avx2 %d avx512 %d\n", argv[1], x[j], *(uint32_t*)&x[j], ref, got, got2);
      }
    }
  }
  printf("%s: %llu values checked (stride %llu), %llu mismatches\n", argv[1], (unsigned long long)checked, (unsigned long long)stride, (unsigned long long)bad);
  return bad != 0;
}
