#pragma once
// Umbrella header: everything switchyard offers.
#include "switchyard/config.hpp"
#include "switchyard/version.hpp"

// core: tensors, views, errors, threads, SIMD kernels, GEMM, top-k, random numbers
#include "switchyard/core/eigen_map.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/gemm.hpp"
#include "switchyard/core/parallel_for.hpp"
#include "switchyard/core/rng.hpp"
#include "switchyard/core/simd/arch.hpp"
#include "switchyard/core/simd/exp.hpp"
#include "switchyard/core/simd/online_softmax.hpp"
#include "switchyard/core/simd/softmax.hpp"
#include "switchyard/core/simd/vector_ops.hpp"
#include "switchyard/core/tensor.hpp"
#include "switchyard/core/topk.hpp"
#include "switchyard/core/view.hpp"

// io: checkpoint loading
#include "switchyard/io/safetensors.hpp"

// attention layers
#include "switchyard/attention/bilevel_routing.hpp"
#include "switchyard/attention/bilevel_routing_ref.hpp"
#include "switchyard/attention/dense.hpp"
#include "switchyard/attention/dense_ref.hpp"
#include "switchyard/attention/kv_cache.hpp"
#include "switchyard/attention/kv_eviction.hpp"
#include "switchyard/attention/linear.hpp"
#include "switchyard/attention/linear_ref.hpp"
#include "switchyard/attention/mask.hpp"
#include "switchyard/attention/mixture_of_heads.hpp"
#include "switchyard/attention/plan.hpp"
#include "switchyard/attention/plan_executor.hpp"
#include "switchyard/attention/routing_kmeans.hpp"

// token merging
#include "switchyard/tokens/merge_bipartite.hpp"
#include "switchyard/tokens/merge_energy.hpp"
#include "switchyard/tokens/merge_plan.hpp"
#include "switchyard/tokens/proportional_attention.hpp"
#include "switchyard/tokens/prune_cascade.hpp"

// Mixture of Experts: plan, routers, losses, experts, layer
#include "switchyard/moe/experts.hpp"
#include "switchyard/moe/layer.hpp"
#include "switchyard/moe/losses.hpp"
#include "switchyard/moe/plan.hpp"
#include "switchyard/moe/plan_json.hpp"
#include "switchyard/moe/router.hpp"
#include "switchyard/moe/router_capacity.hpp"
#include "switchyard/moe/router_expert_choice.hpp"
#include "switchyard/moe/router_gshard.hpp"
#include "switchyard/moe/router_hash.hpp"
#include "switchyard/moe/router_noisy_topk.hpp"
#include "switchyard/moe/router_relu.hpp"
#include "switchyard/moe/router_top_p.hpp"
#include "switchyard/moe/router_topk.hpp"
