// Stand-in for the CUDA toolkit's <cuda_pipeline.h> in the host execution layer (g++ builds only).
#pragma once
#include "segkd_host/runtime.h"
#include "segkd_host/pipeline.h"
