// moe_layer: one Mixture-of-Experts layer (512 tokens of width 64, 8 SwiGLU experts of width
// 128) run with eleven routers on the same input. Route, then execute: every router returns a
// DispatchPlan and the same MoELayer executes any of them. Prints per router the experts per
// token, dropped pairs, capacity, the balance loss, the gate mass per token and the output
// norm, then what differs and why, one token's routing, and a short JSON excerpt of a plan;
// writes a bar chart of the tokens each expert received per router (moe_expert_load.png, in
// the directory given as the first argument, else the current directory). The check: every
// plan's layer output equals a naive double computation of the experts; exits 1 otherwise.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>
#include <switchyard/moe/layer.hpp>
#include <switchyard/moe/plan_json.hpp>
#include <switchyard/moe/router_capacity.hpp>
#include <switchyard/moe/router_expert_choice.hpp>
#include <switchyard/moe/router_gshard.hpp>
#include <switchyard/moe/router_hash.hpp>
#include <switchyard/moe/router_noisy_topk.hpp>
#include <switchyard/moe/router_null_experts.hpp>
#include <switchyard/moe/router_relu.hpp>
#include <switchyard/moe/router_top_p.hpp>
#include <switchyard/moe/router_topk.hpp>
#include <vector>

#include "support/draw.hpp"

using namespace switchyard;

namespace {

constexpr std::int64_t T = 512, d = 64, F = 128, E = 8, k = 2, nulls = 4;

struct Run {
  std::string name;
  moe::DispatchPlan<float> plan;
  double uniform_aux;  // the router's aux loss under perfectly even routing (NaN: not a balance
                       // loss); the formulas differ, so each value reads against its own
  core::Tensor<float> y;
};

// "-" for NaN, else the value.
std::string num(double v, const char* format = "%.4g") {
  if (std::isnan(v)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, format, v);
  return buf;
}

// Floats to 4 significant digits, for display (to_json_string keeps full precision).
void round_floats(nlohmann::json& j) {
  if (j.is_number_float()) {
    j = std::stod(num(j.get<double>()));
  } else if (j.is_structured()) {
    for (auto& e : j) round_floats(e);
  }
}

// Prints items separated by ", " in lines of at most 96 columns, each starting with `indent`.
void print_wrapped(const std::vector<std::string>& items, const std::string& indent, bool last) {
  std::string line = indent;
  for (std::size_t i = 0; i < items.size(); ++i) {
    const std::string item = items[i] + (i + 1 < items.size() || !last ? "," : "");
    if (line.size() > indent.size() && line.size() + 1 + item.size() > 96) {
      std::printf("%s\n", line.c_str());
      line = indent;
    }
    line += (line.size() > indent.size() ? " " : "") + item;
  }
  if (line.size() > indent.size()) std::printf("%s\n", line.c_str());
}

// The plan as indented JSON text: short values several to a line, the expert runs and the
// statistics one level deeper. The same document as moe::to_json_string, in a readable order.
void print_plan_json(const moe::DispatchPlan<float>& plan) {
  nlohmann::json j = moe::to_json(plan);
  round_floats(j);
  std::printf("{\n");
  std::vector<std::string> items;
  const char* order[] = {"num_tokens",
                         "num_experts",
                         "top_k",
                         "nnz",
                         "capacity",
                         "requested_capacity",
                         "capacity_clamped",
                         "choice_expert",
                         "choice_weight",
                         "expert_offsets",
                         "dropped",
                         "experts",
                         "stats"};
  for (const char* key : order) {
    const auto& v = j.at(key);
    const std::string quoted = "\"" + std::string(key) + "\": ";
    if (!(v.is_object() || (v.is_array() && !v.empty() && v.front().is_object()))) {
      items.push_back(quoted + v.dump());
      continue;
    }
    print_wrapped(items, "  ", false);
    items.clear();
    std::printf("  %s%c\n", quoted.c_str(), v.is_object() ? '{' : '[');
    std::vector<std::string> inner;
    for (auto it = v.begin(); it != v.end(); ++it)
      inner.push_back(v.is_object() ? "\"" + it.key() + "\": " + it.value().dump() : it->dump());
    print_wrapped(inner, "    ", true);
    std::printf("  %c%s\n", v.is_object() ? '}' : ']', std::string_view(key) == "stats" ? "" : ",");
  }
  std::printf("}\n");
}

// One panel per router: the tokens each expert kept, on a scale shared by all panels, with the
// even split (pairs / E) dashed and the capacity, where there is one, as a solid line.
bool write_load_chart(const std::string& path, const std::vector<Run>& runs) {
  using namespace example;
  const int cols = 4, rows = int(runs.size() + cols - 1) / cols, pw = 236, ph = 170, top = 46;
  std::int64_t most = 1;
  for (const auto& r : runs)
    for (const auto n : r.plan.stats.kept_per_expert) most = std::max(most, n);
  const std::int64_t scale = (most + 49) / 50 * 50;  // round the axis up to a multiple of 50
  Image img(cols * pw + 16, top + rows * ph + 8);
  text(img, 10, 8,
       "moe_layer: tokens kept per expert, " + std::to_string(T) + " tokens, " + std::to_string(E) +
           " experts",
       black, 2);
  text(img, 10, 28,
       "one panel per router; red dashed line: even split (pairs / E); black line: capacity; "
       "axis 0.." +
           std::to_string(scale) + " tokens",
       grey);
  for (std::size_t i = 0; i < runs.size(); ++i) {
    const auto& plan = runs[i].plan;
    const int x0 = 10 + int(i % cols) * pw, y0 = top + int(i / cols) * ph;
    const int bx = x0 + 30, by = y0 + 30, bw = pw - 44, bh = ph - 58;  // bar area
    text(img, x0 + 2, y0 + 4, runs[i].name, black);
    text(img, x0 + 2, y0 + 15, num(plan.mean_experts_per_token(), "%.2f") + " experts/token", grey);
    fill_rect(img, bx, by, bw, bh, Rgb{246, 246, 246});
    text(img, bx - 6 - text_width(std::to_string(scale)), by, std::to_string(scale), grey);
    text(img, bx - 12, by + bh - 7, "0", grey);
    const int slot = bw / int(E);
    for (std::int64_t e = 0; e < E; ++e) {
      const int h =
          int(std::lround(double(plan.stats.kept_per_expert[std::size_t(e)]) / double(scale) * bh));
      fill_rect(img, bx + int(e) * slot + 3, by + bh - h, slot - 6, h, blue);
      text(img, bx + int(e) * slot + slot / 2 - 2, by + bh + 4, std::to_string(e), grey);
    }
    if (plan.capacity >= 0 && plan.capacity <= scale)  // solid line: the capacity
      fill_rect(img, bx, by + bh - int(std::lround(double(plan.capacity) / double(scale) * bh)), bw,
                1, black);
    const double even = double(plan.nnz()) / double(E);
    dashed_hline(img, bx, bx + bw, by + bh - int(std::lround(even / double(scale) * bh)), red);
    outline(img, bx, by, bw, bh, light_grey);
  }
  return write_png(path, img);
}

}  // namespace

int main(int argc, char** argv) {
  core::Tensor<float> x({T, d}), router_w({E + nulls, d}), w1({E, F, d}), w3({E, F, d}),
      w2({E, d, F});
  core::fill_normal(x, /*seed=*/1);
  core::fill_normal(router_w, /*seed=*/2);
  for (auto& v : router_w) v *= 0.15f;  // logits of unit scale, like a trained router's
  for (auto* w : {&w1, &w3, &w2}) {
    core::fill_normal(*w, /*seed=*/3 + (w == &w3) + 2 * (w == &w2));
    for (auto& v : *w) v *= 0.1f;
  }
  // Router logits [T, E] = x router_w^T (nn.Linear layout [out, in]); the null-expert router
  // has 4 more outputs, its null experts (rows E..E+3 of router_w).
  const auto logits_null = moe::router_logits<float>(x, router_w);
  const auto logits = moe::router_logits<float>(x, ConstView<float, 2>(router_w.data(), {E, d}));

  const moe::MoELayer<float> layer({.d_model = d, .d_ff = F, .num_experts = E});
  // No biases and no shared experts: those views stay empty (fields in declaration order).
  const moe::MoELayerWeights<float> weights{
      .experts = {.w1 = w1, .w3 = w3, .w2 = w2, .b1 = {}, .b3 = {}, .b2 = {}}, .shared = {}};

  std::printf(
      "moe_layer: one MoE layer, T %lld tokens of width d %lld, %lld SwiGLU experts of "
      "width %lld,\nrouted by each router below from the same router logits [T, E] "
      "(k = %lld where a router takes k)\n\n",
      (long long)T, (long long)d, (long long)E, (long long)F, (long long)k);

  std::vector<Run> runs;
  const double nan = std::nan("");
  const auto add = [&](const char* name, moe::DispatchPlan<float> plan, double uniform_aux) {
    plan.check();  // no expert over capacity, indices in range, no duplicate pair
    auto y = layer.execute(plan, x, weights);
    runs.push_back({name, std::move(plan), uniform_aux, std::move(y)});
  };
  add("topk (Mixtral)", moe::TopKRouter<float>({.num_experts = E, .top_k = k}).route(logits), 1);
  add("topk (OLMoE)",
      moe::TopKRouter<float>({.num_experts = E, .top_k = k, .renormalize = false}).route(logits),
      1);
  add("switch top-1",
      moe::CapacityRouter<float>({.num_experts = E, .top_k = 1, .capacity_factor = 1.0})
          .route(logits),
      1);
  add("megatron top-2",
      moe::CapacityRouter<float>({.num_experts = E, .top_k = k, .capacity_factor = 1.25})
          .route(logits),
      1);
  add("gshard top-2", moe::GShardTop2Router<float>({.num_experts = E}).route(logits),
      1.0 / double(E * E));
  add("expert choice",
      moe::ExpertChoiceRouter<float>({.num_experts = E, .capacity_factor = 2.0}).route(logits), 0);
  const moe::ReluRouter<float> relu({.num_experts = E, .topk_for_target = k});
  const std::size_t relu_run = runs.size();
  add("relu (ReMoE)", relu.route(logits), nan);
  add("noisy top-k (eval)",
      moe::NoisyTopKRouter<float>({.num_experts = E, .top_k = k}).route(logits), 0);
  add("top-p 0.5", moe::TopPRouter<float>({.num_experts = E, .threshold = 0.5}).route(logits), 1);
  const std::size_t null_run = runs.size();
  add("null experts (AdaMoE)",
      moe::NullExpertRouter<float>({.num_experts = E, .null_experts = nulls, .top_k = k})
          .route(logits_null),
      1);
  std::vector<std::int64_t> token_ids(static_cast<std::size_t>(T));
  for (std::int64_t t = 0; t < T; ++t) token_ids[std::size_t(t)] = (t * 7919) % 32000;
  add("hash", moe::HashRouter<float>({.num_experts = E, .top_k = 1}).route(token_ids), nan);

  std::printf("%-22s %8s %8s %8s %9s %9s %9s %9s %8s\n", "router", "experts", "dropped", "tokens",
              "capacity", "aux loss", "(even", "gate sum", "|y|");
  std::printf("%-22s %8s %8s %8s %9s %9s %9s %9s %8s\n", "", "/token", "pairs", "w/o exp.", "", "",
              "routing)", "/token", "");
  for (const auto& r : runs) {
    const auto& s = r.plan.stats;
    double gate_sum = 0, norm = 0;
    for (const float g : r.plan.gate) gate_sum += g;
    for (const float v : r.y) norm += double(v) * v;
    std::printf("%-22s %8.2f %8lld %8lld %8s%s %9.4f %9s %9.3f %8.2f\n", r.name.c_str(),
                r.plan.mean_experts_per_token(), (long long)s.dropped,
                (long long)s.tokens_without_expert,
                r.plan.capacity < 0 ? "-" : std::to_string(r.plan.capacity).c_str(),
                r.plan.capacity_clamped ? "*" : " ", s.aux_loss, num(r.uniform_aux, "%.4f").c_str(),
                gate_sum / double(s.routed_tokens), std::sqrt(norm));
  }

  const auto& s0 = runs[0].plan.stats;
  const auto& sn = runs[null_run].plan.stats;
  std::printf(
      "\nWhat the columns say:\n"
      "- z-loss %.3f and entropy %.3f nats (uniform: ln %lld = %.3f) are statistics of\n"
      "  softmax(logits), not of the routing decision; every router above sees the same logits,\n"
      "  so they would be the same on every row and are printed once here (null experts: %.3f\n"
      "  and %.3f over its %lld logits; hash routing has no scores).\n"
      "- |y| is the Frobenius norm of the [T, d] output, y[t] = sum of gate * expert(x[t]) over\n"
      "  t's kept experts, so it follows the gate sum: Mixtral renormalises its top-2\n"
      "  probabilities to sum 1; OLMoE and Megatron pick the same experts but keep the raw\n"
      "  probabilities; switch keeps one expert's probability; ReLU gates are relu(logits), not\n"
      "  probabilities.\n"
      "- relu (ReMoE): an expert is active wherever its logit is > 0, about half of 8 zero-mean\n"
      "  logits, so %.1f experts per token where k = %lld (sparsity %.2f, target 1 - k/E = %.2f).\n"
      "  In training, moe::L1Controller raises the L1 coefficient after each step until the\n"
      "  sparsity reaches the target; it has not run here.\n"
      "- aux loss: each router's balance loss with coefficient 1 (stats.aux_loss; NoisyTopK's\n"
      "  loss_coef-scaled value is stats.aux_loss_scaled). The formulas differ, so read each\n"
      "  against its value under even routing; ReLU's is its L1 term, hash has none.\n"
      "- dropped pairs went over an expert's capacity ('*': capacity clamped to the tokens);\n"
      "  tokens w/o exp. kept no expert (capacity, or AdaMoE's two null experts picked): their\n"
      "  output is 0, the residual connection is the caller's.\n",
      s0.z_loss, s0.entropy, (long long)E, std::log(double(E)), sn.z_loss, sn.entropy,
      (long long)(E + nulls), runs[relu_run].plan.mean_experts_per_token(), (long long)k,
      relu.sparsity(runs[relu_run].plan), relu.target_sparsity());

  // One token through three routers, with the router's [T, E] probabilities (scores).
  core::Tensor<float> probs({T, E});
  moe::DispatchPlan<float> mixtral;
  moe::TopKRouter<float>({.num_experts = E, .top_k = k})
      .route(logits, mixtral, {}, probs.view<2>());
  std::printf("\ntoken 0: router probabilities softmax(logits) =");
  for (std::int64_t e = 0; e < E; ++e) std::printf(" %.3f", probs(0, e));
  std::printf("\n");
  for (const std::size_t i : {std::size_t{0}, std::size_t{1}, relu_run}) {
    const auto& plan = runs[i].plan;
    std::printf("  %-15s experts", runs[i].name.c_str());
    for (std::int64_t s = 0; s < plan.top_k; ++s)
      if (plan.expert_kept()(0, s)) std::printf(" %d", plan.expert_indices()(0, s));
    std::printf(", gates");
    for (std::int64_t s = 0; s < plan.top_k; ++s)
      if (plan.expert_kept()(0, s)) std::printf(" %.3f", plan.expert_weights()(0, s));
    std::printf("\n");
  }

  // Padding: the last 100 tokens are masked; they are never routed, output 0, and the
  // statistics and losses cover the 412 real tokens only.
  std::vector<std::uint8_t> keep(static_cast<std::size_t>(T), 1);
  std::fill(keep.end() - 100, keep.end(), std::uint8_t{0});
  const auto padded =
      moe::TopKRouter<float>({.num_experts = E, .top_k = k}).route(logits, moe::TokenMask{keep});
  std::printf("\nwith the last 100 tokens masked as padding: routed %lld tokens, %lld pairs\n",
              (long long)padded.stats.routed_tokens, (long long)padded.nnz());

  // Plans export to JSON for inspection outside C++ (moe::to_json / to_json_string).
  const auto small = moe::TopKRouter<float>({.num_experts = E, .top_k = k})
                         .route(ConstView<float, 2>(logits.data(), {3, E}));
  std::printf("\nthe Mixtral plan of the first 3 tokens as JSON (floats rounded here):\n");
  print_plan_json(small);

  const auto png = example::output_path(argc, argv, "moe_expert_load.png");
  if (!write_load_chart(png.string(), runs)) {
    std::printf("could not write %s\n", png.string().c_str());
    return 1;
  }
  std::printf("\nwrote the per-expert load of every router as a bar chart: %s\n",
              png.string().c_str());

  // The check: y[t] = sum over t's plan entries of gate * w2 (silu(w1 x) * (w3 x)), in double,
  // from each expert's output on each token (computed once for all plans).
  std::vector<double> expert_out(static_cast<std::size_t>(T * E * d));
  std::vector<double> a(static_cast<std::size_t>(F));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t e = 0; e < E; ++e) {
      for (std::int64_t f = 0; f < F; ++f) {
        double g = 0, u = 0;
        for (std::int64_t c = 0; c < d; ++c) {
          g += double(w1(e, f, c)) * x(t, c);
          u += double(w3(e, f, c)) * x(t, c);
        }
        a[std::size_t(f)] = g / (1 + std::exp(-g)) * u;
      }
      for (std::int64_t c = 0; c < d; ++c) {
        double o = 0;
        for (std::int64_t f = 0; f < F; ++f) o += double(w2(e, c, f)) * a[std::size_t(f)];
        expert_out[std::size_t((t * E + e) * d + c)] = o;
      }
    }
  double max_err = 0;
  for (const auto& r : runs) {
    std::vector<double> want(static_cast<std::size_t>(T * d), 0.0);
    for (std::int64_t e = 0; e < E; ++e)
      for (std::int64_t i = r.plan.expert_offsets[std::size_t(e)];
           i < r.plan.expert_offsets[std::size_t(e) + 1]; ++i) {
        const std::int64_t t = r.plan.token_index[std::size_t(i)];
        for (std::int64_t c = 0; c < d; ++c)
          want[std::size_t(t * d + c)] +=
              double(r.plan.gate[std::size_t(i)]) * expert_out[std::size_t((t * E + e) * d + c)];
      }
    for (std::int64_t i = 0; i < T * d; ++i)
      max_err = std::max(max_err, std::abs(double(r.y[i]) - want[std::size_t(i)]));
  }
  const double tolerance = 1e-4;
  const bool ok = max_err <= tolerance;
  std::printf(
      "max error of the layer output vs naive double experts, all %zu plans: %.2g "
      "(tolerance %.0e): %s\n",
      runs.size(), max_err, tolerance, ok ? "OK" : "FAILED");
  return ok ? 0 : 1;
}
