// Decode step for __nv_bfloat16 inputs (state in float32 or __nv_bfloat16).
#include "state_update_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_state_update_bf16(const StateUpdateParams& params, cudaStream_t stream) {
  return state_update_detail::launch_selective_state_update<__nv_bfloat16>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
