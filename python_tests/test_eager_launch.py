"""ops/_launch.py: a plan's launch keeps the compiled kernel and hands the launcher exactly what
JITFunction.run hands it, and takes the JIT path wherever its key would not hold.

Real JITFunctions are needed (the interpreter replaces them), so the checks run in a child process
without TRITON_INTERPRET, with JITFunction.run replaced by a recorder returning a stand-in compiled
kernel (nothing is compiled or launched)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import torch
from triton.runtime.jit import JITFunction
from segkd_kernels.ops import _launch
from segkd_kernels.ops.cbam_gate import triton as cbam

jit_calls, launcher_calls = [], []

class Compiled:
    function, packed_metadata = "fn", "meta"
    @staticmethod
    def run(*args):
        launcher_calls.append(args)

def run(fn, *args, grid, warmup, **kwargs):
    jit_calls.append((fn, args, grid, kwargs))
    return Compiled

JITFunction.run = run
_launch.device_stream = lambda: (0, 7)
consts = dict(BLOCK=128, ACC_DTYPE="acc", num_warps=4, enable_fp_fusion=True)
launch = _launch.Launch(cbam._cbam_gate_contig_kernel, (12, 1), (6, 117), consts, fresh=1)
x, mc, ms, out = torch.empty(2, 6, 9, 13), torch.empty(2, 6), torch.empty(2, 117), torch.empty(2, 6, 9, 13)
launch(x, mc, ms, out)
assert len(jit_calls) == 1 and not launcher_calls
assert jit_calls[0][1] == (x, mc, ms, out, 6, 117) and jit_calls[0][3] == consts
launch(x, mc, ms, out)
# the launcher gets grid, stream, function, metadata, no launch metadata or hooks, then every
# parameter in signature order (constexprs included), as JITFunction.run passes them
assert len(jit_calls) == 1 and len(launcher_calls) == 1
assert launcher_calls[0] == (12, 1, 1, 7, "fn", "meta", None, None, None, x, mc, ms, out, 6, 117, 128, "acc")
# an input that is not 16-byte aligned: Triton would specialise differently, so the JIT decides
odd = torch.empty(2 * 6 + 1)[1:].view(2, 6)
launch(x, odd, ms, out)
assert len(jit_calls) == 2 and len(launcher_calls) == 1
# active launch hooks: the JIT path builds the metadata they read
from triton import knobs
hook = lambda metadata: None
chain = knobs.runtime.launch_enter_hook
if hasattr(chain, "add"):
    chain.add(hook)
    launch(x, mc, ms, out)
    assert len(jit_calls) == 3 and len(launcher_calls) == 1
    chain.remove(hook)
n_jit = len(jit_calls)
# clear(): the kept kernel is dropped, the next launch compiles (here: records) again
_launch.clear()
launch(x, mc, ms, out)
assert len(jit_calls) == n_jit + 1 and len(launcher_calls) == 1
launch(x, mc, ms, out)
assert len(launcher_calls) == 2
# SEGKD_DIRECT_LAUNCH=0: every call of a plan made under it takes the JIT path
import os
os.environ["SEGKD_DIRECT_LAUNCH"] = "0"
off = _launch.Launch(cbam._cbam_gate_contig_kernel, (12, 1), (6, 117), consts, fresh=1)
del os.environ["SEGKD_DIRECT_LAUNCH"]
n_jit, n_launch = len(jit_calls), len(launcher_calls)
for _ in range(3):
    off(x, mc, ms, out)
assert len(jit_calls) == n_jit + 3 and len(launcher_calls) == n_launch
# a launch whose JIT run returns no compiled kernel (intercepted elsewhere) never keeps one
JITFunction.run = lambda fn, *a, grid, warmup, **k: jit_calls.append(fn)
_launch.clear()
n_jit = len(jit_calls)
for _ in range(2):
    launch(x, mc, ms, out)
assert len(launcher_calls) == 2 and len(jit_calls) == n_jit + 2
print("ok")
'''


def test_launch_keeps_the_compiled_kernel_and_passes_what_the_jit_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_launch_takes_the_jit_path_under_the_interpreter():
    """Under TRITON_INTERPRET=1 (the test suite's setting) kernels are not JITFunctions: every launch
    goes through kernel[grid](...), which the interpreter runs."""
    from segkd_kernels._backends import TRITON_INTERPRET
    from segkd_kernels.ops import _launch
    from segkd_kernels.ops.cbam_gate import triton as cbam

    launch = _launch.Launch(cbam._cbam_gate_contig_kernel, (1, 1), (1, 1), dict(BLOCK=16, ACC_DTYPE=None))
    assert launch.fast is not TRITON_INTERPRET
