// The recurrent modes: the one table that the layer's time loop, the step kernels of every backend and the
// bindings read (fastseq/modes.py is its Python twin; tests/test_rnn_layer.py checks that the two agree).
// A new mode is one entry here and there, and one cell function per backend.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace fastseq {

enum class Mode { kLstm, kPeepholeLstm, kGru, kRnnTanh, kRnnRelu };

struct ModeInfo {
  Mode mode;
  const char* name;
  int64_t gates;     // G: blocks of H rows in W_ih and W_hh (gate order lstm i, f, g, o; gru r, z, n)
  int64_t saved;     // blocks of H in the saved activated gates per row (lstm [i, f, g, o], gru [r, z, n, hn]); 0: none
  bool cell;         // a cell state c besides h (c0, c_n)
  bool peephole;     // a (3, H) peephole weight [p_i; p_f; p_o]
  bool projection;   // accepts w_hr (proj_size)
};

inline constexpr ModeInfo kModes[] = {
    {Mode::kLstm, "lstm", 4, 4, true, false, true},
    {Mode::kPeepholeLstm, "peephole_lstm", 4, 4, true, true, true},
    {Mode::kGru, "gru", 3, 4, false, false, false},
    {Mode::kRnnTanh, "rnn_tanh", 1, 0, false, false, false},
    {Mode::kRnnRelu, "rnn_relu", 1, 0, false, false, false},
};

// The entry of mode `name`; an unknown name is an error of `fn` that lists the modes.
inline const ModeInfo& mode_info(const char* fn, const std::string& name) {
  std::string names;
  for (const ModeInfo& m : kModes) {
    if (name == m.name) return m;
    names += names.empty() ? "'" : ", '";
    names += std::string(m.name) + "'";
  }
  TORCH_CHECK(false, fn, ": expected mode one of ", names, ", got '", name, "'");
}

}  // namespace fastseq
