"""Implementations of each op: fmkernels' backends, peers and the user's own.

An implementation is a name, a callable with the reference function's signature
(``fmkernels.reference.<op>``), and a ``supports`` predicate that says which cases
it can run. ``backend="auto"`` picks the first of fmkernels' own backends, in
priority order, that is available and supports the case (skipping those registered
``named_only``, which run only when named); a backend named
explicitly that cannot run the case raises ``ValueError`` with the reason. There
is no silent fallback.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Dict, Hashable, List, Optional, Union

from . import reference
from ._signature import SignatureCache, signature

OPS = ("attention", "decode_attention", "append_kv", "filter_logits", "sample", "linear")

#: Kinds of implementation, in the order ``check`` and ``bench`` list them.
KINDS = ("backend", "peer", "user")

SupportsResult = Union[bool, str, None]

#: Arguments an op gained after implementations of it were written. An implementation whose
#: signature cannot take one is still accepted: it is called without the argument when the
#: call leaves it None, and cannot run (unsupported, with the reason) a call that gives it.
OPTIONAL_ARGUMENTS = {"filter_logits": ("allowed",), "sample": ("allowed",)}


def _declined(op: str, fn: Callable[..., Any]) -> tuple:
    """The optional arguments of ``op`` that ``fn`` cannot take (none where its signature cannot be read)."""
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return ()
    if any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
        return ()
    return tuple(name for name in OPTIONAL_ARGUMENTS.get(op, ()) if name not in parameters)


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of one op.

    ``supports(**case)`` receives the op's arguments by name and returns ``None``
    (or ``True``) when it can run them, else a reason string (or ``False``).
    ``available()`` returns ``None`` when the implementation can run on this
    machine at all, else the reason it cannot (not built, no GPU, ...).
    ``devices`` lists the device types its tensors may live on; ``None`` means any.
    ``named_only``, when set, says why ``backend="auto"`` never picks it: it runs only when named.
    ``select`` asks both once per call signature and reuses the answer, so they must depend
    on the arguments' metadata (dtypes, devices, shapes, strides, scalar values) only.
    """

    op: str
    name: str
    fn: Callable[..., Any]
    supports: Optional[Callable[..., SupportsResult]] = None
    available: Optional[Callable[[], Optional[str]]] = None
    devices: Optional[tuple] = None
    kind: str = "user"
    priority: int = 0
    declines: tuple = ()  # the OPTIONAL_ARGUMENTS its fn cannot take
    named_only: Optional[str] = None

    def __call__(self, **case):
        """``fn(**case)``, without the optional arguments it declines (None in any call it supports)."""
        for name in self.declines:
            case.pop(name, None)
        return self.fn(**case)

    def unavailable_reason(self) -> Optional[str]:
        return None if self.available is None else self.available()

    def unsupported_reason(self, case: Dict[str, Any]) -> Optional[str]:
        """Why this implementation cannot run ``case``, or ``None`` if it can."""
        reason = self.unavailable_reason()
        if reason:
            return f"not available: {reason}"
        if self.devices is not None:
            for key, value in case.items():
                device = getattr(value, "device", None)
                if device is not None and device.type not in self.devices:
                    return f"runs on {' or '.join(self.devices)} tensors; {key} is on {device.type}"
        for name in self.declines:
            if case.get(name) is not None:
                return f"it takes no {name}= argument"
        if self.supports is None:
            return None
        verdict = self.supports(**case)
        if verdict is None or verdict is True:
            return None
        if verdict is False:
            return "its supports() predicate rejects this case"
        return str(verdict)


_REGISTRY: Dict[str, Dict[str, Impl]] = {op: {} for op in OPS}

# select()'s answers by (op, the call's signature): which implementation runs it, or the
# message of the error that says why none can. Registering or removing an implementation forgets them.
_SELECTED = SignatureCache(capacity=1024)


def _check_op(op: str) -> None:
    if op not in _REGISTRY:
        raise ValueError(f"op must be one of {', '.join(OPS)}, got {op!r}")


def register_impl(
    op: str,
    name: str,
    fn: Callable[..., Any],
    supports: Optional[Callable[..., SupportsResult]] = None,
    *,
    available: Optional[Callable[[], Optional[str]]] = None,
    devices: Optional[tuple] = None,
    kind: str = "user",
    priority: int = 0,
    named_only: Optional[str] = None,
    replace: bool = False,
) -> Impl:
    """Register ``fn`` as implementation ``name`` of ``op``.

    ``fn`` takes the same arguments as ``fmkernels.reference.<op>`` and returns what
    it returns; it may leave out the arguments ``OPTIONAL_ARGUMENTS`` names (``allowed`` of
    the sampling ops), and then runs only the calls that leave them None. ``fmkernels check`` then holds it to the reference and
    ``fmkernels bench`` times it beside fmkernels' own backends; ``backend=name``
    in the op calls it. With ``named_only`` (the reason, a string), ``backend="auto"`` never
    picks it, whatever its priority.
    """
    _check_op(op)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"name must be a non-empty string other than 'auto', got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if supports is not None and not callable(supports):
        raise TypeError(f"supports must be callable or None, got {type(supports).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if named_only is not None and not isinstance(named_only, str):
        raise TypeError(f"named_only must be a str (the reason) or None, got {type(named_only).__name__}")
    if named_only == "":
        raise ValueError("named_only must be a non-empty reason or None, got ''")
    if name in _REGISTRY[op] and not replace:
        raise ValueError(f"{op} already has an implementation named {name!r}; pass replace=True to replace it")
    impl = Impl(op, name, fn, supports, available, devices, kind, priority, _declined(op, fn), named_only)
    _REGISTRY[op][name] = impl
    _SELECTED.clear()
    return impl


def unregister_impl(op: str, name: str) -> None:
    _check_op(op)
    if name not in _REGISTRY[op]:
        raise ValueError(f"{op} has no implementation named {name!r}")
    del _REGISTRY[op][name]
    _SELECTED.clear()


def forget_selections() -> None:
    """Forget which implementation ``select`` chose for each call signature, so the next call
    of each asks the implementations' ``available`` and ``supports`` again (for an
    availability that changed while the process runs)."""
    _SELECTED.clear()


def implementations(op: str) -> List[Impl]:
    """All registered implementations of ``op``: backends by priority, then peers, then users'."""
    _check_op(op)
    return sorted(_REGISTRY[op].values(), key=lambda i: (KINDS.index(i.kind), -i.priority, i.name))


def get_impl(op: str, name: str) -> Impl:
    _check_op(op)
    try:
        return _REGISTRY[op][name]
    except KeyError:
        known = ", ".join(i.name for i in implementations(op))
        raise ValueError(f"backend for {op} must be 'auto' or one of: {known}; got {name!r}") from None


def select(op: str, backend: str, case: Dict[str, Any], *, key: Optional[Hashable] = None) -> Impl:
    """The implementation that runs ``case``: the named one, or the best for ``auto``.

    The answer is remembered per call signature (``fmkernels._signature``: each tensor's
    dtype, device, shape, strides and alignment, and the other arguments' values), so
    ``supports`` predicates are asked once per signature and must not read tensors' values.
    ``key`` stands for the signature of the public call that ``case`` comes from, where the
    caller has one (the number ``_signature.check_once`` gave it, with anything else the
    choice may read; it must determine ``backend`` and ``case``'s signature); by default
    ``case``'s own signature is the key.
    """
    if key is None:
        own = signature((backend, *case.values()))
        key = None if own is None else (op, own)
    else:
        key = (op, key)
    chosen = _SELECTED.get(key)
    if isinstance(chosen, Impl) and _REGISTRY[op].get(chosen.name) is not chosen:
        chosen = None  # the registry changed under the map (its dicts edited directly)
    if chosen is None:
        try:
            chosen = _select(op, backend, case)
        except ValueError as error:
            chosen = str(error)  # the message alone: an exception's traceback would keep the call's tensors alive
        _SELECTED.put(key, chosen)
    if isinstance(chosen, str):
        raise ValueError(chosen)
    return chosen


def _select(op: str, backend: str, case: Dict[str, Any]) -> Impl:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto":
        impl = get_impl(op, backend)
        reason = impl.unsupported_reason(case)
        if reason:
            raise ValueError(f"backend {backend!r} cannot run this {op} call: {reason}")
        return impl
    reasons = []
    for impl in implementations(op):
        if impl.kind != "backend":
            continue
        if impl.named_only:
            reasons.append(f"{impl.name}: runs only when named ({impl.named_only})")
            continue
        reason = impl.unsupported_reason(case)
        if reason is None:
            return impl
        reasons.append(f"{impl.name}: {reason}")
    raise ValueError(f"no backend can run this {op} call ({'; '.join(reasons)})")


def load_impl(spec: str) -> Callable[..., Any]:
    """Import ``module:function`` (the command line's ``--impl``)."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"--impl must look like module:function, got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"--impl {spec}: cannot import {module_name!r}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise ValueError(f"--impl {spec}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise TypeError(f"--impl {spec}: {attr!r} is not callable")
    return fn


def _call_text(op: str) -> str:
    """How an implementation of ``op`` is called: ``op(q, k, v, *, causal, ...)``."""
    parameters = inspect.signature(getattr(reference, op)).parameters.values()
    positional = [p.name for p in parameters if p.kind != p.KEYWORD_ONLY]
    keywords = [p.name for p in parameters if p.kind == p.KEYWORD_ONLY]
    return f"{op}({', '.join(positional + (['*'] + keywords if keywords else []))})"


def signature_error(op: str, fn: Callable[..., Any]) -> Optional[str]:
    """Why ``fn`` cannot be called as an implementation of ``op``, or None.

    Implementations are called with the reference op's arguments, every one by keyword
    (``fmkernels.reference.<op>``); ``fn`` must accept each of them and require no other.
    A callable whose signature cannot be read is not judged.
    """
    _check_op(op)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = [name for name in inspect.signature(getattr(reference, op)).parameters
             if name not in OPTIONAL_ARGUMENTS.get(op, ())]
    try:
        signature.bind(**{name: None for name in names})
    except TypeError as exc:
        return f"it cannot take {op}'s arguments ({exc}); implementations are called as {_call_text(op)}, by keyword"
    return None
