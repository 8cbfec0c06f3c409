// Selective scan, forward and backward, for __half inputs.
#include "selective_scan/selective_scan_kernel.cuh"

namespace lnlm_ssm {
namespace cuda {

cudaError_t selective_scan_fwd_fp16(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_fwd<__half>(params, stream);
}

cudaError_t selective_scan_bwd_fp16(const SelectiveScanParams& params, cudaStream_t stream) {
  return selective_scan_detail::launch_selective_scan_bwd<__half>(params, stream);
}

}  // namespace cuda
}  // namespace lnlm_ssm
