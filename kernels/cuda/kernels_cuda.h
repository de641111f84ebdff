// Host launchers of the CUDA kernels. Each takes the same arguments as its CPU reference
// (device pointers instead of host pointers) plus a stream, validates what it can without
// reading device memory, enqueues one or two kernels and returns the launch status. Nothing
// here allocates or synchronises; no exception leaves these functions.
//
// Alignment: q, out, k_new, v_new, arenas and slot strides must be 16-byte aligned (cudaMalloc
// gives 256). Page pack falls back to byte copies for engine tensors that are not.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/decode_attention.h"
#include "kernels/kv_quant.h"
#include "kernels/page_pack.h"
#include "kernels/prefill_attention.h"
#include "kvtier/status.h"

namespace kvtier::kernels {

/// kOk for cudaSuccess, kUnavailable when there is no usable device, kInternal otherwise; the
/// message names `what` and the CUDA error.
Status status_from_cuda(cudaError_t err, const char* what);

/// Streaming multiprocessors of the current device (for DecodePlanOptions::num_sms).
Result<uint32_t> current_device_sm_count();

Status decode_attention_cuda(const DecodeAttentionArgs& args, const DecodePlan& plan,
                             const Workspace& workspace, cudaStream_t stream);
Status prefill_attention_cuda(const PrefillAttentionArgs& args, cudaStream_t stream);
Status pack_pages_cuda(const PagePackArgs& args, cudaStream_t stream);
Status unpack_pages_cuda(const PagePackArgs& args, cudaStream_t stream);
Status quantize_kv_cuda(const KvQuantArgs& args, cudaStream_t stream);
Status dequantize_kv_cuda(const KvQuantArgs& args, cudaStream_t stream);

}  // namespace kvtier::kernels
