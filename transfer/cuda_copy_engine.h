// CudaCopyEngine: cudaMemcpyAsync on the engine's own non-blocking streams (at least one per
// direction so loads and saves overlap). Completion: an event recorded after each copy; one thread
// per stream blocks on its oldest event (cudaEventBlockingSync, so nobody spins) and runs the
// callback. Host pointers should be page-locked (staging is; the host arena is when pinned): a
// pageable pointer still works but the copy is then synchronous, and the log says so once.
// Built only with KVTIER_WITH_CUDA; create_cuda_copy_engine() is kUnavailable otherwise.
#pragma once

#include "transfer/copy_engine.h"

// The engine is made by create_cuda_copy_engine() / create_copy_engine() (transfer/copy_engine.h);
// its class stays inside cuda_copy_engine.cpp so no CUDA header leaks into callers.
