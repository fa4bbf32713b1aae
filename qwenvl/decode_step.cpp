// One Qwen2-VL decode step through every decoder layer in one call: qwen2_vl_fast.FastDecoder's step, composed of the
// kernels of quant_kernels.cpp in the same order on the same values, without a trip through Python and the framework
// between them (28 layers x ~12 ops of ~10-30 us each: ~8 ms of a bf16 2B step). Same kernels, same roundings, so the
// same bits as FastDecoder's own per-op path (tests/test_fast_decode.py).
//
// The plan is an int64 array written by qwen2_vl_fast.DecodePlan: a Header, then one Layer per decoder layer. Tensor
// arguments are addresses (the plan's owner keeps the tensors alive); activations, norm weights and the KV cache are
// all float32, or all bfloat16 (Header.bf16). Per layer, for the B rows of h [B, C] (h: the residual stream, x: its
// RMSNorm, S = slot + 1 cached tokens after this step's):
//     qkv [B, (H + 2 Hk) D] = x @ Wqkv.T + b;  rot [B, H + Hk, D] = rope(q and k)
//     cache[slot] = k, v;  att [B, H D] = attend(q, keys[:S], values[:S])            (float32, rounded to h's dtype)
//     h += att @ Wo.T;  x = post_norm(h)
//     h += down(silu(gate) * up of x @ Wgate_up.T);  x = next_norm(h)   (the next layer's input norm, or the final one)
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_kernels.h"

namespace {

// A linear layer for the decode kernels: y [M, N] = x [M, K] @ W.T + bias. kind: 0 float32 W [N, K], 1 bfloat16 W,
// 2 int8 W with scale [N], 3 int4 codes [N, K/2] with scale / zero [N, K/group]. bias float32 [N] or 0.
struct Linear {
  int64_t kind, w, scale, zero, bias, N, K, group;
};

struct Layer {
  Linear qkv, o, gate_up, down;
  int64_t post_norm, next_norm;          // RMSNorm weights [C] in h's dtype
  int64_t keys, values;                  // this layer's cache [B, Hk, max_len, D], strides in the Header
};

struct Header {
  int64_t B, C, H, Hk, D, layers, bf16;
  int64_t first_norm;                    // layer 0's input RMSNorm weight
  int64_t strides[6];                    // element strides of keys (batch, head, row), then of values
};

static_assert(sizeof(Linear) == 8 * 8 && sizeof(Layer) == 36 * 8 && sizeof(Header) == 14 * 8,
              "qwen2_vl_fast.DecodePlan writes these layouts");

template <typename T> T* at(int64_t address) { return reinterpret_cast<T*>(address); }

void linear(const Linear& l, const void* x, int64_t M, void* y, int bf16, int threads) {
  switch (l.kind) {
    case 0:
    case 1:
      qk_dense(x, M, l.K, at<const void>(l.w), l.kind == 1, at<const float>(l.bias), y, l.N, bf16, threads);
      break;
    case 2:
      qk_int8(x, M, l.K, at<const int8_t>(l.w), at<const float>(l.scale), at<const float>(l.bias), y, l.N, bf16,
              threads);
      break;
    default:
      qk_int4(x, M, l.K, at<const uint8_t>(l.w), at<const float>(l.scale), at<const uint8_t>(l.zero), l.group,
              at<const float>(l.bias), y, l.N, bf16, threads);
  }
}

// Element i of a float32 or bfloat16 buffer as float32 (exact), and back (rounded as torch rounds).
float load(const void* p, int64_t i, int bf16) {
  return bf16 ? qk_from_bf16(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

void store(void* p, int64_t i, float v, int bf16) {
  if (bf16) static_cast<uint16_t*>(p)[i] = qk_to_bf16(v);
  else static_cast<float*>(p)[i] = v;
}

// Buffers of one step, in elements of h's dtype (att32 and q32 float32).
struct Work {
  std::vector<unsigned char> x, qkv, rot, att, delta, gate_up, act;
  std::vector<float> q32, att32;
  Work(const Header& hd, int64_t inter, int64_t es)
      : x(hd.B * hd.C * es), qkv(hd.B * (hd.H + 2 * hd.Hk) * hd.D * es), rot(hd.B * (hd.H + hd.Hk) * hd.D * es),
        att(hd.B * hd.H * hd.D * es), delta(hd.B * hd.C * es), gate_up(hd.B * 2 * inter * es),
        act(hd.B * inter * es), q32(hd.B * hd.H * hd.D), att32(hd.B * hd.H * hd.D) {}
};

// Keys (rotated) and values of this step into slot `slot` of the layer's cache; q as float32 [B, H, D].
void cache_and_query(const Header& hd, const Layer& ly, Work& w, int64_t slot, int64_t es) {
  const int64_t D = hd.D, row = D * es;
  for (int64_t b = 0; b < hd.B; b++) {
    for (int64_t hk = 0; hk < hd.Hk; hk++) {
      const unsigned char* k = w.rot.data() + ((b * (hd.H + hd.Hk) + hd.H + hk) * D) * es;
      const unsigned char* v = w.qkv.data() + ((b * (hd.H + 2 * hd.Hk) + hd.H + hd.Hk + hk) * D) * es;
      const int64_t* ks = hd.strides;
      const int64_t* vs = hd.strides + 3;
      std::memcpy(at<unsigned char>(ly.keys) + (b * ks[0] + hk * ks[1] + slot * ks[2]) * es, k, row);
      std::memcpy(at<unsigned char>(ly.values) + (b * vs[0] + hk * vs[1] + slot * vs[2]) * es, v, row);
    }
    const unsigned char* q = w.rot.data() + b * (hd.H + hd.Hk) * D * es;
    for (int64_t i = 0; i < hd.H * D; i++) w.q32[b * hd.H * D + i] = load(q, i, hd.bf16);
  }
}

}  // namespace

// h [B, C]: the embeddings of this step's tokens, in; the residual stream after the last layer, out. normed [B, C]:
// the final RMSNorm of it (the lm_head's input). cos / ssin [B, D] float32 (qwen2_vl_fast.FastDecoder._rope);
// slot: the cache row this step writes (the cache's length before it); visible [B, slot + 1] uint8 or null (every
// cached token visible). eps: the RMSNorms'; scale: the attention's (1 / sqrt(D), as the caller rounds it).
extern "C" void qk_decode_step(const int64_t* plan, void* h, const float* cos, const float* ssin, int64_t slot,
                               const uint8_t* visible, float eps, float scale, void* normed, int threads) {
  const Header& hd = *reinterpret_cast<const Header*>(plan);
  const Layer* layers = reinterpret_cast<const Layer*>(plan + sizeof(Header) / 8);
  const int64_t B = hd.B, es = hd.bf16 ? 2 : 4, heads_d = hd.H * hd.D;
  Work w(hd, layers[0].gate_up.N / 2, es);
  qk_add_rms_norm(h, nullptr, at<const void>(hd.first_norm), B, hd.C, eps, hd.bf16, w.x.data());
  for (int64_t i = 0; i < hd.layers; i++) {
    const Layer& ly = layers[i];
    const bool last = i + 1 == hd.layers;
    linear(ly.qkv, w.x.data(), B, w.qkv.data(), hd.bf16, threads);
    qk_rope(w.qkv.data(), (hd.H + 2 * hd.Hk) * hd.D, B, hd.H + hd.Hk, hd.D, cos, ssin, hd.bf16, w.rot.data());
    cache_and_query(hd, ly, w, slot, es);
    qk_attend(w.q32.data(), at<const void>(ly.keys), at<const void>(ly.values), hd.bf16, hd.strides, visible, B,
              hd.H, hd.Hk, slot + 1, hd.D, scale, w.att32.data(), threads);
    for (int64_t j = 0; j < B * heads_d; j++) store(w.att.data(), j, w.att32[j], hd.bf16);
    linear(ly.o, w.att.data(), B, w.delta.data(), hd.bf16, threads);
    qk_add_rms_norm(h, w.delta.data(), at<const void>(ly.post_norm), B, hd.C, eps, hd.bf16, w.x.data());
    linear(ly.gate_up, w.x.data(), B, w.gate_up.data(), hd.bf16, threads);
    qk_silu_mul(w.gate_up.data(), B, ly.gate_up.N / 2, hd.bf16, w.act.data());
    linear(ly.down, w.act.data(), B, w.delta.data(), hd.bf16, threads);
    qk_add_rms_norm(h, w.delta.data(), at<const void>(ly.next_norm), B, hd.C, eps, hd.bf16,
                    last ? normed : w.x.data());
  }
}
