// Stand-in for the CUDA toolkit's <mma.h> in the host execution layer (g++ builds only).
#pragma once
#include "segkd_host/runtime.h"
#include "segkd_host/half.h"
#include "segkd_host/wmma.h"
