// Decode step for float inputs (state in float32 or float).
#include "state_update_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_state_update_fp32(const StateUpdateParams& params, cudaStream_t stream) {
  return state_update_detail::launch_selective_state_update<float>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
