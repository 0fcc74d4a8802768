// Stand-in for the CUDA toolkit's <cuda_fp16.h> in the host execution layer (g++ builds only).
#pragma once
#include "segkd_host/runtime.h"
#include "segkd_host/half.h"
