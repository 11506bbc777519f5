"""Run-time routing of dropout calls made in a model's own code to concrete sites, without a GraphModule.

A call such as ``F.dropout(x, p=self.drop_rate, training=self.training)`` lives in the model's code. Rather
than retracing that code into a ``GraphModule`` (which would lose the class, its methods, and bake
``self.training`` in), the owner's method is wrapped *on the instance*: while it runs, a
``TorchFunctionMode`` sees every dropout and attention call, identifies it by its code location (file,
function and bytecode offset, the same at trace time and at run time) and hands it to the route registered
for that location: a site child of the owner and a *handler* (a module-level function of the site kind,
so the routes survive ``deepcopy`` and pickling) that computes the call with the site. Calls the conversion
saw and left alone (not selected, rate 0, output unused) pass through unchanged; calls it did not see pass
through with a one-time warning.

A *runner* replaces the whole method call instead (``nn.MultiheadAttention``, whose dropout is inside
torch's own code, where a code location cannot be told apart).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple

import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import replicas
from .callsites import FUNCTIONAL_DROPOUTS, CallKey, call_key, caller_frame, warn_stacklevel

__all__ = [
    "INTERCEPTOR_ATTR",
    "Handler",
    "MethodInterceptor",
    "Runner",
    "install",
    "interceptors",
    "is_routable",
    "uninstall",
]

INTERCEPTOR_ATTR = "_cd_convert_interceptors"

#: handler(owner, site, func, args, kwargs) -> the call's result computed with the site.
Handler = Callable[[nn.Module, nn.Module, Callable, Tuple[Any, ...], Dict[str, Any]], Any]
#: runner(owner, site, method_function, args, kwargs) -> the method's result.
Runner = Callable[[nn.Module, nn.Module, Callable, Tuple[Any, ...], Dict[str, Any]], Any]


def is_routable(func: Callable) -> bool:
    """Calls a route can take: functional dropout, ``scaled_dot_product_attention`` and
    ``multi_head_attention_forward`` (attention functions that take a dropout rate)."""
    # Read from the module on each call: while attention is routed, F.scaled_dot_product_attention is the router.
    attention = func is F.scaled_dot_product_attention or func is F.multi_head_attention_forward
    return attention or func in FUNCTIONAL_DROPOUTS


class _Dispatch(TorchFunctionMode):
    def __init__(self, interceptor: "MethodInterceptor") -> None:
        super().__init__()
        self.interceptor = interceptor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_routable(func):
            handled, result = self.interceptor.dispatch(func, args, kwargs)
            if handled:
                return result
        return func(*args, **kwargs)


class MethodInterceptor:
    """Stands in for ``owner.<method>`` on the instance and routes its dropout calls to concrete sites.

    Args:
        owner: the module whose method contains the calls.
        method: the method's name (``"forward"``, ``"forward_head"``, ...).

    Attributes:
        routes: call location -> (name of the site child of ``owner``, handler).
        runner: if set, ``(child, runner)`` that runs the whole method with that site.
        left: locations of the calls the conversion saw in the method and left at their fixed rate (no warning).
    """

    def __init__(self, owner: nn.Module, method: str) -> None:
        self.owner = owner
        self.method = method
        self.routes: Dict[CallKey, Tuple[str, Handler]] = {}
        self.runner: Optional[Tuple[str, Runner]] = None
        self.left: Set[CallKey] = set()
        self._warned = False

    @property
    def empty(self) -> bool:
        return not self.routes and self.runner is None

    def child_for(self, key: Optional[CallKey]) -> Optional[str]:
        """The site child routed for ``key`` (or the runner's site when ``key`` is None)."""
        if key is None:
            return self.runner[0] if self.runner else None
        route = self.routes.get(key)
        return route[0] if route else None

    @property
    def __signature__(self) -> inspect.Signature:
        """The signature of the method stood in for, so that code inspecting it (transformers'
        ``apply_chunking_to_forward`` counts the parameters of the function it chunks) sees the real one."""
        return inspect.signature(getattr(type(self.owner), self.method).__get__(self.owner))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        function = getattr(type(self.owner), self.method)
        if self.runner is not None:
            child, runner = self.runner
            return runner(self.owner, getattr(self.owner, child), function, args, kwargs)
        checkpoint = self._checkpoint_function()
        with _Dispatch(self):
            if checkpoint is None:
                return function(self.owner, *args, **kwargs)
            with self._routed_recomputation(checkpoint):
                return function(self.owner, *args, **kwargs)

    def _checkpoint_function(self) -> Optional[Callable]:
        """The owner's transformers checkpoint function while gradient checkpointing is on for its forward.

        transformers sets both attributes on the instance (``set_gradient_checkpointing``): plain dict reads
        here, not ``Module.__getattr__``'s failing lookup, on every call of a routed method.
        """
        own = self.owner.__dict__
        checkpoint = own.get("_gradient_checkpointing_func")
        if self.method != "forward" or checkpoint is None or not own.get("gradient_checkpointing", False):
            return None
        return checkpoint

    @contextlib.contextmanager
    def _routed_recomputation(self, checkpoint: Callable) -> Iterator[None]:
        """Inside the block, a checkpointed forward of the owner recomputes with its calls routed too.

        transformers checkpoints a ``GradientCheckpointingLayer`` by replacing the class's ``forward`` with a
        wrapper that calls ``self._gradient_checkpointing_func(partial(<the original forward>, self), ...)``.
        The backward pass recomputes that original forward outside this interceptor, so its dropout calls would
        run at their fixed rate: a different graph from the forward pass's (wrong gradients with
        ``use_reentrant=True``, a ``CheckpointError`` without). While the owner's method runs, its checkpoint
        function (``checkpoint``, from :meth:`_checkpoint_function`) is replaced on the instance by one that
        runs the checkpointed function under this routing.
        """
        interceptor = self

        def routed_checkpoint(function: Callable, *args: Any, **kwargs: Any) -> Any:
            def routed(*inner_args: Any, **inner_kwargs: Any) -> Any:
                with _Dispatch(interceptor):
                    return function(*inner_args, **inner_kwargs)

            return checkpoint(routed, *args, **kwargs)

        own = self.owner.__dict__
        own["_gradient_checkpointing_func"] = routed_checkpoint
        try:
            yield
        finally:
            own["_gradient_checkpointing_func"] = checkpoint

    def dispatch(self, func: Callable, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[bool, Any]:
        """Handle one intercepted call; returns ``(handled, result)``."""
        start = sys._getframe(1)
        frame = caller_frame(start)
        key = call_key(frame) if frame is not None else None
        route = self.routes.get(key) if key is not None else None
        if route is None:
            if (
                func in FUNCTIONAL_DROPOUTS
                and not self._warned
                and key not in self.left
                and self._made_by_owner(frame)
                and not self._inside_module_call(start, frame)
            ):
                self._warned = True
                warnings.warn(
                    f"a dropout call in {type(self.owner).__name__}.{self.method} was not seen when the model "
                    "was converted (a branch not taken at conversion time?); it keeps its fixed rate. "
                    "Convert again with example_inputs that take that branch.",
                    stacklevel=warn_stacklevel(),
                )
            return False, None
        child, handler = route
        return True, handler(self.owner, getattr(self.owner, child), func, args, kwargs)

    def _inside_module_call(self, start: Any, frame: Any) -> bool:
        """Whether torch's code of another module made the call (``nn.Dropout.forward``): a dropout module the
        owner calls is a module site or was left as a module, not one of the owner's functional calls."""
        while start is not None and start is not frame:
            owner = start.f_locals.get("self")
            if isinstance(owner, nn.Module) and owner is not self.owner:
                return True
            start = start.f_back
        return False

    def _made_by_owner(self, frame: Any) -> bool:
        # Calls of nested modules pass through this mode too; only the owner's own calls are its business.
        code = getattr(frame, "f_code", None)
        return code is not None and code.co_argcount > 0 and frame.f_locals.get(code.co_varnames[0]) is self.owner


def install(owner: nn.Module, method: str) -> MethodInterceptor:
    """Return the interceptor of ``owner.<method>``, installing it on the instance if needed."""
    registry: Dict[str, MethodInterceptor] = owner.__dict__.setdefault(INTERCEPTOR_ATTR, {})
    if method not in registry:
        interceptor = MethodInterceptor(owner, method)
        registry[method] = interceptor
        owner.__dict__[method] = interceptor
        replicas.track(owner)
    return registry[method]


def uninstall(owner: nn.Module, method: str) -> None:
    """Remove the interceptor of ``owner.<method>`` (the class's method is visible again)."""
    registry = owner.__dict__.get(INTERCEPTOR_ATTR, {})
    registry.pop(method, None)
    owner.__dict__.pop(method, None)
    if not registry:
        owner.__dict__.pop(INTERCEPTOR_ATTR, None)
    replicas.untrack(owner)


def _has_interceptors(module: nn.Module) -> bool:
    return bool(module.__dict__.get(INTERCEPTOR_ATTR))


def _rebind_interceptors(module: nn.Module, replica: nn.Module) -> None:
    """Give an ``nn.DataParallel`` replica interceptors of its own, bound to it (see :mod:`cd_convert.replicas`);
    the routes name children and handlers, not modules, so they are shared."""
    registry: Dict[str, MethodInterceptor] = {}
    for method, interceptor in module.__dict__[INTERCEPTOR_ATTR].items():
        clone = MethodInterceptor(replica, method)
        clone.routes, clone.runner, clone.left = interceptor.routes, interceptor.runner, interceptor.left
        registry[method] = clone
        replica.__dict__[method] = clone
    replica.__dict__[INTERCEPTOR_ATTR] = registry


replicas.register_rebinder(_has_interceptors, _rebind_interceptors)


def interceptors(owner: nn.Module) -> Dict[str, MethodInterceptor]:
    """The interceptors installed on ``owner``, by method name."""
    return owner.__dict__.get(INTERCEPTOR_ATTR, {})
