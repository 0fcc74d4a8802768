"""Triton launches that skip the JIT's per-call work once a kernel is compiled.

`kernel[grid](*args, **constexprs)` runs `JITFunction.run` on every call: it binds every argument
through a generated function, specialises each one (dtype, 16-byte alignment, integer divisibility),
builds the cache key from them, looks the compiled kernel up, checks the globals the kernel read, and
only then calls the compiled kernel's launcher. For a small map that is most of a fused op's host
time (`segkd bench --host`), and the wrappers already know everything the key depends on except the
tensors' dtypes and alignment: their launch plans are cached on shapes, strides, dtypes and tuning
constants, and fix every integer argument and constexpr.

`Launch(kernel, grid, ints, constexprs)` is such a plan's launch. Called with the tensor arguments
(which come first in every kernel signature here, the plan's integers and constexprs after them), it
keeps the compiled kernel per current device for calls whose tensors are all 16-byte aligned (what
Triton specialises a pointer on); with the plan's fixed integers and constexprs, and the tensors'
dtypes, which the plan's own key must fix (a Launch serves one combination of them), that is all
Triton's key depends on. The first such call per device goes through `kernel[grid](...)` (compiles
if needed, launches) and keeps the compiled kernel it returns; later ones hand the same arguments,
in signature order, straight to its launcher, as `JITFunction.run` does after its lookup. Everything
else takes the JIT path unchanged: a tensor that is not 16-byte aligned, the interpreter
(TRITON_INTERPRET=1: kernels are Python functions), a kernel with pre-run hooks, active launch hooks
(profilers read the launch metadata the JIT builds), TRITON_DEBUG, and a launch whose JIT run
returned no compiled kernel. Not repeated per call: the JIT's check that the module globals a
kernel read are unchanged since it was compiled (the kernels launched this way read none that
change), and the compile options read from the environment besides TRITON_DEBUG (set them before
the first launch).

`SEGKD_DIRECT_LAUNCH=0` in the environment (read when a plan is made) sends every launch through the
JIT path: the switch to reach for if a Triton release changes its launcher's calling convention.
"""

from __future__ import annotations

import os

try:
    from triton import knobs as _knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # older Triton: every launch takes the JIT path
    _knobs = None
    JITFunction = ()

# Bumped by clear(): launches drop the compiled kernels they hold when it changes (the benchmark's
# launch interception hands out stand-ins that must never outlive it).
_EPOCH = [0]


def clear() -> None:
    """Forget every compiled kernel held by every Launch (their next call takes the JIT path)."""
    _EPOCH[0] += 1


def _device_stream_cuda():
    """(current device, its current stream), as JITFunction.run asks Triton's driver for them."""
    from triton.runtime import driver  # noqa: PLC0415

    active = driver.active
    device = active.get_current_device()
    return device, active.get_current_stream(device)


# The benchmark of host overhead replaces this (no device to ask on a CPU-only machine).
device_stream = _device_stream_cuda


_RUNTIME = _knobs.runtime if _knobs is not None else None


class Launch:
    """One plan's launch of `kernel` over `grid` with fixed trailing `ints` and `constexprs`
    (options such as num_warps included); called with the leading tensor arguments. `fresh`: how
    many of the last tensor arguments the wrapper allocates itself on every call (torch's
    allocators align every new tensor to at least 64 bytes, so their alignment is not tested)."""

    __slots__ = ("kernel", "grid", "ints", "consts", "tail", "fast", "handles", "epoch", "grid3", "misaligned")

    def __init__(self, kernel, grid, ints, constexprs, fresh: int = 0):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.ints = tuple(ints)
        self.consts = dict(constexprs)
        self.grid3 = (self.grid + (1, 1))[:3]
        self.fast = (isinstance(kernel, JITFunction) and not getattr(kernel, "pre_run_hooks", None)
                     and os.environ.get("SEGKD_DIRECT_LAUNCH", "1") != "0")
        self.tail = None
        self.misaligned = None
        if self.fast:
            # every parameter after the tensors, in signature order: the ints, then each constexpr
            # as given or its default (what JITFunction.run's binder hands the launcher)
            names = kernel.arg_names
            n_fixed = len(names) - sum(1 for p in kernel.params if p.is_constexpr)
            tail = list(self.ints)
            for p in kernel.params[n_fixed:]:
                if not p.is_constexpr:
                    self.fast = False  # a layout these launches do not handle: the JIT binds it
                    break
                tail.append(self.consts[p.name] if p.name in self.consts else p.default)
            self.tail = tuple(tail)
            self.misaligned = _misaligned_test(max(0, n_fixed - len(self.ints) - fresh))
        self.handles: dict = {}
        self.epoch = _EPOCH[0]

    def __call__(self, *tensors) -> None:
        handles = self.handles
        # the hot path: a compiled kernel kept (none yet: no device to ask either; launches
        # intercepted on a machine without one, as the static report and the host-read test do,
        # never get one), every tested pointer 16-byte aligned, no pre-run or launch hooks, no
        # TRITON_DEBUG (Triton 3.6+ keeps hook chains, active when non-empty; older versions a
        # callable or None)
        if handles and self.epoch == _EPOCH[0] and not self.misaligned(tensors):
            device, stream = device_stream()
            handle = handles.get(device)
            rt = _RUNTIME
            if handle is not None and not (
                    self.kernel.pre_run_hooks or rt.debug
                    or (rt.launch_enter_hook is not None and getattr(rt.launch_enter_hook, "calls", True))
                    or (rt.launch_exit_hook is not None and getattr(rt.launch_exit_hook, "calls", True))):
                run, function, metadata = handle
                g0, g1, g2 = self.grid3
                run(g0, g1, g2, stream, function, metadata, None, None, None, *tensors, *self.tail)
                return
        self._jit(tensors)

    def _jit(self, tensors) -> None:
        """Triton's own launch (binds, compiles if needed); keeps the compiled kernel it returns
        where the hot path may use it next time."""
        if not self.fast:
            self.kernel[self.grid](*tensors, *self.ints, **self.consts)
            return
        if self.epoch != _EPOCH[0]:
            self.handles.clear()
            self.epoch = _EPOCH[0]
        compiled = self.kernel[self.grid](*tensors, *self.ints, **self.consts)
        if not self.misaligned(tensors) and getattr(compiled, "function", None) is not None:
            device, _ = device_stream()
            self.handles.setdefault(device, (compiled.run, compiled.function, compiled.packed_metadata))


def _misaligned_test(count: int):
    """A function of the tensor arguments: nonzero when one of the first `count` is not 16-byte
    aligned (one expression over their data pointers, no loop: it runs on every launch)."""
    if count == 0:
        return lambda tensors: 0
    ptrs = " | ".join(f"tensors[{i}].data_ptr()" for i in range(count))
    return eval(f"lambda tensors: ({ptrs}) & 15")  # noqa: S307 (built from integers only)


MISSING = object()  # PlanCache.get's default: None is a plan (nothing to launch)


class PlanCache(dict):
    """Launch plans keyed on everything they depend on (shapes, strides, dtypes, tuning constants):
    a repeated call skips the plan arithmetic (blocks, grids, layout tests, argument lists) and,
    through the Launches a plan holds, Triton's binding. Bounded: a run with ever new shapes
    clears it now and then."""

    def __init__(self, limit: int = 256):
        super().__init__()
        self.limit = limit

    def put(self, key, plan):
        """Keep `plan` (None included) under `key`; returns it."""
        if len(self) >= self.limit:
            self.clear()
        self[key] = plan
        return plan

    def get_or_make(self, key, make):
        """The plan under `key`, made by `make()` (which may return None) the first time. (The
        hottest wrappers spell it out: `get(key, MISSING)`, then `put` on a miss, which builds no
        closure per call.)"""
        plan = self.get(key, MISSING)
        return self.put(key, make()) if plan is MISSING else plan


__all__ = ["MISSING", "Launch", "PlanCache", "clear", "device_stream"]
