"""`segkd bench --static`: what the compiler makes of every kernel, on any machine, no GPU needed.

For every op of bench/cases.py at its benchmark shapes (fp32 and bf16) the real Triton wrappers run
on CPU tensors whose contents never matter: every `JITFunction.run` is intercepted, so nothing is
launched, and each launch's binding (signature, constexprs, alignment attributes, num_warps,
num_stages, grid) is recorded exactly as Triton's own launcher would bind it for the target. Each
distinct launch is then compiled ahead of time for sm_90 and sm_80 (`triton.compile` with a
GPUTarget) and read back: registers, spill bytes and stack from ptxas, shared memory from the
kernel's metadata, the SASS instruction mix from cuobjdump. The CUDA kernels of csrc/ are compiled
with `nvcc -cubin -Xptxas -v` for the same archs where nvcc exists, and the CUDA backend of the
memory-bound ops (CUDA_OPS) runs through the host execution layer in its recording mode: the real
launchers pick their grids for each arch's SM count and every launch is recorded, not run, with
its pointer arguments, which give the CUDA op rows their bytes model (docs/performance.md).

Instructions per element (columns instr_per_elem on kernel rows, instr_per_elem_fwd / _bwd on op
rows) is a model of the dynamic thread-instructions a launch executes, divided by the number of
elements of the op's first input (the student or x; for a loss the output is a scalar, and the
backward's output, the gradient, has that many elements). It is not a measurement:
- loops are found in the SASS (`nvdisasm -g`: every backward branch closes a loop whose body is
  the address range it jumps over); each SASS loop is matched, through the source line of its
  instructions, to the innermost `for` of the kernel (or of a @triton.jit helper it calls);
- a loop's trip count is evaluated from that `for`'s range with the launch's own scalar
  arguments and constexprs (the capture records them), following the kernel's scalar
  assignments; bounds that depend on the program id are evaluated per program (every program, or
  1024 spread over a large grid) and averaged; a `while`, a loop over anything but `range`, or a
  bound computed from loaded values leaves the kernel's value empty, with the reason in `note`;
- instructions count once per trip of every enclosing loop; everything else counts once,
  including both sides of a branch and the code a masked tail or an early exit would skip; a
  loop ptxas splits into an unrolled main loop and a remainder shares its trips by the size
  ratio of the two bodies; predicated-off lanes count as executed (a warp issues them anyway);
- thread-instructions = warp-instructions per program x 32 x num_warps x programs; the torch ops
  a wrapper runs between launches are not modelled, and CUDA kernels (whose block size and grid
  the host code picks at run time) have no value.

Occupancy is the usual per-SM limit model (registers per warp rounded to 256 and split over the 4
schedulers, shared memory with 1 KiB reserved per CTA, 64 warps and 32 CTAs per SM); waves are
CTAs / (CTAs per SM x SMs) on an H100/H200 (132 SMs) or A100 (108 SMs). Everything here is a
compiler fact or a model, never a timing.

This must run in a process where TRITON_INTERPRET is unset before Triton is imported: the
interpreter replaces every kernel by a Python function, and some wrappers pick interpreter-only
tile sizes. `segkd bench --static` re-executes itself in such a process when needed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ARCHS = {"sm_90": (90, 132, "H100/H200"), "sm_80": (80, 108, "A100")}
# Per-SM limits used by the occupancy model (CUDA occupancy calculator data for cc 8.0 / 9.0).
SM_LIMITS = {
    80: dict(regs=65536, warps=64, ctas=32, smem=167936, smem_reserved=1024),
    90: dict(regs=65536, warps=64, ctas=32, smem=233472, smem_reserved=1024),
}
DTYPE_NAMES = ("float32", "bfloat16")
DEFAULT_CSV = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
REPO = Path(__file__).resolve().parents[2]

COLUMNS = [
    "row", "arch", "kind", "op", "shape", "dtype", "phase", "kernel", "launches", "constexprs", "num_warps",
    "num_stages", "grid", "ctas", "regs", "spill_stores", "spill_loads", "stack", "smem", "ctas_per_sm",
    "warps_per_sm", "occupancy", "waves", "sass_total", "ldg_narrow", "ldg32", "ldg64", "ldg128", "stg", "ffma",
    "hmma", "gmma", "dmma", "mufu", "bar", "bar_per_step", "ldl", "stl", "block", "bytes_model", "bytes_floor", "model_over_floor",
    "kernel_launches", "torch_ops", "fp_fusion_pinned", "instr_per_elem", "instr_per_elem_fwd", "instr_per_elem_bwd",
    "note",
]
# Which shapes a run compiles: the benchmark shapes, the small odd shapes of --quick, or both ("gate":
# the quick shapes plus the first benchmark shape of every op, the CI gate's fast subset).
SHAPE_SETS = ("bench", "quick", "gate", "all")


def shapes_for(case, shape_set: str) -> list:
    if shape_set == "bench":
        return list(case.shapes)
    if shape_set == "quick":
        return list(case.quick_shapes)
    if shape_set == "gate":
        return list(case.quick_shapes) + list(case.shapes[:1])
    if shape_set == "all":
        return list(case.quick_shapes) + list(case.shapes)
    raise ValueError(f"shape set: expected one of {SHAPE_SETS}, got {shape_set!r}")


# ----------------------------------------------------------------------------------------------
# occupancy and SASS parsing (pure functions, unit-tested)

def occupancy(cc: int, regs: int, smem: int, warps_per_cta: int) -> tuple[int, int, float]:
    """(CTAs per SM, warps per SM, occupancy fraction) from the per-SM limits of compute capability cc."""
    lim = SM_LIMITS[cc]
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    # registers are allocated per scheduler (4 per SM), whole warps at a time
    warps_by_regs = 4 * ((lim["regs"] // 4) // regs_per_warp)
    ctas = min(lim["ctas"], lim["warps"] // warps_per_cta, warps_by_regs // warps_per_cta)
    if smem:
        ctas = min(ctas, lim["smem"] // (smem + lim["smem_reserved"]))
    ctas = max(ctas, 0)
    return ctas, ctas * warps_per_cta, ctas * warps_per_cta / lim["warps"]


_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def sass_mix(sass: str) -> dict[str, int]:
    """Static instruction counts of one function's SASS (cuobjdump -sass text)."""
    mix = dict(sass_total=0, ldg_narrow=0, ldg32=0, ldg64=0, ldg128=0, stg=0, ffma=0, hmma=0, gmma=0, dmma=0,
               mufu=0, bar=0, ldl=0, stl=0)
    for m in _OPCODE.finditer(sass):
        op = m.group(1)
        base, *mods = op.split(".")
        if base == "NOP":
            continue
        mix["sass_total"] += 1
        if base == "LDG":
            if "128" in mods:
                mix["ldg128"] += 1
            elif "64" in mods:
                mix["ldg64"] += 1
            elif any(x in mods for x in ("U8", "S8", "U16", "S16")):
                mix["ldg_narrow"] += 1
            else:
                mix["ldg32"] += 1
        elif base in ("STG", "RED", "ATOMG"):
            mix["stg"] += 1
        elif base == "FFMA":
            mix["ffma"] += 1
        elif base == "HMMA":
            mix["hmma"] += 1
        elif base in ("HGMMA", "GMMA", "WGMMA"):
            mix["gmma"] += 1
        elif base == "DMMA":
            mix["dmma"] += 1
        elif base == "MUFU":
            mix["mufu"] += 1
        elif base == "BAR":
            mix["bar"] += 1
        elif base == "LDL":
            mix["ldl"] += 1
        elif base == "STL":
            mix["stl"] += 1
    return mix


def _split_functions(text: str, header: str) -> dict[str, str]:
    """{function name: its lines} of a disassembly whose functions start at lines matching header
    (a regular expression whose first group is the name)."""
    out, name, lines = {}, None, []
    for line in text.splitlines():
        m = re.match(header, line)
        if m:
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = m.group(1), []
        elif name is not None:
            lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out


def split_sass_functions(sass: str) -> dict[str, str]:
    """cuobjdump -sass output of a cubin -> {function name: its SASS}."""
    return _split_functions(sass, r"\s*Function : (\S+)")


def parse_ptxas(log: str) -> dict[str, dict]:
    """ptxas -v output -> {mangled function name: regs, spill_stores, spill_loads, stack, smem}."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            name = m.group(1)
            out.setdefault(name, dict(regs=0, spill_stores=0, spill_loads=0, stack=0, smem=0))
            continue
        if name is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            out[name].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            out[name]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            if s:
                out[name]["smem"] = int(s.group(1))
    return out


# ----------------------------------------------------------------------------------------------
# the instruction model: dynamic thread-instructions per element (a model, not a measurement)

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
_LABEL = re.compile(r"^(\.L\w+):")
_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_TARGET = re.compile(r"`\((\.L\w+)\)")


def sass_loops(disasm: str, divergence_returns: bool = True) -> dict:
    """Loops of one function from `nvdisasm -g` text (SASS with the source line of each instruction).

    A loop is a backward branch (BRA/BRX to a label at a lower address); its body is the address
    range [label, branch]. Returns {"loops": [{"lines": {file: {line: count}}}], "segments":
    [[loop indices enclosing an instruction, instruction count], ...]}; NOPs are not counted, as in
    sass_mix, and neither is a branch to itself (the trap after the final EXIT). Each loop's "bar"
    counts the BAR instructions in its own body. With divergence_returns=False, the jump back from
    the out-of-line divergent copy of a warp collective (the code a BRA.DIV jumps to, up to its
    first unguarded BRA) is not a loop: it runs at most once and would otherwise seem to enclose
    everything in between."""
    labels, instrs = {}, []  # instrs: (address, opcode, operands, (file, line))
    unguarded: set = set()  # addresses of instructions without a predicate
    where = None
    pending: list[str] = []
    for line in disasm.splitlines():
        m = _LINE.search(line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = _LABEL.match(line.strip())
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instrs.append((addr, m.group(2), m.group(3), where))
            if "@" not in line.split("*/", 1)[1].split(m.group(2), 1)[0]:
                unguarded.add(addr)
    loops = []  # (start address, end address)
    # The out-of-line divergent copy of a warp collective: code a BRA.DIV jumps to, ending with the
    # first unguarded BRA back into the kernel. With divergence_returns=False that jump is no loop
    # (it runs once at most).
    returns = set()
    starts = sorted(labels[t.group(1)] for _a, op, rest, _ in instrs if op.startswith("BRA.DIV")
                    for t in [_TARGET.search(rest)] if t and t.group(1) in labels)
    for start in starts:
        end = next((a for a, op, _r, _ in instrs if a >= start and op == "BRA" and a in unguarded), None)
        if end is not None:
            returns.add(end)
    for addr, op, rest, _ in instrs:
        if op.split(".")[0] in ("BRA", "BRX") and not op.startswith("BRA.DIV"):
            t = _TARGET.search(rest)
            if t and t.group(1) in labels and labels[t.group(1)] < addr:
                if not divergence_returns and addr in returns:
                    continue
                loops.append((labels[t.group(1)], addr))
    loops = sorted(set(loops))
    info = [{"lines": {}} for _ in loops]
    segments: dict = {}
    for addr, op, _rest, where in instrs:
        if op.split(".")[0] == "NOP":
            continue
        chain = tuple(i for i, (a, b) in enumerate(loops) if a <= addr <= b)
        segments[chain] = segments.get(chain, 0) + 1
        if chain and op.split(".")[0] == "BAR":
            info[chain[-1]]["bar"] = info[chain[-1]].get("bar", 0) + 1
        if chain and where is not None:
            lines = info[chain[-1]]["lines"].setdefault(where[0], {})
            lines[str(where[1])] = lines.get(str(where[1]), 0) + 1
    return {"loops": info, "segments": [[list(c), n] for c, n in sorted(segments.items())]}


def barriers_per_step(loops: dict) -> int:
    """Most BAR instructions one trip of any loop executes in its own body (not in loops nested in
    it): the barriers per loop step. A barrier outside every loop (a block reduction after the main
    loop) runs once per program and is not counted."""
    return max((lp.get("bar", 0) for lp in loops.get("loops", [])), default=0)


def split_nvdisasm_functions(text: str) -> dict[str, str]:
    """nvdisasm output of a whole cubin -> {mangled function name: its text} (sections `.text.<name>`)."""
    return _split_functions(text, r"\s*\.section\s+\.text\.([\w$.]+)")


class _Unknown(Exception):
    pass


_PIDS_SAMPLED = 1024  # programs whose trip counts are evaluated when they depend on the program id


class _Env(dict):
    """Known scalar values; `pid` is the program id tuple, `used_pid` records that it was read."""

    def __init__(self, values=(), pid=(0, 0, 0), grid=(1, 1, 1)):
        super().__init__(values)
        self.pid, self.grid, self.used_pid = pid, grid, [False]
        self.loop = None  # the source loop (file, line) enclosing this point, through call sites

    def child(self):
        c = _Env(self, self.pid, self.grid)
        c.used_pid, c.loop = self.used_pid, self.loop
        return c


def _eval(node, env: _Env):
    """Value of a scalar expression of a kernel: ints and floats of the launch, the program id."""
    import ast  # noqa: PLC0415

    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, bool)):
        return node.value
    if isinstance(node, ast.Name):
        if node.id in env:
            return env[node.id]
        raise _Unknown(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.Not)):
        v = _eval(node.operand, env)
        return -v if isinstance(node.op, ast.USub) else not v
    if isinstance(node, ast.BinOp):
        a, b = _eval(node.left, env), _eval(node.right, env)
        ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
               ast.FloorDiv: lambda: a // b, ast.Mod: lambda: a % b, ast.LShift: lambda: a << b,
               ast.RShift: lambda: a >> b}
        if type(node.op) in ops:
            return ops[type(node.op)]()
        raise _Unknown(type(node.op).__name__)
    if isinstance(node, ast.Compare) and len(node.ops) == 1:
        a, b = _eval(node.left, env), _eval(node.comparators[0], env)
        ops = {ast.Lt: a < b, ast.LtE: a <= b, ast.Gt: a > b, ast.GtE: a >= b, ast.Eq: a == b, ast.NotEq: a != b}
        if type(node.ops[0]) in ops:
            return ops[type(node.ops[0])]
        raise _Unknown("comparison")
    if isinstance(node, ast.IfExp):
        return _eval(node.body, env) if _eval(node.test, env) else _eval(node.orelse, env)
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name == "to" and isinstance(f, ast.Attribute):  # x.to(tl.int64): the value of x
            return _eval(f.value, env)
        if name in ("program_id", "num_programs"):
            axis = _eval(node.args[0] if node.args else node.keywords[0].value, env)
            if name == "num_programs":
                return env.grid[axis]
            env.used_pid[0] = True
            return env.pid[axis]
        vals = [_eval(a, env) for a in node.args]
        if name == "cdiv":
            return -(-vals[0] // vals[1])
        if name in ("min", "minimum"):
            return min(vals)
        if name in ("max", "maximum"):
            return max(vals)
        if name == "where":
            return vals[1] if vals[0] else vals[2]
        if name == "int":
            return int(vals[0])
    raise _Unknown(type(node).__name__)


def _assigned(stmts) -> set[str]:
    import ast  # noqa: PLC0415

    return {node.id for st in stmts for node in ast.walk(st)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


_PARSED: dict = {}


def _parsed(fn):
    """(function AST, source path, first line) of a JITFunction's Python function, cached."""
    import ast  # noqa: PLC0415
    import inspect  # noqa: PLC0415
    import textwrap  # noqa: PLC0415

    key = id(fn)
    if key not in _PARSED:
        src = textwrap.dedent(inspect.getsource(fn.fn))
        _PARSED[key] = (ast.parse(src).body[0], str(Path(inspect.getsourcefile(fn.fn)).resolve()),
                        fn.fn.__code__.co_firstlineno)
    return _PARSED[key]


def loop_trips(fn, env: _Env, trips: dict | None = None, spans: dict | None = None, depth: int = 0,
               calls: dict | None = None):
    """Trip counts of the loops of kernel fn (and of the @triton.jit helpers it calls, inlined at
    each call) for one program: ({(file, line of a for): [(trips, enclosing loop) at each visit]},
    {(file, line): (first line, last line, function)}); trips None for a loop whose bounds the
    launch does not determine; the enclosing loop is the (file, line) of the source loop the visit
    is in, through call sites (None at the top level).

    Range bounds are evaluated from the launch's scalar arguments and constexprs and the program
    id of `env`; scalar assignments are followed in order (one that cannot be evaluated makes its
    name unknown), and the loop variables of enclosing loops take their first value.

    `calls`, when given, collects {loop: {(file, first line, last line) of each helper called in
    it}}: the lines of an inlined helper belong to the loop of its call site (see _helper_lines)."""
    import ast  # noqa: PLC0415

    from triton.runtime.jit import JITFunction  # noqa: PLC0415

    trips = {} if trips is None else trips
    spans = {} if spans is None else spans
    func, path, first = _parsed(fn)
    for node in ast.walk(func):
        if isinstance(node, (ast.For, ast.While)) and not _static_range(node):
            spans[(path, node.lineno + first - 1)] = (node.lineno + first - 1, node.end_lineno + first - 1, id(fn))

    def helper_calls(node, env):
        # @triton.jit helpers called in this statement: walk them with their arguments bound
        if depth > 4:
            return
        for call in ast.walk(node):
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name):
                callee = fn.fn.__globals__.get(call.func.id)
                if isinstance(callee, JITFunction):
                    cfunc, cpath, cfirst = _parsed(callee)
                    if calls is not None and env.loop is not None:
                        calls.setdefault(env.loop, set()).add(
                            (cpath, cfunc.lineno + cfirst - 1, cfunc.end_lineno + cfirst - 1))
                    names = [a.arg for a in cfunc.args.args]
                    inner = _Env({}, env.pid, env.grid)
                    inner.used_pid, inner.loop = env.used_pid, env.loop
                    for name, arg in zip(names, call.args):
                        try:
                            inner[name] = _eval(arg, env)
                        except (_Unknown, ZeroDivisionError, IndexError, TypeError):
                            pass
                    loop_trips(callee, inner, trips, spans, depth + 1, calls)

    def walk(stmts, env):
        for st in stmts:
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                helper_calls(st.value, env)
                try:
                    env[st.targets[0].id] = _eval(st.value, env)
                except (_Unknown, ZeroDivisionError, IndexError, TypeError):
                    env.pop(st.targets[0].id, None)
            elif isinstance(st, ast.For):
                key = (path, st.lineno + first - 1)
                inner = env.child()
                inner.loop = env.loop if _static_range(st) else key  # an unrolled loop is no SASS loop
                it = st.iter
                try:
                    called = it.func if isinstance(it, ast.Call) else None
                    if getattr(called, "attr", None) != "range" and getattr(called, "id", None) != "range":
                        raise _Unknown("iterator")  # tl.static_range is unrolled: no SASS loop
                    bounds = [_eval(a, env) for a in it.args]
                    start, end, step = (0, bounds[0], 1) if len(bounds) == 1 else (*bounds, 1)[:3]
                    trips.setdefault(key, []).append((max(0, -(-(end - start) // step)), env.loop))
                    if isinstance(st.target, ast.Name):
                        inner[st.target.id] = start
                except (_Unknown, ZeroDivisionError, IndexError, TypeError, ValueError, AttributeError):
                    trips.setdefault(key, []).append((None, env.loop))
                    if isinstance(st.target, ast.Name):
                        inner.pop(st.target.id, None)
                walk(st.body, inner)
                for name in _assigned(st.body):  # values changed by the loop are not known after it
                    env.pop(name, None)
            elif isinstance(st, (ast.If, ast.While, ast.With)):
                if isinstance(st, ast.While):
                    trips.setdefault((path, st.lineno + first - 1), []).append((None, env.loop))
                else:
                    helper_calls(getattr(st, "test", ast.Constant(0)), env)
                taken = None
                if isinstance(st, ast.If):
                    try:
                        taken = bool(_eval(st.test, env))  # a constexpr flag: only one side is compiled
                    except (_Unknown, ZeroDivisionError, IndexError, TypeError):
                        pass
                if taken is not None:  # only the compiled side exists: its assignments hold after it
                    walk(st.body if taken else st.orelse, env)
                    continue
                walk(st.body, env.child())
                walk(getattr(st, "orelse", []), env.child())
                for name in _assigned(st.body + getattr(st, "orelse", [])):
                    env.pop(name, None)
            else:
                helper_calls(st, env)
                for name in _assigned([st]):
                    env.pop(name, None)

    walk(func.body, env)
    return trips, spans


# -- unrolled loops and inlined helpers -------------------------------------------------------
# A `tl.static_range` loop is unrolled by the compiler: it is never a SASS loop, so it is no
# candidate when SASS loops are matched to source loops. A kernel whose loop body is mostly
# inlined helper code (a row walk unrolled over helpers) has SASS loops whose source lines lie in
# the helpers, outside the span of the loop that calls them: those lines count as inside the loop.


def _static_range(node) -> bool:
    """A `for ... in tl.static_range(...)` (unrolled at compile time)."""
    it = getattr(node, "iter", None)
    f = getattr(it, "func", None)
    return (getattr(f, "attr", None) or getattr(f, "id", None)) == "static_range"


def _helper_lines(key, spans: dict, calls: dict) -> set:
    """(file, first, last) of the helpers called inside source loop `key` or a loop it encloses."""
    lo, hi, owner = spans[key]
    out = set()
    for k, ranges in calls.items():
        if k in spans and k[0] == key[0] and spans[k][2] == owner and lo <= spans[k][0] <= hi:
            out |= ranges
    return out


def _ancestor(parent: dict, j: int, i: int) -> bool:
    """SASS loop i encloses SASS loop j."""
    p = parent.get(j)
    while p is not None:
        if p == i:
            return True
        p = parent.get(p)
    return False


def _program_ids(grid: tuple) -> list[tuple]:
    """Every program id of the grid, or _PIDS_SAMPLED of them spread evenly over it."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    total = math.prod(g)
    picks = range(total) if total <= _PIDS_SAMPLED else (i * total // _PIDS_SAMPLED for i in range(_PIDS_SAMPLED))
    return [(i % g[0], (i // g[0]) % g[1], i // (g[0] * g[1])) for i in picks]


def dynamic_instructions(fn, loops: dict, values: dict, grid: tuple) -> tuple[float | None, str]:
    """Modelled warp-instructions per program of a launch of kernel fn (mean over its programs;
    None and why when a loop's trip count is not determined by the launch), from `sass_loops`.

    Each SASS loop is matched to the innermost source loop (of the kernel or of a helper it calls)
    that holds at least half of its instructions' source lines; its instructions count once per
    trip, nested loops multiply. ptxas may split one source loop into several SASS loops (an
    unrolled main loop and a remainder): sibling SASS loops matched to the same source loop share
    its trips, the largest body taking trips // u (u = its size over the smallest body's, the
    unroll factor) and the others trips % u. A helper inlined at several call sites gives one SASS
    loop per site: the sites inside the source loop that the enclosing SASS loop matched, taken in
    address order. Everything outside loops counts once: both sides of a
    branch, all of the prologue. Trip counts that depend on the program id are evaluated for every
    program (up to _PIDS_SAMPLED of them, spread over the grid) and averaged."""
    g = tuple(grid) + (1,) * (3 - len(grid))
    base = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    env = _Env(base, (0, 0, 0), g)
    calls: dict = {}
    trips, spans = loop_trips(fn, env, calls=calls)
    pids = _program_ids(g) if env.used_pid[0] else [(0, 0, 0)]
    size = [0] * len(loops["loops"])
    parent: dict = {}
    for chain, n in loops["segments"]:
        if chain:
            size[chain[-1]] += n
        for depth, i in enumerate(chain):
            parent[i] = chain[depth - 1] if depth else None
    sources = {path for path, _ in spans}

    def contains(outer, inner):
        # source loop `outer` strictly encloses source loop `inner`; a loop of a helper (another
        # function, inlined at a call) may sit in any loop of its caller
        if spans[outer][2] != spans[inner][2]:
            return True
        return outer != inner and spans[outer][0] <= inner[1] <= spans[outer][1]

    matched: dict[int, tuple] = {}
    # inner SASS loops first: an enclosing SASS loop must match a source loop enclosing theirs
    depth_of = {i: sum(1 for j in range(len(loops["loops"])) if _ancestor(parent, i, j))
                for i in range(len(loops["loops"]))}
    for i in sorted(depth_of, key=lambda i: -depth_of[i]):
        loop = loops["loops"][i]
        # lines of the kernel's sources only (Triton's own library code, e.g. tl.sum, is inlined too)
        by_file = {Path(f).resolve().as_posix(): d for f, d in loop["lines"].items()}
        by_file = {f: d for f, d in by_file.items() if f in sources}
        total = sum(n for d in by_file.values() for n in d.values())
        children = [matched[j] for j in matched if parent.get(j) == i]
        best = fallback = None
        for key, (lo, hi, _fn) in spans.items():
            if not all(contains(key, c) for c in children):
                continue
            width = hi - lo
            if children and (fallback is None or width < spans[fallback][1] - spans[fallback][0]):
                fallback = key
            inside = sum(n for k, n in by_file.get(key[0], {}).items() if lo <= int(k) <= hi)
            inside += sum(n for f, flo, fhi in _helper_lines(key, spans, calls)
                          for k, n in by_file.get(f, {}).items() if flo <= int(k) <= fhi and not lo <= int(k) <= hi)
            if total and inside * 2 >= total and (best is None or width < spans[best][1] - spans[best][0]):
                best = key
        best = best or fallback
        if best is None:
            return None, f"SASS loop {i} matches no loop of {fn.__name__}"
        matched[i] = best
    matched = [matched[i] for i in range(len(loops["loops"]))]
    total = 0.0
    for pid in pids:
        if pid != (0, 0, 0) or not trips:
            env = _Env(base, pid, g)
            trips, _ = loop_trips(fn, env)
        trip_of = {}
        groups: dict = {}
        for i, key in enumerate(matched):
            groups.setdefault((key, parent.get(i)), []).append(i)
        for (key, _p), members in groups.items():
            # the visits made inside the source loop the enclosing SASS loop matched (a helper
            # called in two loops of the kernel is inlined in each)
            outer = matched[_p] if _p is not None else None
            visits = [n for n, where in trips.get(key, [(None, None)]) if where == outer] or \
                [n for n, _where in trips.get(key, [(None, None)])]
            if any(v is None for v in visits):
                return None, f"trip count of the loop at {Path(key[0]).name}:{key[1]} not determined by the launch"
            if len(members) == len(visits) > 1:  # one inlined copy per call site
                for i, n in zip(sorted(members), visits):
                    trip_of[i] = n
                continue
            if len(set(visits)) > 1:
                return None, f"loop at {Path(key[0]).name}:{key[1]}: {len(visits)} call sites, {len(members)} SASS loops"
            n = visits[0]
            if len(members) == 1:
                trip_of[members[0]] = n
                continue
            members = sorted(members, key=lambda i: -size[i])
            u = max(1, round(size[members[0]] / max(1, size[members[-1]])))
            trip_of[members[0]] = n // u
            for i in members[1:]:
                trip_of[i] = n % u
        total += sum(n * math.prod(trip_of[i] for i in chain) for chain, n in loops["segments"])
    return total / len(pids), ""


# ----------------------------------------------------------------------------------------------
# tools

def _triton_bin(tool: str) -> str:
    import triton  # noqa: PLC0415

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool
    return str(path) if path.exists() else (shutil.which(tool) or tool)


def _nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and Path(cand).exists():
            return cand
    return None


def _sass_of_cubin(cubin: bytes, workdir: Path, lines: bool = False) -> str:
    """cuobjdump -sass text of a cubin, or with lines=True nvdisasm's, with the source line of
    every instruction (Triton keeps line info in its cubins)."""
    path = workdir / f"k_{hashlib.sha1(cubin).hexdigest()[:16]}_{os.getpid()}.cubin"
    path.write_bytes(cubin)
    cmd = [_triton_bin("nvdisasm"), "-g", "-c", str(path)] if lines else [_triton_bin("cuobjdump"), "-sass",
                                                                           str(path)]
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    finally:
        path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# capturing the launches of the real wrappers

@dataclass
class Launch:
    kernel: str
    fn: object
    phase: str
    grid: tuple
    bound: dict = field(default_factory=dict)    # cc -> (signature, constexprs, attrs, options)
    fp_fusion_pinned: bool = False               # the launch passed enable_fp_fusion=True itself
    values: dict = field(default_factory=dict)   # scalar arguments and constexprs (the instruction model)

    def key(self, cc: int) -> str:
        sig, cx, attrs, opts = self.bound[cc]
        # cache_key: Triton's hash of the kernel's source and its dependencies (an edited kernel
        # is compiled again)
        return repr((self.fn.__module__, self.kernel, self.fn.cache_key, sorted(sig.items()), sorted(cx.items()),
                     sorted(attrs.items()), sorted(opts.__dict__.items())))


class _Capture:
    """Replaces JITFunction.run while active: binds each launch for every arch, launches nothing."""

    def __init__(self, ccs, hot_path: bool = False):
        # hot_path: only the host work of Triton's cached launch (bind the arguments, build the cache
        # key, evaluate the grid) for the first arch, counted but not recorded (`segkd bench --host`)
        self.ccs = ccs
        self.hot_path = hot_path
        self.count = 0
        self.launches: list[Launch] = []
        self.phase = "forward"
        self.tensor_bytes: list[int] = []

    def __enter__(self):
        from triton import knobs  # noqa: PLC0415
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415
        from triton.compiler import make_backend  # noqa: PLC0415
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: PLC0415

        import torch  # noqa: PLC0415

        backends = {cc: make_backend(GPUTarget("cuda", cc, 32)) for cc in self.ccs}
        binders: dict = {}
        capture = self

        def run(fn, *args, grid, warmup, **kwargs):
            capture.count += 1
            if capture.hot_path:
                return hot_run(fn, args, grid, kwargs)
            # The first lines of JITFunction.run, minus the driver: the same options and binding.
            pinned = kwargs.get("enable_fp_fusion") is True
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            # (Triton 3.6 has the first knob only; each is an option wherever it is a knob)
            for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
                if hasattr(knobs.compilation, knob):
                    kwargs[knob] = getattr(knobs.compilation, knob)
            launch = Launch(fn.__name__, fn, capture.phase, (), fp_fusion_pinned=pinned)
            for cc, backend in backends.items():
                binder = binders.get((fn, cc))
                if binder is None:
                    binder = binders[(fn, cc)] = create_function_from_signature(fn.signature, fn.params, backend)
                bound_args, specialization, options = binder(*args, **kwargs)
                opts, sig, cx, attrs = fn._pack_args(backend, dict(kwargs), bound_args, specialization, options)
                launch.bound[cc] = (sig, cx, attrs, opts)
                if not launch.grid:
                    g = grid(bound_args) if callable(grid) else grid
                    launch.grid = tuple(int(x) for x in g)
                    launch.values = {k: v for k, v in bound_args.items()
                                     if isinstance(v, (int, float, bool)) or hasattr(v, "value")}
                    launch.values = {k: getattr(v, "value", v) for k, v in launch.values.items()}
            # bytes model: every tensor argument read or written once by this launch
            capture.tensor_bytes.append(sum(a.numel() * a.element_size() for a in args
                                            if isinstance(a, torch.Tensor)))
            capture.launches.append(launch)
            return None

        try:
            from triton.runtime.jit import compute_cache_key  # noqa: PLC0415
        except ImportError:  # older Triton builds the key inline
            def compute_cache_key(_cache, specialization, options):
                return str(specialization) + str(options)

        hot_cc = self.ccs[0]
        # per kernel (by identity, as Triton keeps them on the JITFunction: hashing a JITFunction
        # takes a lock and hashes its source key, which Triton's launch never does):
        # (binder, kernel-key cache, {cache key: compiled kernel stand-in})
        hot: dict = {}

        def hot_run(fn, args, grid, kwargs):
            # JITFunction.run on a cache hit, minus the driver: the per-device caches, the binding, the
            # cache key, the kernel-cache lookup, the used-globals check and the grid
            kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
            for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
                if hasattr(knobs.compilation, knob):
                    kwargs[knob] = getattr(knobs.compilation, knob)
            entry = hot.get(id(fn))
            if entry is None:
                entry = hot[id(fn)] = (create_function_from_signature(fn.signature, fn.params, backends[hot_cc]),
                                       {}, {})
            binder, key_cache, kernel_cache = entry
            bound_args, specialization, options = binder(*args, **kwargs)
            key = compute_cache_key(key_cache, specialization, options)
            kernel_cache.setdefault(key, fn)
            not_present = object()
            for (name, _), (val, globals_dict) in fn.used_global_vals.items():
                if globals_dict.get(name, not_present) != val:
                    raise RuntimeError(f"global {name} changed since {fn.__name__} was compiled")
            g = grid(bound_args) if callable(grid) else grid
            return tuple(g)

        self._saved = JITFunction.run
        JITFunction.run = run
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import JITFunction  # noqa: PLC0415

        JITFunction.run = self._saved
        return False


# aten ops that launch nothing on a GPU (allocation without fill, views, metadata)
_NO_KERNEL = frozenset({
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "view", "_unsafe_view", "as_strided",
    "t", "transpose", "permute", "expand", "detach", "detach_", "alias", "unsqueeze", "squeeze", "select", "slice",
    "split", "lift_fresh", "lift_fresh_copy", "reshape", "unbind", "_reshape_alias", "view_as", "split_with_sizes",
    "set_", "resize_", "unflatten", "flatten", "movedim", "diagonal", "narrow", "chunk", "view_as_real",
})


def _torch_ops_mode(keep_tensors: bool = False):
    """A dispatch mode that lists the aten ops a wrapper runs besides its Triton launches (each one is
    a kernel launch on a GPU). Ops on host scalars made with torch.tensor(python number) are not
    counted: on a GPU they stay on the host. Custom ops run their Python body under the mode, so
    the torch ops inside the wrappers are seen too."""
    import weakref  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch._library.custom_ops import OPDEFS  # noqa: PLC0415
    from torch.utils._python_dispatch import TorchDispatchMode  # noqa: PLC0415

    class Mode(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []
            self.host = weakref.WeakSet()
            # keep_tensors: every tensor an op makes, held (so no address is reused) for the CUDA
            # bytes model, which maps the launches' pointers to them
            self.tensors: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            qual = func._schema.name
            if qual in OPDEFS and qual.startswith("segkd::"):
                with self:
                    return OPDEFS[qual]._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            if keep_tensors:
                self.tensors += [o for o in (out if isinstance(out, (tuple, list)) else (out,))
                                 if isinstance(o, torch.Tensor)]
            name = qual.split("::")[-1]
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            if name in ("lift_fresh", "lift_fresh_copy", "scalar_tensor") or (
                    tensors and all(t in self.host for t in tensors)):
                for o in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(o, torch.Tensor):
                        self.host.add(o)
                return out
            if name not in _NO_KERNEL:
                self.ops.append(name)
            return out

    return Mode()


@contextlib.contextmanager
def _cpu_tensors_for_triton():
    """Inside the static tool only: let the triton backend accept CPU tensors (they are never
    launched on) and keep the GPU's operand dtypes where a wrapper decides by device."""
    from .. import _backends  # noqa: PLC0415
    from ..ops.cross_image_kd import api as cross_api  # noqa: PLC0415

    import torch  # noqa: PLC0415

    saved = (_backends.TRITON_INTERPRET, cross_api.compute_dtype, torch.randn, torch.rand)
    _backends.TRITON_INTERPRET = True
    # on a GPU the cross-image kernels take fp16/bf16 operands as they are
    cross_api.compute_dtype = lambda t: t.dtype
    # contents never matter (nothing runs), so skip filling hundreds of MB with random numbers
    torch.randn = lambda *a, **k: torch.empty(*a, **k)
    torch.rand = lambda *a, **k: torch.empty(*a, **k)
    try:
        yield
    finally:
        _backends.TRITON_INTERPRET, cross_api.compute_dtype, torch.randn, torch.rand = saved


def capture_case(op: str, shapes, dtype_name: str, ccs=(90, 80)):
    """Run op's public API with backend='triton', forward then backward, capturing every launch.
    Returns (launches, per-launch tensor bytes, names of the other torch ops that launch kernels)."""
    import torch  # noqa: PLC0415

    from . import cases  # noqa: PLC0415

    case = cases.CASES[op]
    dtype = getattr(torch, dtype_name)
    mode = _torch_ops_mode()
    with _cpu_tensors_for_triton(), _Capture(ccs) as cap:
        inputs = case.make(shapes, dtype, "cpu")
        _forward_backward(case, inputs, "triton", mode, lambda: setattr(cap, "phase", "backward"))
    return cap.launches, cap.tensor_bytes, mode.ops


def _forward_backward(case, inputs, backend: str, mode, between) -> list:
    """The case's public call under mode, then between(), then the backward of every output that
    requires grad with unit upstream gradients (under mode). Returns those gradients."""
    import torch  # noqa: PLC0415

    with mode:
        out = case.api(*inputs.tensors, backend=backend, **inputs.kwargs)
    between()
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = [torch.ones_like(o) for o in outs]
    if outs:
        with mode:
            torch.autograd.backward(outs, grads)
    return grads


# ----------------------------------------------------------------------------------------------
# compiling

def _ptxas_for(cc: int) -> str:
    """The ptxas Triton itself runs for this arch. Triton 3.9 ships two (its sm_90+ one is newer and
    emits PTX that the other cannot read), so the fallback must not assume the plain `ptxas`."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415
    except ImportError:  # older Triton: one bundled ptxas
        return _triton_bin("ptxas")
    return get_ptxas(cc).path


class Compiler:
    """Compiles captured launches for a cc, caching the parsed facts by Triton's kernel hash."""

    def __init__(self, cache_dir: Path):
        self.cache_dir = Path(cache_dir)
        (self.cache_dir / "facts").mkdir(parents=True, exist_ok=True)
        self.compiled = 0
        self.reused = 0

    def _index(self, launch: Launch, cc: int) -> Path:
        return self.cache_dir / "facts" / (hashlib.sha256(launch.key(cc).encode()).hexdigest()[:32] + f"_{cc}.json")

    def cached(self, launch: Launch, cc: int) -> bool:
        return self._index(launch, cc).exists()

    def facts(self, launch: Launch, cc: int) -> dict:
        import triton  # noqa: PLC0415
        from triton import knobs  # noqa: PLC0415
        from triton.backends.compiler import GPUTarget  # noqa: PLC0415
        from triton.compiler import ASTSource  # noqa: PLC0415

        sig, cx, attrs, opts = launch.bound[cc]
        index = self._index(launch, cc)
        if index.exists():
            self.reused += 1
            return json.loads(index.read_text())
        log = io.StringIO()
        saved = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(ASTSource(launch.fn, sig, cx, attrs), target=GPUTarget("cuda", cc, 32),
                                        options=opts.__dict__)
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        self.compiled += 1
        name = kernel.metadata.name
        ptxas = parse_ptxas(log.getvalue()).get(name)
        if ptxas is None:  # Triton's own cache answered: run ptxas -v on its PTX
            ptxas = self._ptxas(kernel.asm["ptx"], cc).get(name, {})
        sass = split_sass_functions(_sass_of_cubin(kernel.asm["cubin"], self.cache_dir))
        facts = dict(ptxas, smem=int(kernel.metadata.shared), num_warps=int(kernel.metadata.num_warps),
                     num_stages=int(kernel.metadata.num_stages), **sass_mix(sass.get(name, "")),
                     loops=self._loops(kernel.asm["cubin"]))
        index.write_text(json.dumps(facts))
        return facts

    def _loops(self, cubin: bytes) -> dict:
        """sass_loops of the cubin, or {"error": why} (the instruction model then has no value)."""
        try:
            return sass_loops(_sass_of_cubin(cubin, self.cache_dir, lines=True))
        except (subprocess.CalledProcessError, OSError) as err:
            return {"error": f"nvdisasm failed: {type(err).__name__}"}

    def _ptxas(self, ptx: str, cc: int) -> dict:
        with tempfile.TemporaryDirectory(dir=self.cache_dir) as tmp:
            src = Path(tmp) / "k.ptx"
            src.write_text(ptx)
            arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
            res = subprocess.run([_ptxas_for(cc), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                  f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")],
                                 capture_output=True, text=True, check=True)
        return parse_ptxas(res.stderr + res.stdout)


_CUDA_FACTS_VERSION = "4"  # bump when the facts recorded per kernel change (3: barriers per loop step)


def cuda_source_facts(src: Path, cc: int, cache_dir: Path) -> list[dict]:
    """Registers, spills, stack and shared memory of every kernel in one csrc/ source for cc
    (nvcc -cubin -Xptxas -v), with the SASS mix; cached by the source, common.cuh, cc and nvcc."""
    nvcc = _nvcc()
    text = src.read_bytes() + (REPO / "csrc" / "common.cuh").read_bytes()
    key = hashlib.sha256(text + f"{cc}{nvcc}{_CUDA_FACTS_VERSION}".encode()).hexdigest()[:24]
    cached = Path(cache_dir) / "facts" / f"cuda_{src.stem}_{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cubin = Path(tmp) / "k.cubin"
        res = subprocess.run([nvcc, "-cubin", f"-arch=sm_{cc}", "-Xptxas", "-v", "-O3", "-lineinfo",
                              "--expt-relaxed-constexpr", "-std=c++17", f"-I{REPO / 'csrc'}", str(src), "-o",
                              str(cubin)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src.name} for sm_{cc}:\n{res.stderr[-2000:]}")
        ptxas = parse_ptxas(res.stderr + res.stdout)
        sass = split_sass_functions(subprocess.run([_triton_bin("cuobjdump"), "-sass", str(cubin)],
                                                   capture_output=True, text=True).stdout)
        disasm = split_nvdisasm_functions(subprocess.run([_triton_bin("nvdisasm"), "-c", str(cubin)],
                                                         capture_output=True, text=True).stdout)
    names = _demangle(list(ptxas))
    found = [dict(facts, source=src.name, mangled=mangled, kernel=names[mangled], **sass_mix(sass.get(mangled, "")),
                  bar_per_step=barriers_per_step(sass_loops(disasm[mangled], divergence_returns=False))
                  if mangled in disasm else "")
             for mangled, facts in ptxas.items()]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(found))
    return found


def cuda_kernel_facts(cc: int, cache_dir: Path, sources=None, jobs: int | None = None) -> list[dict]:
    """cuda_source_facts of every csrc/*.cu for cc, nvcc runs in parallel; [] when nvcc is missing."""
    if _nvcc() is None:
        return []
    from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415

    sources = sources or sorted((REPO / "csrc").glob("*.cu"))
    with ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        return [f for found in pool.map(lambda src: cuda_source_facts(src, cc, cache_dir), sources) for f in found]


def short_kernel_name(demangled: str) -> str:
    """'void ns::(anonymous namespace)::k<float, false>(float const*, long)' -> 'k<float, false>'."""
    name = demangled.removeprefix("void ")
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and not name[:i].endswith("::") and name[i:].startswith("(") \
                and not name.startswith("(anonymous namespace)", i):
            name = name[:i]
            break
    return name.replace("(anonymous namespace)::", "").split("::")[-1] if "<" not in name \
        else re.sub(r"^(?:[\w]+::|\(anonymous namespace\)::)+", "", name)


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("cu++filt") or shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    res = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return {n: (out[i] if i < len(out) else n) for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# the report

def _fmt_constexprs(fn, cx: dict) -> str:
    names = [p.name for p in fn.params]
    parts = []
    for path, value in sorted(cx.items()):
        name = names[path[0]] if len(path) == 1 else str(path)
        # block sizes and flags: upper-case constexpr parameters (strides specialised to 1 are dropped)
        if name.isupper() or name.startswith("BLOCK"):
            if hasattr(value, "name"):
                value = value.name
            parts.append(f"{name}={value}")
    return ";".join(parts)


_WORK: list = []  # (launch, cc) pairs for the forked compile workers


def _compile_one(i: int, cache_dir: str):
    launch, cc = _WORK[i]
    try:
        return "ok", Compiler(Path(cache_dir)).facts(launch, cc)
    except Exception as err:  # noqa: BLE001  (a compiler failure is a result here)
        return "error", f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


def compile_all(compiler: "Compiler", pending: dict, jobs: int, log=print) -> dict:
    """{(key, cc): launch} -> {(key, cc): ("ok", facts) | ("error", message)}, compiling what the facts
    cache lacks in `jobs` forked processes (each compile is mostly single-threaded)."""
    global _WORK
    keys = list(pending)
    _WORK = [(pending[k], k[1]) for k in keys]
    todo = [i for i, (launch, cc) in enumerate(_WORK) if not compiler.cached(launch, cc)]
    results = {}
    if len(todo) > 1 and jobs > 1:
        import multiprocessing  # noqa: PLC0415

        with multiprocessing.get_context("fork").Pool(min(jobs, len(todo))) as pool:
            for i, res in zip(todo, pool.starmap(_compile_one, [(i, str(compiler.cache_dir)) for i in todo])):
                results[keys[i]] = res
    else:
        for i in todo:
            results[keys[i]] = _compile_one(i, str(compiler.cache_dir))
    compiler.compiled += len(todo)
    for i, k in enumerate(keys):
        if k not in results:
            results[k] = ("ok", compiler.facts(*_WORK[i]))
    _WORK = []
    return results


def static_rows(ops, dtypes, archs, cache_dir: Path, log=print, shape_set: str = "bench",
                jobs: int | None = None) -> list[dict]:
    import torch  # noqa: PLC0415

    from . import cases  # noqa: PLC0415

    compiler = Compiler(cache_dir)
    ccs = [ARCHS[a][0] for a in archs]
    captured = []
    for op in ops:
        case = cases.CASES[op]
        for shapes in shapes_for(case, shape_set):
            label = cases.shape_label(shapes)
            for dtype_name in dtypes:
                t0 = time.perf_counter()
                launches, tensor_bytes, torch_ops = capture_case(op, shapes, dtype_name, ccs)
                floor = case.bytes(shapes, getattr(torch, dtype_name), "full") if case.bytes else ""
                captured.append((op, label, dtype_name, launches, tensor_bytes, torch_ops, floor,
                                 math.prod(shapes[0])))
                log(f"static: captured {op:<16}{label:<34}{dtype_name:<9}{len(launches):>3} launches "
                    f"{time.perf_counter() - t0:6.1f} s")
    pending = {}
    for *_, launches, _tb, _to, _fl, _el in captured:
        for launch in launches:
            for cc in ccs:
                pending.setdefault((launch.key(cc), cc), launch)
    t0 = time.perf_counter()
    results = compile_all(compiler, pending, jobs or os.cpu_count() or 1, log)
    log(f"static: {len(pending)} distinct kernels x arch, {compiler.compiled} compiled "
        f"({time.perf_counter() - t0:.0f} s), the rest from the cache ({cache_dir})")

    rows = []
    for op, label, dtype_name, launches, tensor_bytes, torch_ops, floor, elements in captured:
        for arch in archs:
            cc, sms, _ = ARCHS[arch]
            groups: dict = {}
            for launch in launches:
                groups.setdefault((launch.phase, launch.key(cc), launch.grid), []).append(launch)
            per_phase: dict = {"forward": 0, "backward": 0}
            unknown: list[str] = []
            for (phase, key, grid), members in groups.items():
                launch, count = members[0], len(members)
                base = dict(row="kernel", arch=arch, kind="triton", op=op, shape=label, dtype=dtype_name, phase=phase,
                            kernel=launch.kernel, launches=count,
                            constexprs=_fmt_constexprs(launch.fn, launch.bound[cc][1]),
                            grid="x".join(map(str, grid)), ctas=math.prod(grid),
                            fp_fusion_pinned=launch.fp_fusion_pinned)
                status, f = results[(key, cc)]
                if status != "ok":
                    rows.append(dict(base, note=f"COMPILE FAILED: {f}"))
                    log(f"static: {op} {label} {dtype_name} {launch.kernel} {arch}: compile failed ({f})")
                    continue
                per_sm, warps, occ = occupancy(cc, f.get("regs", 0), f["smem"], f["num_warps"])
                waves = base["ctas"] / (per_sm * sms) if per_sm else float("inf")
                instr, why = launch_instructions(members, f)
                if instr is None:
                    unknown.append(f"{launch.kernel}: {why}")
                    per_phase[phase] = None
                elif per_phase.get(phase, 0) is not None:
                    per_phase[phase] = per_phase.get(phase, 0) + instr
                rows.append(dict(
                    base, instr_per_elem=round(instr / elements, 1) if instr is not None else "", num_warps=f["num_warps"], num_stages=f["num_stages"], regs=f.get("regs", ""),
                    spill_stores=f.get("spill_stores", ""), spill_loads=f.get("spill_loads", ""),
                    stack=f.get("stack", ""), smem=f["smem"], ctas_per_sm=per_sm, warps_per_sm=warps,
                    occupancy=round(occ, 3), waves=round(waves, 2), bar_per_step=_triton_bar_per_step(f),
                    **{k: f[k] for k in sass_mix("")}))
            model = sum(tensor_bytes)
            bars = [r["bar_per_step"] for r in rows if r["row"] == "kernel" and r["arch"] == arch and r["op"] == op
                    and r["shape"] == label and r["dtype"] == dtype_name and r.get("bar_per_step", "") != ""]
            rows.append(dict(
                row="op", arch=arch, kind="triton", op=op, shape=label, dtype=dtype_name, phase="full",
                kernel="(all launches)", launches=len(launches), bytes_model=model, bytes_floor=floor,
                model_over_floor=round(model / floor, 2) if floor else "",
                kernel_launches=len(launches) + len(torch_ops), torch_ops=len(torch_ops),
                instr_per_elem_fwd=_per_elem(per_phase["forward"], elements),
                instr_per_elem_bwd=_per_elem(per_phase["backward"], elements),
                bar_per_step=max(bars) if bars else "",
                note="torch ops: " + (" ".join(torch_ops) or "none")
                     + "; bytes_model: every tensor argument of every Triton launch read or written once"
                     + "".join(f"; no instruction model for {u}" for u in unknown)))
    return rows


def _triton_bar_per_step(facts: dict):
    """barriers_per_step of a compiled Triton kernel from its SASS loops ("" without them). The
    loops were found with divergence_returns=True: a warp collective's divergent fallback would
    count as a loop, so the value can only be too high, never too low."""
    loops = facts.get("loops")
    if not isinstance(loops, dict) or "error" in loops or "loops" not in loops:
        return ""
    return barriers_per_step(loops)


def launch_instructions(launches, facts: dict) -> tuple[int | None, str]:
    """Modelled dynamic thread-instructions of launches of one compiled kernel: per launch, the
    warp-instructions of one program (dynamic_instructions) x 32 lanes x num_warps x programs."""
    if "loops" not in facts or "error" in facts["loops"]:
        return None, facts.get("loops", {}).get("error", "no SASS loop facts")
    total = 0
    for launch in launches:
        try:
            per_program, why = dynamic_instructions(launch.fn, facts["loops"], launch.values, launch.grid)
        except (OSError, SyntaxError, KeyError, ValueError, TypeError) as err:  # a source the model cannot read
            return None, f"model failed: {type(err).__name__}: {err}"
        if per_program is None:
            return None, why
        total += per_program * 32 * facts["num_warps"] * math.prod(launch.grid)
    return total, ""


def _per_elem(instr, elements: int):
    return "" if instr is None else round(instr / elements, 1)


def cuda_rows(archs, cache_dir: Path, log=print) -> list[dict]:
    rows = []
    for arch in archs:
        cc = ARCHS[arch][0]
        for f in cuda_kernel_facts(cc, cache_dir):
            rows.append(dict(row="kernel", arch=arch, kind="cuda", op=f["source"].removesuffix(".cu"),
                             kernel=short_kernel_name(f["kernel"]), regs=f["regs"], spill_stores=f["spill_stores"],
                             spill_loads=f["spill_loads"], stack=f["stack"], smem=f["smem"],
                             **{k: f[k] for k in sass_mix("")},
                             note="block size and grid are chosen by the host code at run time"))
    if not rows:
        log("static: nvcc not found, CUDA kernels skipped")
    return rows


# ----------------------------------------------------------------------------------------------
# CUDA launches: the real launchers of csrc/, run by the host execution layer in its recording mode

# The ops whose CUDA launches the report records (the memory-bound ops with a cuda backend).
CUDA_OPS = ("channel_wise_kd", "pixel_kd", "pfs_pixel_kd", "spatial_pool", "channel_pool", "cbam_gate", "attnfd_loss")
# How csrc/ spells each dtype in a kernel's template argument (nvcc's demangled names).
_CUDA_TYPE = {"float32": "float", "bfloat16": "__nv_bfloat16", "float16": "__half"}
# Kernels whose last pointer argument is the backward's upstream-gradient multiplier: every thread
# reads it first and returns when it is exactly 1 (the saved gradient is then the answer already).
# With the report's unit upstream gradient such a launch moves that one value and nothing else.
UNIT_MULTIPLIER_EXITS = frozenset({
    "saved_grad_scale_kernel", "channel_wise_kd_kernel", "channel_wise_kd_split_stats_kernel",
    "channel_wise_kd_split_finish_kernel", "channel_wise_kd_stream_kernel", "pixel_kd_kernel",
})


def _cwd_row_reads(block: tuple, shapes, dtype_name: str, pointers) -> int:
    """channel_wise_kd_kernel (csrc/channel_wise_kd.cu): with a gradient to write, a row longer than
    the kCacheItems (8) values of s and t per thread it keeps in registers is read a second time
    for the gradient; one read otherwise."""
    import torch  # noqa: PLC0415

    _n, _c, h, w = shapes[0]
    vec = 16 // torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
    cached = h * w <= block[0] * vec * max(1, 8 // vec)
    return 2 if pointers[3][0] != 0 and not cached else 1


# Kernels that read their inputs (pointers to const) more than once, by the launch's shape: the
# reads of each such tensor. Every other launch reads each tensor once.
INPUT_READS = {"channel_wise_kd_kernel": _cwd_row_reads}
# Kernels that read their inputs twice by design, the second read relying on L2 (the L2 model):
# counted as one read, with the assumption stated in the op row's note.
# channel_wise_kd_stream_kernel: a row group (a quarter of the device's L2, from
# cudaDevAttrL2CacheSize) is read by its statistics items and again, one group later, by its
# gradient items; between the two lie the next group's statistics read and the group's gradient
# writes, about 2.5 groups, so the second read is taken as an L2 hit (as for the Triton
# _cwd_stream_kernel, docs/performance.md).
L2_REREADS = {
    "channel_wise_kd_stream_kernel": "channel_wise_kd_stream_kernel reads s and t twice; the second read "
                                     "(a row group of a quarter of the L2, re-read one group later) counted "
                                     "as an L2 hit",
}
# Kernels whose grid is sized to the resident slots of the device and that stride over the work
# (a persistent grid: one wave by design, no tail); their rows say "persistent" instead of waves
# when the grid does fit. saved_grad_scale_kernel and attnfd_dots_kernel stride too, but over
# grids capped at 2 waves / 4,096 blocks, which the waves column shows.
# channel_wise_kd_stream_kernel: kStreamBlocksPerSm (4) blocks per SM, guaranteed by its launch
# bounds; its work is handed out by an atomic ticket.
PERSISTENT_KERNELS: frozenset = frozenset({"channel_wise_kd_stream_kernel"})
# Device L2 sizes the launchers read (cudaDevAttrL2CacheSize): H100 SXM / H200 50 MiB, A100 40 MiB.
L2_BYTES = {"sm_90": 50 * 1024 * 1024, "sm_80": 40 * 1024 * 1024}


@dataclass
class CudaLaunch:
    kernel: str          # the kernel as nvcc names it, e.g. pixel_kd_kernel<float>
    phase: str
    grid: tuple
    block: tuple
    smem: int            # dynamic shared memory
    bytes: int           # bytes the launch moves (the model, see cuda_launch_bytes)
    note: str = ""


def _cuda_kernel_name(recorded: str, dtype_name: str) -> str:
    """SEGKD_LAUNCH's spelling (kernel<T>) -> the instantiation's name for the case's dtype."""
    return re.sub(r"\bT\b", _CUDA_TYPE[dtype_name], recorded.replace(" ", "")).replace(",", ", ")


def cuda_launch_bytes(kernel: str, pointers, storages, input_reads: int = 1) -> tuple[int, str]:
    """The bytes one recorded launch moves: every distinct tensor its pointer arguments point into,
    read or written once in full (the tensor's storage extent; the tensors it only reads, through
    pointers to const, input_reads times), except that a kernel of UNIT_MULTIPLIER_EXITS given a
    multiplier of exactly 1 moves only that value. storages: (start, end, tensor) of every tensor
    of the case. Returns (bytes, note)."""
    found = []
    for address, _writes in pointers:
        if address == 0:
            found.append(None)
            continue
        hit = [(a, b, t) for a, b, t in storages if a <= address < b]
        if not hit:
            return 0, f"{kernel}: pointer {address:#x} is in no tensor of the case"
        found.append(hit[-1])
    base = kernel.split("<")[0]
    if base in UNIT_MULTIPLIER_EXITS and found and found[-1] is not None:
        mult = found[-1][2]
        if mult.numel() >= 1 and float(mult.reshape(-1)[0]) == 1.0:
            return mult.element_size(), ""
    seen, written = {}, set()
    for f, (_address, writes) in zip(found, pointers):
        if f is not None:
            seen[f[0]] = f[1] - f[0]
            if writes:
                written.add(f[0])
    return sum(n * (1 if start in written else input_reads) for start, n in seen.items()), ""


BULK_FRACTION = 0.05  # a launch moving at least this share of an op's bytes is one of its bulk launches


def op_summary(kernel_rows: list[dict], model: int) -> dict:
    """An op row's grid facts from its kernel rows: waves = the fewest waves of a bulk launch (one
    that moves at least BULK_FRACTION of the op's modelled bytes; finishing launches over a few
    KiB of partial sums are left out), "persistent" where every bulk launch is; bar_per_step = the
    most of any launch; spills summed over them."""
    bulk = [r for r in kernel_rows if model and int(r.get("bytes_model") or 0) >= BULK_FRACTION * model]
    waves = [r["waves"] for r in bulk if r.get("waves", "") != ""]
    numeric = [float(w) for w in waves if w != "persistent"]
    bars = [int(r["bar_per_step"]) for r in kernel_rows if str(r.get("bar_per_step", "")) != ""]
    return dict(
        waves=min(numeric) if numeric else ("persistent" if waves else ""),
        bar_per_step=max(bars) if bars else "",
        spill_stores=sum(int(r.get("spill_stores") or 0) for r in kernel_rows),
        spill_loads=sum(int(r.get("spill_loads") or 0) for r in kernel_rows))


def capture_cuda_case(op: str, shapes, dtype_name: str, sms: int, l2: int | None = None):
    """Run op's public API with backend='cuda' through the host execution layer in its recording
    mode, forward then backward (unit upstream gradient), with the device's SM count (and L2 size
    in bytes, when given): every launch
    the real launchers make is recorded (name, grid, block, dynamic smem, pointer arguments) and
    none runs. Returns (launches, names of the other torch ops, notes)."""
    import torch  # noqa: PLC0415

    from .. import _backends  # noqa: PLC0415
    from . import cases  # noqa: PLC0415

    lib, why = _backends.host_library()
    if lib is None:
        raise RuntimeError(why)
    case = cases.CASES[op]
    dtype = getattr(torch, dtype_name)
    from ..ops import _saved_grad  # noqa: PLC0415
    from torch.utils._python_dispatch import _disable_current_modes  # noqa: PLC0415

    mode = _torch_ops_mode(keep_tensors=True)
    launches, notes, records = [], [], {}
    lib.host_reset()
    lib.host_set_attribute("multiprocessor_count", sms)
    if l2 is not None:
        lib.host_set_attribute("l2_cache_size", l2)
    traced = _saved_grad._traced

    def traced_besides_the_observer(ds):
        # the op-listing mode only watches: the backward must take its untraced path (the
        # in-place kernels), as it does in a training step
        with _disable_current_modes():
            return traced(ds)

    _saved_grad._traced = traced_besides_the_observer
    try:
        with _cpu_tensors_for_triton(), _backends.host_execution(lib):
            inputs = case.make(shapes, dtype, "cpu")
            lib.host_set_record_only(True)

            def forward_done():
                records["forward"] = lib.host_records()
                lib.host_set_record_only(True)  # (clears the records)

            grads = _forward_backward(case, inputs, "cuda", mode, forward_done)
            records["backward"] = lib.host_records()
            tensors = list(inputs.tensors) + list(grads) + mode.tensors
            storages = []
            for t in tensors:
                st = t.untyped_storage()
                if st.nbytes():
                    storages.append((st.data_ptr(), st.data_ptr() + st.nbytes(), t))
            for phase in ("forward", "backward"):
                for r in records[phase]:
                    name = _cuda_kernel_name(r["name"], dtype_name)
                    reads = INPUT_READS.get(name.split("<")[0])
                    nbytes, note = cuda_launch_bytes(
                        name, r["pointers"], storages,
                        reads(tuple(r["block"]), shapes, dtype_name, r["pointers"]) if reads else 1)
                    if note:
                        notes.append(note)
                    l2_note = L2_REREADS.get(name.split("<")[0])
                    if l2_note and nbytes > 8 and l2_note not in notes:
                        notes.append(l2_note)
                    launches.append(CudaLaunch(name, phase, tuple(r["grid"]), tuple(r["block"]), int(r["smem"]),
                                               nbytes, note))
    finally:
        _saved_grad._traced = traced
        lib.host_reset()
    return launches, mode.ops, notes


def cuda_op_rows(ops, dtypes, archs, cache_dir: Path, log=print, shape_set: str = "bench") -> list[dict]:
    """Kernel rows (grid, block, occupancy, waves, barriers per loop step) and one op row (bytes model
    next to the inherent floor, launches) per op x shape x dtype x arch for the CUDA backend."""
    import torch  # noqa: PLC0415

    from . import cases  # noqa: PLC0415

    from .._backends import host_library  # noqa: PLC0415

    if _nvcc() is None:
        log("static: nvcc not found, CUDA launches skipped")
        return []
    if host_library()[0] is None:
        log(f"static: CUDA launches skipped: {host_library()[1]}")
        return []
    rows = []
    for arch in archs:
        cc, sms, _ = ARCHS[arch]
        facts = {}
        for f in cuda_kernel_facts(cc, cache_dir):
            facts[short_kernel_name(f["kernel"]).replace(" ", "")] = f
        for op in ops:
            if op not in CUDA_OPS:
                continue
            case = cases.CASES[op]
            for shapes in shapes_for(case, shape_set):
                label = cases.shape_label(shapes)
                for dtype_name in dtypes:
                    launches, torch_ops, notes = capture_cuda_case(op, shapes, dtype_name, sms, L2_BYTES.get(arch))
                    floor = case.bytes(shapes, getattr(torch, dtype_name), "full") if case.bytes else ""
                    groups: dict = {}
                    for ln in launches:
                        groups.setdefault((ln.phase, ln.kernel, ln.grid, ln.block, ln.smem), []).append(ln)
                    for (phase, kernel, grid, block, smem), members in groups.items():
                        f = facts.get(kernel.replace(" ", ""))
                        threads = math.prod(block)
                        base = dict(row="kernel", arch=arch, kind="cuda", op=op, shape=label, dtype=dtype_name,
                                    phase=phase, kernel=kernel, launches=len(members), grid="x".join(map(str, grid)),
                                    ctas=math.prod(grid), block="x".join(map(str, block)),
                                    num_warps=-(-threads // 32), bytes_model=sum(m.bytes for m in members))
                        if f is None:
                            rows.append(dict(base, note=f"no ptxas facts for {kernel}"))
                            continue
                        per_sm, warps, occ = occupancy(cc, f["regs"], f["smem"] + smem, base["num_warps"])
                        slots = per_sm * sms
                        waves = base["ctas"] / slots if slots else float("inf")
                        persistent = kernel.split("<")[0] in PERSISTENT_KERNELS and base["ctas"] <= slots
                        rows.append(dict(
                            base, regs=f["regs"], spill_stores=f["spill_stores"], spill_loads=f["spill_loads"],
                            stack=f["stack"], smem=f["smem"] + smem, ctas_per_sm=per_sm, warps_per_sm=warps,
                            occupancy=round(occ, 3), waves="persistent" if persistent else round(waves, 2),
                            bar_per_step=f.get("bar_per_step", ""), **{k: f[k] for k in sass_mix("")},
                            note=f"{f['source']}; bytes_model: the launches' tensors, each read or written once"))
                    model = sum(ln.bytes for ln in launches)
                    mine = [r for r in rows if r["row"] == "kernel" and r["arch"] == arch and r["op"] == op
                            and r["shape"] == label and r["dtype"] == dtype_name]
                    rows.append(dict(
                        row="op", arch=arch, kind="cuda", op=op, shape=label, dtype=dtype_name, phase="full",
                        kernel="(all launches)", launches=len(launches), bytes_model=model, bytes_floor=floor,
                        model_over_floor=round(model / floor, 3) if floor else "", **op_summary(mine, model),
                        kernel_launches=len(launches) + len(torch_ops), torch_ops=len(torch_ops),
                        note="torch ops: " + (" ".join(torch_ops) or "none")
                             + "; bytes_model: every tensor a CUDA launch points into, read or written once "
                               "(a launch that returns on a unit upstream gradient: that one value)"
                             + "".join(f"; {n}" for n in notes)))
                    log(f"static: cuda {arch} {op:<16}{label:<22}{dtype_name:<9}{len(launches):>3} launches, "
                        f"model / floor {rows[-1]['model_over_floor']}")
    return rows


# -- CUDA kernels with a known launch plan --------------------------------------------------------
# The CUDA launchers pick blocks and grids at run time, so their kernels have no launch to read
# trip counts from. An op that knows its own plan (ops/<op>/cuda.py `static_plan`: per kernel, the
# number of blocks, warps per block, and trips per warp of each SASS loop, named by the loop
# variable of its `for`) gets the same instruction model as the Triton kernels: SASS loops from
# nvdisasm, matched to the innermost `for` of the .cu source (loops under `#pragma unroll` are
# unrolled, no SASS loop) that holds at least half of their lines.

_CU_FOR = re.compile(r"\bfor\s*\(\s*(?:const\s+)?(?:int|int64_t|unsigned|auto)\s+(\w+)")


def cu_source_loops(text: str) -> dict[int, tuple[int, int, str]]:
    """{line of a `for`: (first line, last line, loop variable)} of the loops of a .cu source that
    are not fully unrolled; the span runs to the brace that closes the loop's body."""
    lines = text.splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = _CU_FOR.search(line)
        if not m or (i and lines[i - 1].strip() == "#pragma unroll"):
            continue
        depth, end, opened = 0, i, False
        for j in range(i, len(lines)):
            for ch in lines[j][m.end() if j == i else 0:]:
                if ch == "{":
                    depth, opened = depth + 1, True
                elif ch == "}":
                    depth -= 1
            if opened and depth <= 0:
                end = j
                break
            if not opened and lines[j].rstrip().endswith(";") and j > i:  # a body without braces
                end = j
                break
        out[i + 1] = (i + 1, end + 1, m.group(1))
    return out


def cu_kernel_instructions(loops: dict, src: Path, trips: dict[str, float]) -> tuple[float | None, str]:
    """Modelled warp-instructions per block of one CUDA kernel: `loops` from sass_loops, `trips`
    {loop variable: trips per warp}; loops of other files (inlined helpers) count as their
    enclosing loop's body."""
    spans = cu_source_loops(src.read_text())
    parent = {}
    for chain, _n in loops["segments"]:
        for depth, i in enumerate(chain):
            parent[i] = chain[depth - 1] if depth else None
    trip_of = {}
    for i, loop in enumerate(loops["loops"]):
        mine = {int(k): n for f, d in loop["lines"].items() if Path(f).name == src.name for k, n in d.items()}
        total = sum(mine.values())
        best = None
        for line, (lo, hi, var) in spans.items():
            inside = sum(n for k, n in mine.items() if lo <= k <= hi)
            if total and inside * 2 >= total and (best is None or hi - lo < spans[best][1] - spans[best][0]):
                best = line
        if best is None:
            return None, f"SASS loop {i} matches no loop of {src.name}"
        var = spans[best][2]
        if var not in trips:
            return None, f"no trip count for the loop over {var} ({src.name}:{best})"
        trip_of[i] = trips[var]
    return sum(n * math.prod(trip_of[i] for i in chain) for chain, n in loops["segments"]), ""


def _cu_function_sass(disasm: str) -> dict[str, str]:
    """nvdisasm -g output of a cubin -> {mangled function name: its text}."""
    out, name, buf = {}, None, []
    for line in disasm.splitlines():
        m = re.match(r"\s*\.text\.(\S+?):?\s*$", line) or re.match(r"\s*\.section\s+\.text\.([^,\s]+)", line)
        if m and m.group(1) != name:
            if name is not None:
                out.setdefault(name, "\n".join(buf))
            name, buf = m.group(1), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out.setdefault(name, "\n".join(buf))
    return out


def cu_planned_rows(op: str, archs, cache_dir: Path, log=print) -> list[dict]:
    """Op rows (kind cuda) with instr_per_elem_fwd / _bwd for an op whose cuda.py has a
    `static_plan(shapes, dtype_name)` -> {phase: [(part of the kernel name, blocks, warps, trips)]};
    instructions per element of the first input, as for the Triton rows."""
    import importlib  # noqa: PLC0415

    from . import cases  # noqa: PLC0415

    try:
        plan_of = getattr(importlib.import_module(f"segkd_kernels.ops.{op}.cuda"), "static_plan", None)
    except ModuleNotFoundError:  # a benchmark variant (e.g. ssim_kd_valid), not an op package
        return []
    nvcc = _nvcc()
    if plan_of is None or nvcc is None:
        return []
    src = REPO / "csrc" / f"{op}.cu"
    rows = []
    for arch in archs:
        cc = ARCHS[arch][0]
        text = src.read_bytes() + (REPO / "csrc" / "common.cuh").read_bytes()
        key = hashlib.sha256(text + f"{cc}{nvcc}loops".encode()).hexdigest()[:24]
        cached = Path(cache_dir) / "facts" / f"cuda_loops_{src.stem}_{key}.json"
        if cached.exists():
            loops = json.loads(cached.read_text())
        else:
            with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
                cubin = Path(tmp) / "k.cubin"
                subprocess.run([nvcc, "-cubin", f"-arch=sm_{cc}", "-O3", "-lineinfo", "--expt-relaxed-constexpr",
                                "-std=c++17", f"-I{REPO / 'csrc'}", str(src), "-o", str(cubin)], check=True,
                               capture_output=True)
                funcs = _cu_function_sass(_sass_of_cubin(cubin.read_bytes(), Path(tmp), lines=True))
            names = _demangle(list(funcs))
            loops = {names[m]: sass_loops(t) for m, t in funcs.items()}
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_text(json.dumps(loops))
        for shapes in cases.CASES[op].shapes:
            elements = math.prod(shapes[0])
            for dtype_name in DTYPE_NAMES:
                per_phase, notes = {}, []
                for phase, kernels in plan_of(shapes, dtype_name).items():
                    total = 0.0
                    for prefix, blocks, warps, trips in kernels:
                        found = [k for k in loops if prefix in k]
                        instr, why = cu_kernel_instructions(loops[found[0]], src, trips) if found else (
                            None, f"{prefix} not in the cubin")
                        if instr is None:
                            notes.append(why)
                            total = None
                            break
                        total += instr * 32 * warps * blocks
                    per_phase[phase] = total
                rows.append(dict(
                    row="op", arch=arch, kind="cuda", op=op, shape=cases.shape_label(shapes), dtype=dtype_name,
                    phase="full", kernel="(planned launches)",
                    instr_per_elem_fwd=_per_elem(per_phase.get("forward"), elements),
                    instr_per_elem_bwd=_per_elem(per_phase.get("backward"), elements),
                    note="instruction model from the launch plan of ops/" + op + "/cuda.py static_plan"
                         + "".join(f"; no instruction model for {n}" for n in notes)))
    return rows


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in COLUMNS})


def run_static(ops, dtypes=DTYPE_NAMES, archs=tuple(ARCHS), out_dir: Path = DEFAULT_CSV, cache_dir: Path | None = None,
               cuda: bool = True, log=print, shape_set: str = "bench", triton: bool = True) -> dict[str, Path]:
    """Capture, compile and write static_<arch>.csv per arch; returns {arch: path}. triton=False
    recomputes only the CUDA rows and keeps the Triton rows of the CSVs already in out_dir."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir or out_dir / ".static_cache")
    cache_dir.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    if triton:
        rows = static_rows(ops, dtypes, archs, cache_dir, log, shape_set)
    else:
        rows = []
        for arch in archs:
            old = out_dir / f"static_{arch.replace('_', '')}.csv"
            if old.exists():
                with open(old, newline="") as fh:
                    rows += [r for r in csv.DictReader(fh) if r["kind"] == "triton"]
    if cuda:
        rows += cuda_rows(archs, cache_dir, log)
        rows += cuda_op_rows(ops, dtypes, archs, cache_dir, log, shape_set)
        for op in ops:
            rows += cu_planned_rows(op, archs, cache_dir, log)
    paths = {}
    for arch in archs:
        paths[arch] = out_dir / f"static_{arch.replace('_', '')}.csv"
        write_csv([r for r in rows if r["arch"] == arch], paths[arch])
        log(f"wrote {paths[arch]}")
    log(f"static report: {time.perf_counter() - t0:.0f} s")
    return paths


def main(argv=None) -> int:
    """Entry point of `segkd bench --static` (always in a process without TRITON_INTERPRET)."""
    import argparse  # noqa: PLC0415

    from . import cases  # noqa: PLC0415

    p = argparse.ArgumentParser(prog="segkd bench --static")
    p.add_argument("--ops", default=",".join(cases.CASES))
    p.add_argument("--dtypes", default=",".join(DTYPE_NAMES))
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--out-dir", type=Path, default=DEFAULT_CSV)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--shapes", choices=SHAPE_SETS, default="bench")
    p.add_argument("--cuda-only", action="store_true",
                   help="recompute only the CUDA rows, keeping the Triton rows of the CSVs in --out-dir")
    a = p.parse_args(argv)
    run_static([o for o in a.ops.split(",") if o], [d for d in a.dtypes.split(",") if d],
               [x for x in a.archs.split(",") if x], a.out_dir, a.cache_dir, cuda=not a.no_cuda,
               shape_set=a.shapes, triton=not a.cuda_only)
    return 0


def spawn(ops, dtypes, out_dir, cache_dir=None, cuda=True, archs=tuple(ARCHS)) -> int:
    """Run the static report in a fresh process with TRITON_INTERPRET unset."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "segkd_kernels.bench.static", "--ops", ",".join(ops), "--dtypes", ",".join(dtypes),
           "--archs", ",".join(archs), "--out-dir", str(out_dir)]
    if cache_dir:
        cmd += ["--cache-dir", str(cache_dir)]
    if not cuda:
        cmd.append("--no-cuda")
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("segkd bench --static: TRITON_INTERPRET=1 is set; the static report compiles real kernels")
    sys.exit(main())
