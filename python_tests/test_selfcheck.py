"""`segkd selfcheck` covers every public op and reports each backend against the fp64 reference."""

import inspect

import pytest

import segkd_kernels as sk
from segkd_kernels import selfcheck

NOT_OPS = {"available_backends", "BackendUnavailableError", "nn", "compat", "__version__"}


def public_ops() -> set[str]:
    """The functions of segkd_kernels.__all__ that compute something (the losses and CBAM ops)."""
    ops = set()
    for name in sk.__all__:
        obj = getattr(sk, name)
        if inspect.isfunction(obj) and obj.__module__.startswith("segkd_kernels.ops."):
            ops.add(name)
    return ops


def test_every_public_op_is_checked():
    # the filter above must not miss an op by accident: everything else is named here
    assert set(sk.__all__) - public_ops() == NOT_OPS
    assert set(selfcheck.CHECKED_OPS) == public_ops()
    assert len(selfcheck.CHECKED_OPS) == len(set(selfcheck.CHECKED_OPS))


def test_cbam_gate_and_knowledge_gap_rows(capsys):
    report = sk.available_backends()
    assert selfcheck.run_selfcheck("small", ops=("cbam_gate", "knowledge_gap")) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith(("cbam_gate", "knowledge_gap"))]
    runnable = [b for b, ok in report.items() if ok and b != "cuda"]  # cuda rows need a GPU
    for op in ("cbam_gate", "knowledge_gap"):
        backends = {r[1] for r in rows if r[0] == op}
        assert set(runnable) <= backends, (op, backends)
    assert all(r[-1] == "ok" for r in rows)
    assert any(r[0] == "knowledge_gap" and "(detached)" in r for r in rows)


def test_unknown_op_is_refused():
    with pytest.raises(ValueError, match="ops: unknown"):
        selfcheck.run_selfcheck("small", ops=("nope",))
