#pragma once
// Exceptions thrown at switchyard's public boundary, and the one helper that
// formats their messages so every error reads the same way:
//   Layer::fn: argument 'x' has shape [T=5, D=63]; expected [T, D=64] (why)
#include <cstdint>
#include <initializer_list>
#include <span>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "switchyard/config.hpp"

namespace switchyard {
inline namespace v0 {

/// Base of errors that are not about an argument (I/O, malformed files).
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// A tensor argument has the wrong rank, extents or layout.
class shape_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A configuration value or scalar argument is out of range (k > experts, window 0, NaN...).
class config_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

namespace detail {

/// "[T=5, D=63]" from dimension letters and extents; letters may be fewer than extents.
inline std::string format_shape(std::initializer_list<std::string_view> names,
                                std::span<const std::int64_t> extents) {
  std::ostringstream os;
  os << '[';
  auto name = names.begin();
  for (std::size_t i = 0; i < extents.size(); ++i) {
    if (i) os << ", ";
    if (name != names.end()) os << *name++ << '=';
    os << extents[i];
  }
  os << ']';
  return os.str();
}

inline std::string format_shape(std::span<const std::int64_t> extents) {
  return format_shape({}, extents);
}

/// Throws shape_error: "layer::fn: argument 'arg' has shape GOT; expected EXPECTED (why)".
[[noreturn]] inline void fail_shape(std::string_view layer, std::string_view fn,
                                    std::string_view arg, std::string_view got,
                                    std::string_view expected, std::string_view why = {}) {
  std::ostringstream os;
  os << layer << "::" << fn << ": argument '" << arg << "' has shape " << got << "; expected "
     << expected;
  if (!why.empty()) os << " (" << why << ')';
  throw shape_error(os.str());
}

/// Throws config_error: "layer::fn: argument 'arg' = VALUE is invalid; expected EXPECTED".
template <class V>
[[noreturn]] void fail_config(std::string_view layer, std::string_view fn, std::string_view arg,
                              const V& value, std::string_view expected) {
  std::ostringstream os;
  os << layer << "::" << fn << ": argument '" << arg << "' = " << value << " is invalid; expected "
     << expected;
  throw config_error(os.str());
}

}  // namespace detail
}  // namespace v0
}  // namespace switchyard
