// hf_decoder: a whole Mixtral model from a Hugging Face checkpoint directory (config.json plus
// model.safetensors or a sharded model.safetensors.index.json), greedy decoding from a prompt
// of token ids. Weights stay in the mapped files (float or bf16, whichever the checkpoint
// stores; nothing is copied), the KV cache and activations are float.
//
//   hf_decoder [checkpoint_dir] [steps] [token ids, comma separated]
//
// Defaults: the tiny two-shard bf16 checkpoint in tests/fixtures/hf_mixtral_tiny/bf16, 7 steps,
// the prompt of tests/fixtures/decoder_tiny.safetensors (12 token ids). There is no tokenizer
// here: pass ids from the model's own tokenizer, e.g. from Python
//   AutoTokenizer.from_pretrained(dir)("The capital of France is")["input_ids"].
// Prints the generated tokens with, per step, the experts every layer chose for the new token
// and their weights, and the decoding speed. Checks: the last step's logits against one
// prefill of the whole sequence (the KV cache path against the plain causal path), and, on the
// tiny fixture checkpoint, the greedy tokens and logits against the gpt-fast reference run
// stored in decoder_tiny.safetensors. Exits 1 when a check fails.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <switchyard/io/checkpoint.hpp>
#include <switchyard/io/safetensors.hpp>
#include <switchyard/models/mixtral_model.hpp>
#include <vector>

using namespace switchyard;

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::string fixture(const std::string& file) {
  return std::string(SWITCHYARD_FIXTURE_DIR) + "/" + file;
}

// "1,2,3" -> {1, 2, 3}; exits on anything else.
std::vector<std::int64_t> parse_ids(const std::string& text) {
  std::vector<std::int64_t> ids;
  std::size_t pos = 0;
  while (pos < text.size()) {
    std::size_t used = 0;
    try {
      ids.push_back(std::stoll(text.substr(pos), &used));
    } catch (const std::exception&) {
      used = 0;
    }
    pos += used;
    if (used == 0 || (pos < text.size() && text[pos] != ',')) {
      std::fprintf(stderr, "hf_decoder: token ids must be comma separated integers: '%s'\n",
                   text.c_str());
      std::exit(2);
    }
    ++pos;
  }
  return ids;
}

// Experts and weights each layer gave the last traced row: "L0 2:0.61 0:0.39  L1 ...".
std::string routing_line(const models::MixtralTrace& trace) {
  std::string line;
  char buf[32];
  for (std::size_t l = 0; l < trace.layers.size(); ++l) {
    const auto& plan = trace.layers[l].plan;
    const auto idx = plan.expert_indices();
    const auto w = plan.expert_weights();
    const std::int64_t t = idx.extent(0) - 1;
    line += (l ? "  L" : "L") + std::to_string(l);
    for (std::int64_t j = 0; j < idx.extent(1); ++j) {
      std::snprintf(buf, sizeof buf, " %d:%.2f", int(idx(t, j)), double(w(t, j)));
      line += buf;
    }
  }
  return line;
}

// max |a - b| and the fixture's scale max(1, max |b|).
struct Diff {
  double err = 0, scale = 1;
  void add(double a, double b) {
    err = std::max(err, std::abs(a - b));
    scale = std::max(scale, std::abs(b));
  }
};

template <class W>
int run(io::Checkpoint ckpt, std::int64_t steps, std::vector<std::int64_t> prompt,
        bool tiny_fixture) {
  const char* weights = std::is_same_v<W, float> ? "float32" : "bf16";
  const auto t_load = Clock::now();
  models::MixtralModel<W> model(std::move(ckpt), {.max_seq_len = std::int64_t(prompt.size()) +
                                                                 std::max<std::int64_t>(steps, 1)});
  const models::MixtralConfig& c = model.config();
  std::printf(
      "Mixtral: %lld layers, d %lld, %lld heads (%lld KV heads) of %lld, %lld experts "
      "top-%lld, F %lld, vocab %lld; %s weights mapped in %.3f s\n",
      (long long)c.num_hidden_layers, (long long)c.hidden_size, (long long)c.num_attention_heads,
      (long long)c.num_key_value_heads, (long long)c.head_dim, (long long)c.num_local_experts,
      (long long)c.num_experts_per_tok, (long long)c.intermediate_size, (long long)c.vocab_size,
      weights, seconds_since(t_load));
  std::printf("prompt (%zu tokens):", prompt.size());
  for (auto t : prompt) std::printf(" %lld", (long long)t);
  std::printf("\n");

  // Greedy decoding step by step, traced to show the routing; generate() does the same.
  std::vector<std::int64_t> tokens;
  std::vector<Tensor<float>> step_logits;
  models::MixtralTrace trace;
  auto t0 = Clock::now();
  Tensor<float> logits = model.prefill(prompt, &trace);
  const double prefill_s = seconds_since(t0);
  t0 = Clock::now();
  std::printf(
      "step: token in -> greedy token out   [experts:weights each layer chose for the "
      "token in]\n");
  for (std::int64_t s = 0; s < steps; ++s) {
    const std::int64_t in = s == 0 ? prompt.back() : tokens.back();
    tokens.push_back(models::greedy_token(logits.view<1>()));
    std::printf("%4lld: %6lld -> %6lld   [%s]\n", (long long)s, (long long)in,
                (long long)tokens.back(), routing_line(trace).c_str());
    step_logits.push_back(std::move(logits));
    if (s + 1 < steps) logits = model.decode_step(tokens.back(), &trace);
  }
  const double decode_s = seconds_since(t0);
  std::printf("prefill %.1f tokens/s, decode %.1f tokens/s (%d threads)\n",
              double(prompt.size()) / prefill_s, steps > 1 ? double(steps - 1) / decode_s : 0.0,
              num_threads());
  bool ok = true;
  if (steps < 1) return 0;

  // generate() gives the same tokens.
  const std::vector<std::int64_t> again = model.generate(prompt, steps);
  if (again != tokens) {
    std::printf("generate() disagrees with the step-by-step tokens: FAILED\n");
    ok = false;
  }

  // The last step (KV cache, decode kernels) against one prefill of the whole sequence.
  std::vector<std::int64_t> seq = prompt;
  seq.insert(seq.end(), tokens.begin(), tokens.end() - 1);
  const Tensor<float> whole = model.prefill(seq);
  Diff last;
  for (std::int64_t j = 0; j < c.vocab_size; ++j) last.add(step_logits.back()(j), whole(j));
  const bool last_ok = last.err <= 1e-4 * last.scale;
  std::printf(
      "last step vs one prefill of the %zu-token sequence: max |diff| %.2e (tolerance "
      "%.1e): %s\n",
      seq.size(), last.err, 1e-4 * last.scale, last_ok ? "OK" : "FAILED");
  ok = ok && last_ok;
  if (!tiny_fixture) return ok ? 0 : 1;

  // The tiny fixture: greedy tokens and logits of the reference run (bf16w_* for bf16 weights).
  const io::SafeTensors ref = io::SafeTensors::open(fixture("decoder_tiny.safetensors"));
  const std::string pre = std::is_same_v<W, float> ? "" : "bf16w_";
  const Tensor<std::int64_t> next = ref.tensor<std::int64_t>(pre + "next_token");
  const Tensor<float> ref_logits = ref.tensor<float>(pre + "logits");
  const std::int64_t P = std::int64_t(prompt.size());
  const std::int64_t checked = std::min<std::int64_t>(steps, next.numel() - P + 1);
  bool same_tokens = true;
  Diff d;
  for (std::int64_t s = 0; s < checked; ++s) {
    same_tokens = same_tokens && tokens[std::size_t(s)] == next[P - 1 + s];
    for (std::int64_t j = 0; j < c.vocab_size; ++j)
      d.add(step_logits[std::size_t(s)](j), ref_logits(P - 1 + s, j));
  }
  // The bound for hidden states with float weights, 1e-5 relative, holds for the logits
  // of both checkpoints (the fixture README's general rule is 1e-4).
  const bool fixture_ok = same_tokens && d.err <= 1e-5 * d.scale;
  std::printf(
      "%lld greedy tokens %s decoder_tiny's; logits vs %slogits: max |diff| %.2e "
      "(tolerance %.1e): %s\n",
      (long long)checked, same_tokens ? "equal" : "DIFFER from", pre.c_str(), d.err, 1e-5 * d.scale,
      fixture_ok ? "OK" : "FAILED");
  return ok && fixture_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::filesystem::path dir = argc > 1 ? argv[1] : fixture("hf_mixtral_tiny/bf16");
  const std::int64_t steps = argc > 2 ? std::atoll(argv[2]) : 7;
  // The default prompt: the 12 prompt tokens of the reference run.
  std::vector<std::int64_t> prompt;
  if (argc > 3) {
    prompt = parse_ids(argv[3]);
  } else {
    const auto ids = io::SafeTensors::open(fixture("decoder_tiny.safetensors"))
                         .tensor<std::int64_t>("token_ids");
    prompt.assign(ids.begin(), ids.begin() + 12);
  }
  if (steps < 1 || prompt.empty()) {
    std::fprintf(stderr,
                 "usage: hf_decoder [checkpoint_dir] [steps >= 1] [token ids, e.g. 1,415]\n");
    return 2;
  }
  std::error_code ec;
  const auto is = [&](const char* kind) {
    return std::filesystem::equivalent(dir, fixture(std::string("hf_mixtral_tiny/") + kind), ec);
  };
  const bool tiny = argc <= 3 && (is("f32") || is("bf16"));
  try {
    io::Checkpoint ckpt = io::Checkpoint::open(dir);
    // The embedding's dtype decides how the weights are viewed: F32 or BF16 in place.
    const io::DType dt = ckpt.info("model.embed_tokens.weight").dtype;
    std::printf("checkpoint %s (%zu tensors in %zu files)\n", dir.string().c_str(), ckpt.size(),
                ckpt.shard_paths().size());
    if (dt == io::DType::F32) return run<float>(std::move(ckpt), steps, prompt, tiny);
    if (dt == io::DType::BF16) return run<bf16>(std::move(ckpt), steps, prompt, tiny);
    std::fprintf(stderr, "hf_decoder: weights stored as %s; F32 and BF16 are supported\n",
                 std::string(io::dtype_name(dt)).c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "hf_decoder: %s\n", e.what());
  }
  return 1;
}
