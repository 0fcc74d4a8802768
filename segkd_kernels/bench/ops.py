"""Per-op kernel benchmarks: every case x shape x dtype x provider x mode -> CSV rows."""

from __future__ import annotations

import sys

import torch
import torch._dynamo

from .._backends import BackendUnavailableError
from . import cases as cases_module
from .harness import MODES, measure_case
from .hardware import peak_flops

FUSED = ("triton", "cuda")

# The `backward` mode replays one graph's backward (retain_graph=True), which compiled graphs
# refuse when they donate their saved buffers to the backward. Donation only lets the backward
# free saved tensors early; it does not change the kernels that are timed.
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False


def providers(case, device: str) -> tuple[dict, list[str]]:
    """name -> callable(*tensors) for every provider that can run here, and notes for those that cannot."""
    out, notes = {}, []
    out["eager"] = case.eager
    # Dynamo keys its cache on the code object, which this lambda shares across every case: reset
    # so each case compiles fresh and its calls check only their own guards (a long guard chain
    # would add to the timed overhead, and past the recompile limit dynamo runs eager code).
    torch._dynamo.reset()
    # inductor on GPUs; on CPU (harness check only) aot_eager, which compiles in seconds, not ~30 s.
    compiled = torch.compile(lambda *a: case.api(*a, backend="reference"),
                             backend="inductor" if device == "cuda" else "aot_eager")
    out["compile"] = compiled
    for name in FUSED:
        out[name] = lambda *a, b=name: case.api(*a, backend=b)
    for name, factory in case.peers.items():
        try:
            out[name] = factory()
        except Exception as err:  # a peer that does not import is skipped, not an error
            notes.append(f"{case.op}: {name} skipped ({type(err).__name__}: {err})")
    return out, notes


def bench_case(case, shapes, dtype, device, timer, env, bandwidth, writer, log=print) -> list[str]:
    notes = []
    peak = peak_flops(env["device"], "tensor16" if case.flop_kind == "dtype" and dtype != torch.float32 else "fp32")
    provs, provider_notes = providers(case, device)
    notes += provider_notes
    label = cases_module.shape_label(shapes)
    for provider, fn in provs.items():
        for mode in MODES:
            row = dict(env, op=case.op, shape=label, dtype=str(dtype).removeprefix("torch."), mode=mode,
                       provider=provider)
            try:
                row.update(measure_case(case, fn, shapes, dtype, mode, device, timer, bandwidth, peak))
            except BackendUnavailableError as err:
                notes.append(f"{case.op} {label} {row['dtype']}: {provider} unavailable ({err})")
                break
            except (TypeError, NotImplementedError) as err:  # a peer that rejects this dtype
                if not provider.startswith("peer:"):
                    raise
                notes.append(f"{case.op} {label} {row['dtype']}: {provider} skipped ({err})")
                break
            writer.write(row)
            ms = row["ms_p50"]
            shown = ms if isinstance(ms, str) else f"{ms:10.3f} ms"
            log(f"{case.op:<15}{label:<34}{row['dtype']:<9}{mode:<9}{provider:<20}{shown}")
    return notes


def run_ops(op_names, dtypes, device, timer, env, bandwidth, writer, quick: bool) -> list[str]:
    notes = []
    for name in op_names:
        case = cases_module.CASES[name]
        for shapes in case.quick_shapes if quick else case.shapes:
            for dtype in dtypes:
                notes += bench_case(case, shapes, dtype, device, timer, env, bandwidth, writer)
                sys.stdout.flush()
    return notes
