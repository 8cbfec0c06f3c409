// Selective scan, forward and backward, for float inputs.
#include "selective_scan/selective_scan_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_scan_fwd_fp32(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_fwd<float>(params, stream);
}

cudaError_t selective_scan_bwd_fp32(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_bwd<float>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
