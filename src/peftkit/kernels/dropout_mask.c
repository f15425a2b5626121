/* The dropout keep-mask of dropout_mask.py in one pass per call (built by _native.py).
 *
 * Bit-identical to the torch implementation there: element i belongs to group g = i / 4; the
 * group's 64-bit value is SplitMix64 of seed + (g + 1) * golden, and lane j = i % 4 (bits
 * 16j..16j+15, as a signed int16) keeps the element when lane >= dropped - 32768. The packed
 * mask is one byte per group with bit j set for a kept lane j (all four lanes, even past n).
 *
 * Loops run over blocks of BLOCK elements: first the block's 0/1 keep lanes (drawn, or
 * unpacked from the packed mask) into a small stack buffer, then a plain elementwise loop over the block, so that both loops
 * vectorise. bf16 values are widened to float and rounded back to nearest-even as torch does.
 */
#include <stdint.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define BLOCK 2048 /* elements, a multiple of 4 */
/* A nibble times SPREAD, masked by LANES: bit j moved to bit 16j (four 0/1 int16 lanes). */
#define SPREAD (1ULL | (1ULL << 15) | (1ULL << 30) | (1ULL << 45))
#define LANES (1ULL | (1ULL << 16) | (1ULL << 32) | (1ULL << 48))
#define PARALLEL_MIN 65536 /* below this many elements one thread is faster */

static inline uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

static inline float bf16_to_f(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

static inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  uint16_t rounded = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return f != f ? (uint16_t)0x7FC0 : rounded;
}

/* Groups [g0, g0 + count): their nibbles into packed, their 0/1 lanes into keep (four
 * uint16 per group, stored as one 64-bit word through memcpy: no aliasing, one store). */
static inline void draw(uint64_t state, int64_t g0, int64_t count, int16_t threshold,
                        uint8_t *packed, uint16_t *keep) {
  for (int64_t g = 0; g < count; g++) {
    uint64_t z = mix(state + (uint64_t)(g0 + g) * GOLDEN);
    uint64_t nibble = 0;
    for (int j = 0; j < 4; j++)
      nibble |= (uint64_t)((int16_t)(uint16_t)(z >> (16 * j)) >= threshold) << j;
    packed[g] = (uint8_t)nibble;
    uint64_t lanes = (nibble * SPREAD) & LANES;
    memcpy(keep + 4 * g, &lanes, 8);
  }
}

static inline void unpack(const uint8_t *packed, int64_t count, uint16_t *keep) {
  for (int64_t g = 0; g < count; g++) {
    uint64_t lanes = ((uint64_t)packed[g] * SPREAD) & LANES;
    memcpy(keep + 4 * g, &lanes, 8);
  }
}

/* For each block [b0, b0 + len) of n elements, with `keep` (0/1 uint16 per element of the
 * block) filled by FILL, run the body (the rest of the arguments). */
#define FOR_BLOCKS(n, threads, FILL, ...)                                         \
  _Pragma("omp parallel for num_threads(threads) schedule(static) if(n >= PARALLEL_MIN)") \
  for (int64_t b0 = 0; b0 < n; b0 += BLOCK) {                                     \
    int64_t len = n - b0 < BLOCK ? n - b0 : BLOCK;                                \
    int64_t groups = (len + 3) / 4;                                               \
    uint16_t keep[BLOCK];                                                         \
    FILL;                                                                         \
    __VA_ARGS__                                                                   \
  }

/* xk = x * keep for a new mask of (seed, dropped); packed gets the mask. */
void draw_apply_f32(const float *x, float *xk, uint8_t *packed, int64_t n, uint64_t seed,
                    int32_t dropped, int threads) {
  const int16_t threshold = (int16_t)(dropped - 32768);
  const uint64_t state = seed + GOLDEN;
  FOR_BLOCKS(n, threads, draw(state, b0 / 4, groups, threshold, packed + b0 / 4, keep), {
    for (int64_t i = 0; i < len; i++) xk[b0 + i] = x[b0 + i] * (float)keep[i];
  })
}

void draw_apply_bf16(const uint16_t *x, uint16_t *xk, uint8_t *packed, int64_t n, uint64_t seed,
                     int32_t dropped, int threads) {
  const int16_t threshold = (int16_t)(dropped - 32768);
  const uint64_t state = seed + GOLDEN;
  FOR_BLOCKS(n, threads, draw(state, b0 / 4, groups, threshold, packed + b0 / 4, keep), {
    for (int64_t i = 0; i < len; i++) xk[b0 + i] = f_to_bf16(bf16_to_f(x[b0 + i]) * (float)keep[i]);
  })
}

/* out = x * keep for a packed mask. */
void apply_f32(const float *x, const uint8_t *packed, float *out, int64_t n, int threads) {
  FOR_BLOCKS(n, threads, unpack(packed + b0 / 4, groups, keep), {
    for (int64_t i = 0; i < len; i++) out[b0 + i] = x[b0 + i] * (float)keep[i];
  })
}

void apply_bf16(const uint16_t *x, const uint8_t *packed, uint16_t *out, int64_t n, int threads) {
  FOR_BLOCKS(n, threads, unpack(packed + b0 / 4, groups, keep), {
    for (int64_t i = 0; i < len; i++) out[b0 + i] = f_to_bf16(bf16_to_f(x[b0 + i]) * (float)keep[i]);
  })
}

/* acc += t * keep for a packed mask (one rounding, as torch's addcmul_). */
void add_f32(float *acc, const float *t, const uint8_t *packed, int64_t n, int threads) {
  FOR_BLOCKS(n, threads, unpack(packed + b0 / 4, groups, keep), {
    for (int64_t i = 0; i < len; i++) acc[b0 + i] = acc[b0 + i] + t[b0 + i] * (float)keep[i];
  })
}

void add_bf16(uint16_t *acc, const uint16_t *t, const uint8_t *packed, int64_t n, int threads) {
  FOR_BLOCKS(n, threads, unpack(packed + b0 / 4, groups, keep), {
    for (int64_t i = 0; i < len; i++)
      acc[b0 + i] = f_to_bf16(bf16_to_f(acc[b0 + i]) + bf16_to_f(t[b0 + i]) * (float)keep[i]);
  })
}
