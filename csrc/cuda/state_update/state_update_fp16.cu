// Decode step for __half inputs (state in float32 or __half).
#include "state_update_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_state_update_fp16(const StateUpdateParams& params, cudaStream_t stream) {
  return state_update_detail::launch_selective_state_update<__half>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
