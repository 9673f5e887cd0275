/* How many of each AVX-512 instruction the decode kernels use one core issues per nanosecond: twelve
 * independent chains of one instruction (or of two, alternating), so latency does not limit the rate. Set
 * against a kernel's instruction count it says whether the kernel is bound by these pipes.
 *
 *     gcc -O2 -march=native scripts/pipe_throughput.c -o /tmp/pipe_throughput && /tmp/pipe_throughput
 *
 * Needs AVX-512F/BW and AVX512-BF16. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define N 300000000L

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static volatile int sink;  /* the chains' results are used */

#define R12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
/* the chains stay in registers and are not folded away */
#define KEEP __asm__ volatile("" : "+v"(r0), "+v"(r1), "+v"(r2), "+v"(r3), "+v"(r4), "+v"(r5), "+v"(r6), "+v"(r7), \
                                   "+v"(r8), "+v"(r9), "+v"(r10), "+v"(r11))
#define TEST(NAME, OP)                                                                                        \
    {                                                                                                         \
        __m512i r0 = _mm512_set1_epi32(1), r1 = r0, r2 = r0, r3 = r0, r4 = r0, r5 = r0, r6 = r0, r7 = r0,     \
                r8 = r0, r9 = r0, r10 = r0, r11 = r0;                                                         \
        const double t0 = now();                                                                              \
        for (long n = 0; n < N / 12; n++) {                                                                   \
            R12(OP)                                                                                           \
            KEEP;                                                                                             \
        }                                                                                                     \
        const double s = now() - t0;                                                                          \
        sink += _mm512_reduce_add_epi32(_mm512_add_epi32(r0, r11));                                           \
        printf("| %s | %.2f |\n", NAME, N / s / 1e9);                                                        \
    }
#define FMA(i) r##i = (__m512i)_mm512_fmadd_ps((__m512)r##i, x, x);
#define DPBF16(i) r##i = (__m512i)_mm512_dpbf16_ps((__m512)r##i, (__m512bh)y, (__m512bh)y);
#define UNPACK(i) r##i = _mm512_unpacklo_epi32(r##i, y);
#define SHUF128(i) r##i = _mm512_shuffle_i32x4(r##i, y, 0x88);
#define WIDEN(i) r##i = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(r##i));
#define PERMPS(i) r##i = (__m512i)_mm512_permutexvar_ps(y, (__m512)r##i);
#define SHIFT(i) r##i = _mm512_slli_epi32(r##i, 1);
#define ADDPS(i) r##i = (__m512i)_mm512_add_ps((__m512)r##i, x);
#define FMA_UNPACK(i) r##i = (i & 1) ? _mm512_unpacklo_epi32(r##i, y) : (__m512i)_mm512_fmadd_ps((__m512)r##i, x, x);
#define FMA_SHUF128(i) r##i = (i & 1) ? _mm512_shuffle_i32x4(r##i, y, 0x88) : (__m512i)_mm512_fmadd_ps((__m512)r##i, x, x);
#define FMA_WIDEN(i) \
    r##i = (i & 1) ? _mm512_cvtepu16_epi32(_mm512_castsi512_si256(r##i)) : (__m512i)_mm512_fmadd_ps((__m512)r##i, x, x);

int main(void) {
    __m512 x = _mm512_set1_ps(1.0f);
    __m512i y = _mm512_set1_epi32(7);
    __asm__ volatile("" : "+v"(x), "+v"(y));
    printf("| instruction (one core) | per ns |\n|---|---|\n");
    TEST("vfmadd231ps", FMA)
    TEST("vdpbf16ps", DPBF16)
    TEST("vpunpckldq", UNPACK)
    TEST("vshufi32x4", SHUF128)
    TEST("vpmovzxwd", WIDEN)
    TEST("vpermps", PERMPS)
    TEST("vpslld", SHIFT)
    TEST("vaddps", ADDPS)
    TEST("vfmadd231ps + vpunpckldq, alternating", FMA_UNPACK)
    TEST("vfmadd231ps + vshufi32x4, alternating", FMA_SHUF128)
    TEST("vfmadd231ps + vpmovzxwd, alternating", FMA_WIDEN)
    return 0;
}
