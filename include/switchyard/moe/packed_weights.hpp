#pragma once
// MoEPackedWeights: an MoE layer's expert weights packed once into the GEMM micro-kernel's
// panels (MoELayer::pack_weights), for inference, where weights do not change between calls.
// A prefill forward given them runs its expert GEMMs on the panels directly instead of packing
// (transposing, and widening bf16 / f16) every expert's weights again on every call.
//
// Layout, per expert (routed experts 0..E-1, then shared experts E..E+S-1), for the layer's
// hidden chunks of MoELayer::ff_chunk columns: w1 and w3 [F, d] each as one pack_b_rows pack of
// all F rows (chunk f0 at + f0 * d: panels of NR hidden units, every d), w2 [d, F] as one
// pack_b_rows pack of [d, chunk] per chunk, chunk after chunk (chunk f0 at + round_up(d, NR) *
// f0). The panels hold values in the compute type T.
#include <cstddef>
#include <cstdint>
#include <vector>

#include "switchyard/core/simd/arch.hpp"
#include "switchyard/moe/experts.hpp"

namespace switchyard {
inline namespace v0 {
namespace moe {

template <class T>
struct MoEPackedWeights {
  /// The layer shape and micro-kernel width the panels were packed for (checked by execute).
  std::int64_t d_model = 0, d_ff = 0, shared_d_ff = 0, num_experts = 0, num_shared = 0;
  std::int64_t nr = 0;
  Activation activation = Activation::swiglu;
  /// Every panel, 64-byte aligned; offsets below are element offsets into it.
  std::vector<T, xsimd::aligned_allocator<T, 64>> panels;
  /// Per expert (routed, then shared): where its w1 / w3 / w2 panels start (w3: swiglu only).
  std::vector<std::size_t> w1, w3, w2;
  /// Per expert and projection (w1, w3, w2): the weights the panels were packed from, so
  /// execute can tell packed weights of other weights apart (a pointer compare, not the values).
  std::vector<const void*> source;

  bool empty() const noexcept { return panels.empty(); }
  /// Bytes held.
  std::size_t bytes() const noexcept { return panels.size() * sizeof(T); }
};

}  // namespace moe
}  // namespace v0
}  // namespace switchyard
