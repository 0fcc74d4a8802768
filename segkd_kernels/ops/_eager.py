"""The eager fast path of the custom ops: the same functions, without the dispatcher's round trip.

Every fused kernel wrapper is a `torch.library.custom_op` (segkd::...), so that torch.compile
(fullgraph=True) sees one opaque node with a fake implementation and a registered backward. In
eager mode that registration costs host time on every call: the Python wrapper enters the C++
dispatcher, its autograd kernel builds an autograd.Function around a second dispatch below
autograd, that dispatch re-enters Python, and the result is checked for aliasing on the way out.
For a loss on a small map this is a large share of the host work per call (`segkd bench --host`).

`install()` gives every registered segkd custom op an eager path that calls the same Python
function directly:
- with grad needed (grad mode on and a tensor argument requiring grad) and a backward registered:
  one autograd.Function per op, built once from what the op registered (its function, its
  `setup_context` and its backward), doing what torch's generated autograd wrapper does: the
  function runs with autograd below it, `setup_context(ctx, inputs, output)` sees the inputs
  with their defaults filled in, the backward's gradients are returned as they come;
- otherwise: the function itself, as the op's no-grad path does.
Values, gradients, saved tensors and errors are those of the dispatcher path (tested in
python_tests/test_backends.py). The dispatcher path is kept, unchanged, wherever it does more
than dispatch:
- under torch.compile tracing (`torch.compiler.is_compiling()`: the graph gets the custom op),
- under any torch dispatch mode (FakeTensorMode, make_fx / export tracing, the benchmark's
  counting mode) or functorch transform (vmap, grad), where the op's registrations answer,
- under autocast, so that casts follow the dispatcher's rules exactly,
- for tensors that are not plain CPU or CUDA tensors (meta tensors, tensor subclasses),
- for calls with keyword arguments, ops with tensor-list arguments, and an op without a
  registered backward called with grad needed (the dispatcher raises its own error there).

The op objects stay `CustomOpDef`s (their class becomes a subclass that adds the fast path to
`__call__`), so `opcheck`, `register_fake` and `op._opoverload` work as before.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from torch._library.custom_ops import OPDEFS, CustomOpDef

_C = torch._C
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FUNCTION_APPLY = _C._FunctionBase.__dict__["apply"]
_is_compiling = torch.compiler.is_compiling


_ENABLED = [True]  # dispatcher_path() turns the fast path off


@contextlib.contextmanager
def dispatcher_path():
    """Inside the block every segkd custom op goes through the dispatcher, as without install()
    (to compare the two paths, or to rule the fast path out when debugging)."""
    saved = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = saved


_dispatch_stack_len = _C._len_torch_dispatch_stack
_functorch_active = _C._are_functorch_transforms_active
_autocast_enabled = _C._is_any_autocast_enabled
_grad_enabled = _C.is_grad_enabled
_any_requires_grad = _C._any_requires_grad


def _has_tensor_list(op: CustomOpDef) -> bool:
    schema = op._opoverload._schema
    return any(str(a.type).startswith(("List[Tensor", "Optional[List[Tensor", "Tensor?[]", "Tensor[]"))
               for a in (*schema.arguments, *schema.returns))


def _build(op: CustomOpDef):
    """(function, the apply of its autograd.Function or None, number of positional parameters, their
    defaults)."""
    fn = op._init_fn
    params = list(inspect.signature(fn).parameters.values())
    defaults = tuple(p.default for p in params)
    function = None
    if op._backward_fn is not None:
        setup_context, backward_fn = op._setup_context_fn, op._backward_fn

        def forward(ctx, *args):
            # grad mode is off here (as below the dispatcher's autograd key): nothing is recorded
            result = fn(*args)
            if setup_context is not None:
                setup_context(ctx, args, result)  # (ctx, inputs, output), as torch calls it
            return result

        # the registered backward itself: it takes (ctx, *grads) and returns one gradient per input
        name = "EagerBackwardFor_" + op._qualname.replace("::", "_")
        function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                           "backward": staticmethod(backward_fn)})
        # The C++ apply, bound to this class: Function.apply's Python prologue only binds default
        # arguments for a setup_context-style forward (not this one) and unwraps functorch tensors
        # of exited transforms (transforms active take the dispatcher path)
        function = _FUNCTION_APPLY.__get__(None, function)
    return fn, function, len(params), defaults


class _EagerCustomOpDef(CustomOpDef):
    """A CustomOpDef whose eager calls skip the dispatcher (see the module docstring)."""

    def __call__(self, *args, **kwargs):
        # is_compiling() first: under dynamo it is a constant True and the rest is never traced;
        # then the fast path turned off, a dispatch mode, a functorch transform, autocast
        if (_is_compiling() or kwargs or not _ENABLED[0] or _dispatch_stack_len() or _functorch_active()
                or _autocast_enabled()):
            return self._opoverload(*args, **kwargs)
        plan = self.__dict__.get("_segkd_eager")
        if plan is None or plan[0] is not self._init_fn or plan[4] is not self._backward_fn:
            fn, function, n_params, defaults = _build(self)
            plan = self.__dict__["_segkd_eager"] = (fn, function, n_params, defaults, self._backward_fn,
                                                    _has_tensor_list(self))
        fn, function, n_params, defaults, _, tensor_list = plan
        if tensor_list or len(args) != n_params:
            if tensor_list or len(args) > n_params:
                return self._opoverload(*args)
            # what the dispatcher does: every argument, defaults filled in
            if any(d is inspect.Parameter.empty for d in defaults[len(args):]):
                return self._opoverload(*args)  # the dispatcher's error for a missing argument
            args = args + defaults[len(args):]
        for a in args:
            # plain tensors on a device that runs kernels; meta tensors and tensor subclasses get
            # the op's registrations (fake implementation, __torch_dispatch__)
            if type(a) in _PLAIN:
                if not (a.is_cpu or a.is_cuda):
                    return self._opoverload(*args)
            elif isinstance(a, torch.Tensor):
                return self._opoverload(*args)
        if _grad_enabled() and _any_requires_grad(*args):
            if function is None:
                return self._opoverload(*args)
            return function(*args)
        return fn(*args)  # what the op's no-grad path runs


def direct_ok(*tensors) -> bool:
    """True where a wrapper may run an op's Python function itself instead of calling the op: the
    conditions of the fast path above for these tensor arguments (no tracing or compiling, no
    dispatch mode, functorch transform or autocast, the fast path on, plain CPU or CUDA tensors).
    The caller settles the rest (grad mode; the tensors on one device, the first one's tested). For
    the hottest wrappers, whose own entry (or registered backward) makes the call it would make."""
    if (_is_compiling() or not _ENABLED[0] or _dispatch_stack_len() or _functorch_active()
            or _autocast_enabled()):
        return False
    for a in tensors:
        if type(a) not in _PLAIN:
            return False
    first = tensors[0]
    return first.is_cpu or first.is_cuda


def direct_node(qualname: str, forward, backward):
    """The C apply of an autograd.Function with this forward (ctx, *inputs) and backward: the graph
    node a wrapper's direct entry (see direct_ok) builds where the custom op `qualname` (with
    `backward` registered) would build its own, named as the op's eager path names it (_build) so
    that graphs read the same through both entries. Bound once at import: Function.apply's Python
    prologue does nothing for such a forward with no functorch transform active, which direct_ok
    rules out."""
    node = type("EagerBackwardFor_" + qualname.replace("::", "_"), (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return _FUNCTION_APPLY.__get__(None, node)


def install() -> None:
    """Give every registered segkd custom op the eager fast path (idempotent)."""
    for name, op in list(OPDEFS.items()):
        if name.startswith("segkd::") and type(op) is CustomOpDef:
            op.__class__ = _EagerCustomOpDef


__all__ = ["direct_node", "direct_ok", "dispatcher_path", "install"]
