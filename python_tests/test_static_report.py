"""CI gates from `segkd bench --static` (compile-only, no GPU): every Triton kernel compiles for sm_80
and sm_90 at every plan its wrapper picks, every launch pins FP fusion, and no Triton or CUDA kernel
spills registers except the entries of KNOWN_SPILLS.

KNOWN_SPILLS names exactly the (kind, op, kernel, arch, dtype) entries that spill today. The gate fails
on a spill not in the list and on a listed entry that no longer spills, so the list can only shrink:
delete an entry when its kernel is fixed. CUDA entries have dtype "" (one source serves every dtype;
the kernel name carries the instantiation).

The compiles run in a child process with TRITON_INTERPRET unset (this test process runs the kernels
through the interpreter, which replaces every kernel by a Python function). The default run compiles the
small odd shapes of every op and every CUDA kernel; the sweep over the benchmark shapes, which also
requires every listed entry to still spill, is `slow`; test_committed_csvs_within_known_spills holds
the committed benchmark-shape report against the list in the default run.
Compiled kernels and their facts are cached under benchmarks/results/.static_cache, so a rerun on an
unchanged tree takes seconds.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from segkd_kernels.bench import static

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "results" / ".static_cache"

# Today's spills (ptxas -v, spill stores + loads > 0). Fix a kernel, then delete its entries.
KNOWN_SPILLS: set = set()


# Spills are facts of one compiler: the list holds for these versions (Triton's bundled ptxas and
# nvcc); with other versions the gate still compiles everything and checks FP fusion, but does not
# hold the list against another compiler's register allocation.
KNOWN_SPILLS_TRITON = "3.9."
KNOWN_SPILLS_NVCC = "release 13.0"


def _compilers_as_recorded() -> tuple[str, ...]:
    kinds = []
    import triton  # noqa: PLC0415

    if triton.__version__.startswith(KNOWN_SPILLS_TRITON):
        kinds.append("triton")
    nvcc = static._nvcc()
    if nvcc and KNOWN_SPILLS_NVCC in subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout:
        kinds.append("cuda")
    return tuple(kinds)


def _triton_compiles():
    try:
        import triton  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _triton_compiles(), reason="triton is not installed")


def _run_static(tmp: Path, shape_set: str, cuda: bool) -> dict[str, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "segkd_kernels.bench.static", "--shapes", shape_set, "--out-dir", str(tmp),
           "--cache-dir", str(CACHE)]
    if not cuda:
        cmd.append("--no-cuda")
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, f"static report failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    out = {}
    for arch in static.ARCHS:
        with open(tmp / f"static_{arch.replace('_', '')}.csv", newline="") as fh:
            out[arch] = list(csv.DictReader(fh))
    return out


def _spill_entries(rows_by_arch) -> set:
    found = set()
    for arch, rows in rows_by_arch.items():
        for r in rows:
            if r["row"] != "kernel":
                continue
            if int(r["spill_stores"] or 0) + int(r["spill_loads"] or 0) > 0:
                found.add((r["kind"], r["op"], r["kernel"], arch, r["dtype"]))
    return found


def _check(rows_by_arch, *, every_known_seen: bool, kinds=("triton", "cuda")) -> None:
    from segkd_kernels.bench import cases  # noqa: PLC0415

    for arch, rows in rows_by_arch.items():
        kernels = [r for r in rows if r["row"] == "kernel" and r["kind"] == "triton"]
        # every op launched Triton kernels, and each was compiled (registers known) for this arch
        assert {r["op"] for r in kernels} == set(cases.CASES), arch
        for r in kernels:
            assert not r["note"].startswith("COMPILE FAILED"), (arch, r["op"], r["shape"], r["dtype"], r["kernel"],
                                                                r["note"])
            assert int(r["regs"]) > 0 and int(r["sass_total"]) > 0, (arch, r["op"], r["kernel"])
            assert r["fp_fusion_pinned"] == "True", f"{r['op']} {r['kernel']}: launch does not pass **FP_FUSION"
            assert int(r["ctas_per_sm"]) >= 1, f"{r['op']} {r['kernel']} {arch}: does not fit on an SM"
        # the instruction model: a value per phase that launches Triton kernels, or the reason why not
        # (CUDA op rows have no instruction model: their launches are recorded, not compiled per plan)
        for r in rows:
            if r["row"] == "op" and r["kind"] == "triton":
                for col in ("instr_per_elem_fwd", "instr_per_elem_bwd"):
                    assert (r[col] != "" and float(r[col]) >= 0) or "no instruction model" in r["note"], \
                        (arch, r["op"], r["shape"], r["dtype"], col, r["note"])
    found = {e for e in _spill_entries(rows_by_arch) if e[0] in kinds}
    known = {e for e in KNOWN_SPILLS if e[0] in kinds}
    new = sorted(found - known)
    assert not new, f"register spills not in KNOWN_SPILLS: {new}"
    if every_known_seen:
        fixed = sorted(known - found)
        assert not fixed, f"no longer spill, delete from KNOWN_SPILLS: {fixed}"


@needs_triton
def test_gate_compiles_and_no_new_spills(tmp_path):
    """Fast subset: the small odd shapes of every op, fp32 and bf16, both archs, and every CUDA kernel."""
    rows = _run_static(tmp_path, "quick", cuda=static._nvcc() is not None)
    kinds = _compilers_as_recorded()
    _check(rows, every_known_seen=False, kinds=kinds)
    # CUDA kernels do not depend on shapes: every listed CUDA entry must still spill. (Triton plans
    # do; the slow sweep holds every Triton entry against the benchmark shapes.)
    if "cuda" in kinds:
        fixed = sorted({e for e in KNOWN_SPILLS if e[0] == "cuda"} - _spill_entries(rows))
        assert not fixed, f"no longer spill, delete from KNOWN_SPILLS: {fixed}"


@pytest.mark.slow
@needs_triton
def test_gate_full_benchmark_sweep(tmp_path):
    rows = _run_static(tmp_path, "all", cuda=static._nvcc() is not None)
    _check(rows, every_known_seen=True, kinds=_compilers_as_recorded())


def test_committed_csvs_within_known_spills():
    """The committed report (benchmark shapes) spills only where the list says."""
    rows = {}
    for arch in static.ARCHS:
        path = REPO / "benchmarks" / "results" / f"static_{arch.replace('_', '')}.csv"
        with open(path, newline="") as fh:
            rows[arch] = list(csv.DictReader(fh))
    assert _spill_entries(rows) <= KNOWN_SPILLS


# ---- the pure parts of the report -----------------------------------------------------------------

def test_occupancy_limits():
    # 255 registers -> 8192 per warp -> 2 warps per scheduler, 8 per SM: one 8-warp CTA, or two 4-warp
    assert static.occupancy(90, 255, 0, 8) == (1, 8, 8 / 64)
    assert static.occupancy(90, 255, 0, 4) == (2, 8, 8 / 64)
    # 32 registers, 4 warps: the 64-warp limit (16 CTAs) binds before registers (16 warps/scheduler)
    assert static.occupancy(80, 32, 0, 4) == (16, 64, 1.0)
    # shared memory: 100 KiB per CTA fits twice in sm_90's 228 KiB, once in sm_80's 164 KiB
    assert static.occupancy(90, 32, 100 * 1024, 4)[0] == 2
    assert static.occupancy(80, 32, 100 * 1024, 4)[0] == 1
    # 1 warp per CTA: the 32-CTA limit binds
    assert static.occupancy(90, 16, 0, 1) == (32, 32, 0.5)


def test_parse_ptxas_and_sass():
    log = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    24 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1fPf' for 'sm_80'
ptxas info    : Function properties for _Z1fPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""
    facts = static.parse_ptxas(log)
    assert facts["_k"] == dict(regs=255, spill_stores=12, spill_loads=16, stack=24, smem=4096)
    assert facts["_Z1fPf"] == dict(regs=40, spill_stores=0, spill_loads=0, stack=0, smem=0)
    sass = """
        Function : _k
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0460*/               @P5 LDG.E.128 R12, desc[UR14][R20.64] ;   /* 0x0000000e140c5981 */
        /*0470*/              @!P1 LDG.E R8, desc[UR14][R22.64] ;        /* 0x0000000e16081981 */
        /*0480*/                   LDG.E.U16 R9, desc[UR14][R22.64] ;    /* 0x0000000e16081981 */
        /*0490*/                   LDG.E.64 R10, desc[UR14][R22.64] ;    /* 0x0000000e16081981 */
        /*04a0*/                   FFMA R2, R3, R4, R5 ;                 /* 0x0000000403027223 */
        /*04b0*/                   HGMMA.64x64x16.F32 R24, gdesc[UR4], RZ ; /* 0x0 */
        /*04c0*/                   MUFU.EX2 R51, R37 ;                   /* 0x0000002500337308 */
        /*04d0*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;         /* 0x0000000000007b1d */
        /*04e0*/                   STL [R1], R2 ;                        /* 0x0 */
        /*04f0*/                   LDL R2, [R1] ;                        /* 0x0 */
        /*0500*/                   STG.E desc[UR14][R2.64], R5 ;         /* 0x0 */
        /*0510*/                   NOP ;                                 /* 0x0 */
        Function : _other
        /*0000*/                   EXIT ;                                /* 0x0 */
"""
    funcs = static.split_sass_functions(sass)
    assert set(funcs) == {"_k", "_other"}
    mix = static.sass_mix(funcs["_k"])
    assert mix == dict(sass_total=12, ldg_narrow=1, ldg32=1, ldg64=1, ldg128=1, stg=1, ffma=1, hmma=0, gmma=1,
                       dmma=0, mufu=1, bar=1, ldl=1, stl=1)
    assert static.sass_mix(funcs["_other"])["sass_total"] == 1


def test_readme_table_is_generated_from_the_csvs(tmp_path):
    from segkd_kernels.bench import static_table  # noqa: PLC0415

    readme = (REPO / "README.md").read_text()
    assert static_table.BEGIN in readme and static_table.END in readme
    results = REPO / "benchmarks" / "results"
    copy = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", copy)
    static_table.update_readme(copy, results / "static_sm90.csv", results / "static_sm80.csv")
    assert copy.read_text() == readme, "README static table is stale: run python benchmarks/make_static_table.py"


# ---- the instruction model (instr_per_elem) ---------------------------------------------------------

def _model_helper_py(x_ptr, C, BLOCK_K):
    acc = 0
    for k0 in range(0, C, BLOCK_K):  # helper loop
        acc += k0
    return acc


def _model_kernel_py(x_ptr, n, C, chunk, BLOCK, BLOCK_K, FLAG):
    start = tl.program_id(0) * chunk
    end = tl.minimum(start + chunk, n)
    if FLAG:
        end = start + BLOCK  # not compiled when FLAG is False
    for i in range(start, end, BLOCK):  # outer loop
        for j in range(0, 2):  # inner loop
            x_ptr += j
    acc = _model_helper(x_ptr, C, BLOCK_K)
    m = tl.load(x_ptr)
    for k in range(0, m):  # data-dependent loop
        acc += k
    return acc


try:
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    _model_helper = JITFunction(_model_helper_py)
    _model_kernel = JITFunction(_model_kernel_py)
except ImportError:
    _model_helper = _model_kernel = None


def _line_of(fn, marker: str) -> int:
    import inspect  # noqa: PLC0415

    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, text in enumerate(lines) if marker in text)


def _disasm(blocks) -> str:
    """Synthetic `nvdisasm -g` text: blocks of (label or None, [(source line, opcode)])."""
    out, addr = [], 0
    here = str(Path(__file__).resolve())
    for label, instrs in blocks:
        if label:
            out.append(f"{label}:")
        for line, op in instrs:
            out.append(f'\t//## File "{here}", line {line}')
            out.append(f"        /*{addr:04x}*/                   {op} ;")
            addr += 16
    return "\n".join(out)


@needs_triton
def test_instruction_model_counts_loop_bodies_by_their_trips():
    outer = _line_of(_model_kernel_py, "# outer loop")
    inner = _line_of(_model_kernel_py, "# inner loop")
    helper = _line_of(_model_helper_py, "# helper loop")
    text = _disasm([
        (None, [(outer - 3, "S2R R0, SR_CTAID.X"), (outer - 3, "IMAD R1, R0, R2, RZ"), (outer, "NOP")]),
        (".L_x_0", [(outer + 1, "IADD3 R3, R3, 0x1, RZ")]),                         # outer body: 1
        (".L_x_1", [(inner + 1, "IADD3 R4, R4, 0x1, RZ"), (inner + 1, "IADD3 R5, R5, R4, RZ"),
                    (inner, "@P0 BRA `(.L_x_1)")]),                                    # inner body: 3
        (None, [(outer, "@P1 BRA `(.L_x_0)")]),                                       # outer: +1 = 5 total
        (".L_x_2", [(helper + 1, "IADD3 R6, R6, R7, RZ"), (helper, "@P2 BRA `(.L_x_2)")]),  # helper: 2
        (None, [(outer, "EXIT")]),
        (".L_x_3", [(outer, "BRA `(.L_x_3)")]),                                       # trap: not a loop
    ])
    loops = static.sass_loops(text)
    assert len(loops["loops"]) == 3  # the branch to itself after EXIT is no loop
    # segments: NOP not counted; [] outside, [0] outer only, [0, 1] inner, [2] helper
    assert sorted(map(tuple, [(tuple(c), n) for c, n in loops["segments"]])) == [
        ((), 4), ((0,), 2), ((0, 1), 3), ((2,), 2)]
    # n = 100 over programs of chunk 40: trips ceil(40/8) = 5, 5, ceil(20/8) = 3 (mean 13/3);
    # inner 2 trips; helper ceil(10/4) = 3
    values = dict(n=100, C=10, chunk=40, BLOCK=8, BLOCK_K=4, FLAG=False)
    got, why = static.dynamic_instructions(_model_kernel, loops, values, (3,))
    assert why == ""
    per_program = [4 + t * (2 + 3 * 2) + 2 * 3 for t in (5, 5, 3)]
    assert got == pytest.approx(sum(per_program) / 3)
    # the constexpr flag's side is followed: end = start + BLOCK -> one trip in every program
    got, _ = static.dynamic_instructions(_model_kernel, loops, dict(values, FLAG=True), (3,))
    assert got == pytest.approx(4 + 1 * (2 + 3 * 2) + 2 * 3)


@needs_triton
def test_instruction_model_refuses_data_dependent_trips():
    loop_line = _line_of(_model_kernel_py, "# data-dependent loop")
    text = _disasm([(None, [(loop_line - 1, "LDG.E R0, desc[UR4][R2.64]")]),
                    (".L_x_0", [(loop_line + 1, "IADD3 R1, R1, R0, RZ"), (loop_line, "@P0 BRA `(.L_x_0)")])])
    got, why = static.dynamic_instructions(_model_kernel, static.sass_loops(text),
                                           dict(n=100, C=10, chunk=40, BLOCK=8, BLOCK_K=4, FLAG=False), (3,))
    assert got is None and f":{loop_line} not determined by the launch" in why


# ---- the CUDA launches: recorded by the host execution layer, never run ----------------------------

def _host_library():
    from segkd_kernels._backends import host_library  # noqa: PLC0415

    return host_library()


needs_host = pytest.mark.skipif(_host_library()[0] is None, reason=str(_host_library()[1]))


def _real_launches(op: str, shapes, dtype_name: str, sms: int) -> tuple[int, int]:
    """(launches, blocks) of op's forward + unit backward actually run through the host layer."""
    import torch  # noqa: PLC0415

    from segkd_kernels import _backends  # noqa: PLC0415
    from segkd_kernels.bench import cases  # noqa: PLC0415

    lib = _host_library()[0]
    case = cases.CASES[op]
    with _backends.host_execution(lib):
        lib.host_reset()
        lib.host_set_attribute("multiprocessor_count", sms)
        torch.manual_seed(0)
        inputs = case.make(shapes, getattr(torch, dtype_name), "cpu")
        out = case.api(*inputs.tensors, backend="cuda", **inputs.kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        stats = lib.host_stats()
        lib.host_reset()
    return stats["launches"], stats["blocks"]


@needs_host
@pytest.mark.parametrize("op", static.CUDA_OPS)
def test_recorded_launches_are_the_launches_that_run(op):
    """The dry run records exactly the launches a real run makes (count and blocks), at a small shape
    and with the SM counts of both report archs (the launchers size grids from it)."""
    from segkd_kernels.bench import cases  # noqa: PLC0415

    shapes = cases.CASES[op].quick_shapes[0]
    for sms in (132, 3):
        launches, _ops, notes = static.capture_cuda_case(op, shapes, "float32", sms)
        assert not notes, notes
        ran, blocks = _real_launches(op, shapes, "float32", sms)
        assert len(launches) == ran, (op, sms, [ln.kernel for ln in launches])
        assert sum(math.prod(ln.grid) for ln in launches) == blocks, (op, sms)


@needs_host
def test_recording_runs_nothing_and_maps_pointers_to_tensors():
    import torch  # noqa: PLC0415

    import segkd_kernels as sk  # noqa: PLC0415
    from segkd_kernels import _backends  # noqa: PLC0415

    lib = _host_library()[0]
    x = torch.randn(2, 6, 9, 13)
    with _backends.host_execution(lib):
        lib.host_reset()
        lib.host_set_record_only(True)
        sk.spatial_pool(x, backend="cuda")
        records = lib.host_records()
        stats = lib.host_stats()
        lib.host_reset()
    assert records and all(r["name"].startswith("spatial_pool_") for r in records)
    # every launch counted and recorded, no block of any ran
    assert stats["launches"] == len(records) and stats["blocks"] == 0
    # the forward kernel reads x (const) and writes elsewhere (non-const)
    first = records[0]
    addresses = dict(first["pointers"])
    assert addresses.get(x.data_ptr()) is False
    assert any(w for _a, w in first["pointers"])


def test_cuda_launch_bytes_model():
    import torch  # noqa: PLC0415

    a, b, one, two = torch.empty(100), torch.empty(50, dtype=torch.bfloat16), torch.ones(()), torch.full((), 2.0)
    storages = [(t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes(), t) for t in (a, b, one, two)]
    # every distinct tensor once, a pointer inside a tensor counts that tensor, null pointers nothing
    got, note = static.cuda_launch_bytes("k<float>", [(a.data_ptr(), False), (a.data_ptr() + 40, True),
                                                      (b.data_ptr(), True), (0, False)], storages)
    assert (got, note) == (400 + 100, "")
    # a unit-multiplier kernel given exactly 1 moves that value only; given 2, everything
    ptrs = [(a.data_ptr(), False), (b.data_ptr(), True)]
    assert static.cuda_launch_bytes("pixel_kd_kernel<float>", ptrs + [(one.data_ptr(), False)], storages)[0] == 4
    assert static.cuda_launch_bytes("pixel_kd_kernel<float>", ptrs + [(two.data_ptr(), False)], storages)[0] == 504
    # a pointer in no tensor is reported, not guessed
    got, note = static.cuda_launch_bytes("k<float>", [(8, False)], storages)
    assert got == 0 and "in no tensor" in note


def test_barriers_per_step_counts_the_loop_body_only():
    text = _disasm([
        (None, [(1, "BAR.SYNC.DEFER_BLOCKING 0x0")]),                                   # before any loop
        (".L_x_0", [(2, "LDG.E R0, desc[UR4][R2.64]"), (2, "BAR.SYNC.DEFER_BLOCKING 0x0"),
                    (2, "BAR.SYNC.DEFER_BLOCKING 0x0"), (2, "@P0 BRA `(.L_x_0)")]),       # 2 per trip
        (".L_x_1", [(3, "BAR.SYNC.DEFER_BLOCKING 0x0"), (3, "@P1 BRA `(.L_x_1)")]),      # 1 per trip
        (None, [(4, "EXIT")]),
    ])
    assert static.barriers_per_step(static.sass_loops(text)) == 2
    # a warp collective's divergent fallback: BRA.DIV out, then back to the next instruction
    # across a barrier, which is no loop step
    text = _disasm([
        (None, [(1, "BRA.DIV UR4, `(.L_x_9)"), (1, "SHFL.BFLY PT, R0, R1, 0x1, 0x1f")]),
        (".L_x_8", [(1, "FADD R0, R0, R1"), (2, "BAR.SYNC.DEFER_BLOCKING 0x0"), (2, "EXIT")]),
        (".L_x_9", [(1, "WARPSYNC 0xffffffff"), (1, "@P0 BRA `(.L_x_10)")]),
        (".L_x_10", [(1, "SHFL.BFLY PT, R0, R1, 0x1, 0x1f"), (1, "BRA `(.L_x_8)")]),
    ])
    assert static.barriers_per_step(static.sass_loops(text)) == 1
    assert static.barriers_per_step(static.sass_loops(text, divergence_returns=False)) == 0
    assert static.barriers_per_step(static.sass_loops(_disasm([(None, [(1, "BAR.SYNC 0x0"), (1, "EXIT")])]))) == 0


def test_op_summary_waves_of_bulk_launches():
    rows = [dict(bytes_model=900, waves=2.5, bar_per_step=1, spill_stores=0, spill_loads=0),
            dict(bytes_model=90, waves=3.0, bar_per_step=2, spill_stores=0, spill_loads=4),
            dict(bytes_model=10, waves=0.01, bar_per_step=0, spill_stores=0, spill_loads=0)]
    got = static.op_summary(rows, 1000)
    # the 10-byte finishing launch (1%) is not a bulk launch; barriers and spills count every launch
    assert got == dict(waves=2.5, bar_per_step=2, spill_stores=0, spill_loads=4)
    assert static.op_summary([dict(bytes_model=5, waves="persistent")], 5)["waves"] == "persistent"


# The CUDA op rows that fall short of the report's targets today, with the measure that does:
# (op, shape, dtype, arch, measure). The gate fails on a new shortfall and on a listed one that is
# met, so the list can only shrink.
# (channel_wise_kd's long rows reach the floor through channel_wise_kd_stream_kernel: its L2 model,
# docs/performance.md, CUDA launches)
KNOWN_CUDA_SHORTFALLS: set = set()
# The targets: bytes within 10% of the inherent floor, at least 2 waves in every bulk launch (or a
# persistent grid), no spills, at most 2 barriers in one trip of any loop.
CUDA_TARGETS = dict(model_over_floor=1.10, waves=2.0, bar_per_step=2)


def _cuda_shortfalls(rows_by_arch) -> set:
    out = set()
    for arch, rows in rows_by_arch.items():
        for r in rows:
            # the memory-bound ops' rows (other CUDA op rows, e.g. planned instruction models, carry
            # no bytes model)
            if r["row"] != "op" or r["kind"] != "cuda" or r["op"] not in static.CUDA_OPS:
                continue
            key = (r["op"], r["shape"], r["dtype"], arch)
            if float(r["model_over_floor"]) > CUDA_TARGETS["model_over_floor"]:
                out.add(key + ("bytes",))
            if r["waves"] != "persistent" and float(r["waves"]) < CUDA_TARGETS["waves"]:
                out.add(key + ("waves",))
            if int(r["spill_stores"] or 0) + int(r["spill_loads"] or 0):
                out.add(key + ("spills",))
            if int(r["bar_per_step"]) > CUDA_TARGETS["bar_per_step"]:
                out.add(key + ("barriers",))
    return out


def test_committed_cuda_op_rows_meet_the_targets():
    """Every memory-bound op, fp32 and bf16, both archs, at every benchmark shape has a CUDA op row,
    and each meets the targets except the entries of KNOWN_CUDA_SHORTFALLS."""
    from segkd_kernels.bench import cases  # noqa: PLC0415

    rows = {}
    for arch in static.ARCHS:
        with open(REPO / "benchmarks" / "results" / f"static_{arch.replace('_', '')}.csv", newline="") as fh:
            rows[arch] = list(csv.DictReader(fh))
        have = {(r["op"], r["shape"], r["dtype"]) for r in rows[arch] if r["row"] == "op" and r["kind"] == "cuda"}
        want = {(op, cases.shape_label(s), d) for op in static.CUDA_OPS for s in cases.CASES[op].shapes
                for d in static.DTYPE_NAMES}
        assert want <= have, (arch, sorted(want - have))
    found = _cuda_shortfalls(rows)
    assert not sorted(found - KNOWN_CUDA_SHORTFALLS), f"new shortfalls: {sorted(found - KNOWN_CUDA_SHORTFALLS)}"
    assert not sorted(KNOWN_CUDA_SHORTFALLS - found), \
        f"met now, delete from KNOWN_CUDA_SHORTFALLS: {sorted(KNOWN_CUDA_SHORTFALLS - found)}"


def test_committed_triton_op_rows_meet_the_bytes_and_barrier_targets():
    """The memory-bound ops' Triton rows, fp32 and bf16, both archs, every benchmark shape: bytes
    moved within the CUDA rows' bound of the inherent floor and at most as many barriers per loop
    step (SASS loops of the compiled kernels)."""
    from segkd_kernels.bench import cases  # noqa: PLC0415

    for arch in static.ARCHS:
        with open(REPO / "benchmarks" / "results" / f"static_{arch.replace('_', '')}.csv", newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["row"] == "op" and r["kind"] == "triton"
                    and r["op"] in static.CUDA_OPS]
        have = {(r["op"], r["shape"], r["dtype"]) for r in rows}
        want = {(op, cases.shape_label(s), d) for op in static.CUDA_OPS for s in cases.CASES[op].shapes
                for d in static.DTYPE_NAMES}
        assert want <= have, (arch, sorted(want - have))
        for r in rows:
            key = (arch, r["op"], r["shape"], r["dtype"])
            assert float(r["model_over_floor"]) <= CUDA_TARGETS["model_over_floor"], key
            assert r["bar_per_step"] != "" and int(r["bar_per_step"]) <= CUDA_TARGETS["bar_per_step"], key


def test_cuda_second_reads_of_long_rows():
    import torch  # noqa: PLC0415

    s, t, kl, g = (torch.empty(64) for _ in range(4))
    storages = [(x.data_ptr(), x.data_ptr() + 256, x) for x in (s, t, kl, g)]
    ptrs = [(s.data_ptr(), False), (t.data_ptr(), False), (kl.data_ptr(), True), (g.data_ptr(), True), (0, False)]
    # a 64 x 128 fp32 row on 256 threads: 4 values x 2 chunks each = 2048 cached, 8192 needs a second read
    assert static._cwd_row_reads((256, 1, 1), [(8, 2, 64, 128)], "float32", ptrs) == 2
    assert static._cwd_row_reads((256, 1, 1), [(8, 2, 32, 64)], "float32", ptrs) == 1
    # no gradient to write: one pass
    assert static._cwd_row_reads((256, 1, 1), [(8, 2, 64, 128)], "float32", ptrs[:3] + [(0, True), (0, False)]) == 1
    # the reads apply to the inputs only
    assert static.cuda_launch_bytes("channel_wise_kd_kernel<float>", ptrs, storages, 2)[0] == 2 * 512 + 512
# ---- unrolled row walks (static_range loops, inlined helpers) and CUDA kernels with a launch plan ----

def _strip_helper_py(x, K):
    for k in tl.static_range(K):  # helper unrolled
        x += k
    return x


def _strip_kernel_py(x_ptr, n, K):
    acc = 0
    for i0 in range(0, n, K):  # row walk
        for j in tl.static_range(K):  # unrolled rows
            acc = _strip_helper(acc, K)
    return acc


try:
    _strip_helper = JITFunction(_strip_helper_py)
    _strip_kernel = JITFunction(_strip_kernel_py)
except (NameError, ImportError):
    _strip_helper = _strip_kernel = None


@needs_triton
def test_instruction_model_unrolled_rows_of_inlined_helpers():
    walk = _line_of(_strip_kernel_py, "# row walk")
    body = _line_of(_strip_helper_py, "# helper unrolled") + 1
    # the SASS loop of the row walk holds 1 instruction of the kernel's own lines and 6 of the
    # helper's: it is the `range` loop (the static_range loops are unrolled, never SASS loops)
    text = _disasm([
        (None, [(walk - 1, "MOV R0, RZ")]),
        (".L_x_0", [(body, "IADD3 R0, R0, 0x1, RZ")] * 6 + [(walk, "@P0 BRA `(.L_x_0)")]),
        (None, [(walk, "EXIT")]),
    ])
    got, why = static.dynamic_instructions(_strip_kernel, static.sass_loops(text), dict(n=74, K=11), (1,))
    assert why == ""
    assert got == pytest.approx(2 + 7 * 7)  # ceil(74 / 11) = 7 trips of 7 instructions


def test_cuda_loops_of_a_planned_kernel(tmp_path):
    src = tmp_path / "k.cu"
    src.write_text("\n".join([
        "__global__ void k(int n) {",                      # 1
        "  for (int i0 = 0; i0 < n; i0 += 4) {",           # 2  SASS loop
        "#pragma unroll",                                  # 3
        "    for (int j = 0; j < 4; ++j) {",               # 4  unrolled
        "      work(j);",                                  # 5
        "    }",                                           # 6
        "    for (int e = threadIdx.x; e < 9; e += 32)",   # 7  SASS loop, no braces
        "      halo(e);",                                  # 8
        "  }",                                             # 9
        "}",                                               # 10
    ]))
    loops = static.cu_source_loops(src.read_text())
    assert {line: span[2] for line, span in loops.items()} == {2: "i0", 7: "e"}
    assert loops[2][:2] == (2, 9) and loops[7][:2] == (7, 8)
    out, addr = [], 0
    for label, instrs in [(None, [(1, "MOV")]), (".L_x_0", [(5, "FFMA")] * 8 + [(2, "IADD3")]),
                          (".L_x_1", [(8, "LDG"), (7, "@P1 BRA `(.L_x_1)")]), (None, [(2, "@P0 BRA `(.L_x_0)")])]:
        if label:
            out.append(f"{label}:")
        for line, op in instrs:
            out += [f'\t//## File "{src}", line {line}', f"        /*{addr:04x}*/                   {op} ;"]
            addr += 16
    sass = static.sass_loops("\n".join(out))
    got, why = static.cu_kernel_instructions(sass, src, {"i0": 5, "e": 1})
    assert why == "" and got == 1 + 5 * (9 + 1 + 2)
    got, why = static.cu_kernel_instructions(sass, src, {"i0": 5})
    assert got is None and "loop over e" in why


def test_cuda_l2_model_is_stated_where_it_is_used():
    # A kernel counted with its second read as an L2 hit is a persistent one whose rows say so: the
    # committed channel_wise_kd CUDA op rows that run channel_wise_kd_stream_kernel carry the note.
    assert set(static.L2_REREADS) <= static.PERSISTENT_KERNELS
    for arch in static.ARCHS:
        with open(REPO / "benchmarks" / "results" / f"static_{arch.replace('_', '')}.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        streamed = {(r["shape"], r["dtype"]) for r in rows if r["row"] == "kernel" and r["kind"] == "cuda"
                    and r["kernel"].startswith("channel_wise_kd_stream_kernel") and r["phase"] == "forward"}
        assert streamed, arch
        for r in rows:
            if r["row"] == "op" and r["kind"] == "cuda" and (r["shape"], r["dtype"]) in streamed \
                    and r["op"] == "channel_wise_kd":
                assert static.L2_REREADS["channel_wise_kd_stream_kernel"] in r["note"], (arch, r["shape"])
