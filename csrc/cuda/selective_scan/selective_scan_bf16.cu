// Selective scan, forward and backward, for __nv_bfloat16 inputs.
#include "selective_scan/selective_scan_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_scan_fwd_bf16(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_fwd<__nv_bfloat16>(params, stream);
}

cudaError_t selective_scan_bwd_bf16(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_bwd<__nv_bfloat16>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
