// The lnlm_ssm operator library: every op's schema, defined once, and the
// Python module object of the extension `lnlm_ssm._C`.
//
// Kernels register against these schemas elsewhere with
// TORCH_LIBRARY_IMPL(lnlm_ssm, CPU, m) (csrc/cpu/*.cpp) or
// TORCH_LIBRARY_IMPL(lnlm_ssm, CUDA, m) (the `lnlm_ssm._cuda` extension, which
// must be loaded after this one). The fake (meta) implementations that
// torch.compile traces with are registered in lnlm_ssm/ops/_library.py.

#include <Python.h>

#include <torch/library.h>

TORCH_LIBRARY(lnlm_ssm, m) {
  // One decoding step of the selective SSM (Mamba-1 and Mamba-2), in the
  // canonical layout of lnlm_ssm/ops/state_update/shapes.py:
  //   state (b,h,p,n) updated in place; x, dt, z (b,h,p); A (h,p,n);
  //   B, C (b,g,n); D, dt_bias (h,p). Returns y (b,h,p) in x's dtype.
  // With state_batch_indices (b,), state is a pool (slots,h,p,n): row b steps
  // slot state_batch_indices[b], or is padding (y = 0) where that is negative.
  m.def(
      "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, "
      "Tensor? D, Tensor? z, Tensor? dt_bias, bool dt_softplus, Tensor? state_batch_indices=None) -> Tensor");

  // The Mamba-1 selective scan (csrc/cpu/selective_scan.cpp has the layout).
  // checkpoints: the state entering every `checkpoint_every` steps, for the
  // backward (empty when checkpoint_every is 0).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
      "Tensor? delta_bias, Tensor? initial_state, bool delta_softplus, int checkpoint_every) "
      "-> (Tensor out, Tensor last_state, Tensor checkpoints)");
  // Gradients of absent optional inputs come back as empty tensors.
  m.def(
      "selective_scan_bwd(Tensor grad_out, Tensor? grad_last_state, Tensor u, Tensor delta, Tensor A, Tensor B, "
      "Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, Tensor checkpoints, bool delta_softplus, "
      "int checkpoint_every) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, "
      "Tensor ddelta_bias, Tensor dinitial_state)");

  // x (m, k) @ weight (n, k)^T (+ bias) for m <= 16 rows: a decode step's projections (csrc/cpu/linear.cpp).
  m.def("decode_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  // The same for weight-only quantised weights: int8 weight (n, k) with an fp32 scale (n,) per row, or
  // bf16 weight (n, k) and no scale; x, bias and the result fp32.
  m.def("weight_only_linear(Tensor x, Tensor weight, Tensor? scale, Tensor? bias) -> Tensor");

  // One decode step of a whole block (csrc/cpu/block_step.cpp has the layout): the norm
  // of hidden_states + residual, then the mixer or MLP, states updated in place.
  // Returns (out, new_residual), both (batch, d_model). Every block's projections may be weight-only
  // quantised as weight_only_linear's are (the scales of int8 weights last; None otherwise).
  m.def(
      "mamba_block_step(Tensor hidden_states, Tensor? residual, Tensor norm_weight, Tensor? norm_bias, "
      "float norm_eps, bool rms_norm, Tensor in_proj_weight, Tensor? in_proj_bias, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor(a!) conv_state, Tensor x_proj_weight, Tensor dt_proj_weight, Tensor dt_proj_bias, "
      "Tensor A, Tensor D, Tensor(b!) ssm_state, Tensor out_proj_weight, Tensor? out_proj_bias, "
      "Tensor? in_proj_scale=None, Tensor? x_proj_scale=None, Tensor? dt_proj_scale=None, "
      "Tensor? out_proj_scale=None) -> (Tensor, Tensor)");
  m.def(
      "mamba2_block_step(Tensor hidden_states, Tensor? residual, Tensor norm_weight, Tensor? norm_bias, "
      "float norm_eps, bool rms_norm, Tensor in_proj_weight, Tensor? in_proj_bias, Tensor conv_weight, "
      "Tensor? conv_bias, Tensor(a!) conv_state, Tensor dt_bias, Tensor A, Tensor D, Tensor(b!) ssm_state, "
      "float dt_min, float dt_max, Tensor? gate_norm_weight, float gate_norm_eps, int gate_norm_group_size, "
      "bool norm_before_gate, Tensor out_proj_weight, Tensor? out_proj_bias, Tensor? in_proj_scale=None, "
      "Tensor? out_proj_scale=None) -> (Tensor, Tensor)");
  m.def(
      "mlp_block_step(Tensor hidden_states, Tensor residual, Tensor norm_weight, Tensor? norm_bias, "
      "float norm_eps, bool rms_norm, Tensor fc1_weight, Tensor? fc1_bias, Tensor fc2_weight, Tensor? fc2_bias, "
      "Tensor? fc1_scale=None, Tensor? fc2_scale=None) -> (Tensor, Tensor)");
  // past: the cache slot of the new position; positions (batch,): its rotary positions;
  // key_mask (batch, past + 1): the real keys; sliding_window 0: none.
  m.def(
      "attention_block_step(Tensor hidden_states, Tensor? residual, Tensor norm_weight, Tensor? norm_bias, "
      "float norm_eps, bool rms_norm, Tensor in_proj_weight, Tensor? in_proj_bias, Tensor(a!) k_cache, "
      "Tensor(b!) v_cache, int past, Tensor positions, Tensor? key_mask, int num_heads, float softmax_scale, "
      "int sliding_window, int rotary_dim, float rotary_base, bool rotary_interleaved, Tensor out_proj_weight, "
      "Tensor? out_proj_bias, Tensor? in_proj_scale=None, Tensor? out_proj_scale=None) -> (Tensor, Tensor)");

  // Causal depthwise conv1d (csrc/cpu/conv1d.cpp has the layout); silu applies
  // silu to the output.
  m.def(
      "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, Tensor? seq_idx, "
      "bool silu) -> Tensor");
  // dbias is empty when bias is absent.
  m.def(
      "causal_conv1d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, "
      "Tensor? seq_idx, bool silu) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dinitial_states)");
  // Decode step(s) x (b, d, l), or (b, d) for one: returns out shaped like x and
  // takes x into conv_state (b, d, state_len) in place: a circular buffer with
  // cache_seqlens (b,), a pool of states indexed by conv_state_indices (b,).
  m.def(
      "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu, "
      "Tensor? cache_seqlens, Tensor? conv_state_indices) -> Tensor");

  // The Mamba-2 SSD chunked scan (csrc/cpu/ssd.cpp has the layout). dt is
  // taken before dt_bias, softplus and the clamp to [dt_min, dt_max].
  // chunk_states: the state entering each chunk, for the backward (and for the
  // varlen states, whence grad_chunk_states).
  m.def(
      "ssd_chunk_scan_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, "
      "Tensor? initial_states, Tensor? seq_idx, int chunk_size, bool dt_softplus, float dt_min, float dt_max) "
      "-> (Tensor out, Tensor final_states, Tensor chunk_states)");
  // Gradients of absent optional inputs come back as empty tensors; ddt is the
  // gradient of dt before dt_bias (so also that of dt_bias, summed).
  m.def(
      "ssd_chunk_scan_bwd(Tensor grad_out, Tensor? grad_final_states, Tensor? grad_chunk_states, Tensor x, "
      "Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? dt_bias, Tensor? seq_idx, "
      "Tensor chunk_states, int chunk_size, bool dt_softplus, float dt_min, float dt_max) -> (Tensor dx, "
      "Tensor ddt, Tensor dA, Tensor dB, Tensor dC, Tensor dD, Tensor dz, Tensor dinitial_states)");
}

// `import lnlm_ssm._C` loads this shared library, which runs the registrations
// above. The module itself has no methods: the ops live in torch.ops.lnlm_ssm.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "lnlm_ssm C++ CPU kernels; the ops are in torch.ops.lnlm_ssm",
      -1,
      nullptr,
  };
  return PyModule_Create(&module);
}
