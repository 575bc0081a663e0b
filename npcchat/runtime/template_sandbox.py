"""The Jinja environment a bundle's prompt template runs in: sandboxed and bounded.

A bundle comes from whoever trained it, so its template is untrusted code. Jinja's
immutable sandbox already refuses attribute tricks (tested against escape payloads) and
caps one ``range`` at 100,000 items, but nothing bounds sizes: ``{{ 'a' * 200000000 }}`` is
even computed while the template compiles (constant folding), ``'a'.center(10**9)``
allocates a gigabyte, and three nested ``range(1000)`` loops run a billion times. Here:

* ``*``, ``**`` and ``+`` are intercepted (which also stops Jinja folding them at compile
  time) and their result size is checked before it is computed;
* the string methods and filters that take a width or grow a string check it first, and
  only filters a prompt plausibly needs exist;
* every ``range`` iteration of a render counts against one budget.

Past a bound, rendering fails with a SecurityError, which the prompt builder reports as
a one-line error naming the template.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ClassVar

from jinja2 import StrictUndefined
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_TEXT = 1_000_000  # characters (or items) any one value of a render may reach
MAX_ITERATIONS = 100_000  # range() steps in one render, nested loops counted in full
MAX_SOURCE = 64 * 1024  # characters of template source
_WIDTH_METHODS = frozenset({"center", "ljust", "rjust", "zfill", "expandtabs"})
# the filters a prompt template may use (none takes a width: center, indent, wordwrap, ...)
FILTERS = (
    "abs",
    "capitalize",
    "count",
    "d",
    "default",
    "e",
    "escape",
    "first",
    "float",
    "int",
    "join",
    "last",
    "length",
    "list",
    "lower",
    "max",
    "min",
    "replace",
    "reverse",
    "round",
    "sort",
    "string",
    "sum",
    "title",
    "trim",
    "unique",
    "upper",
    "wordcount",
)
_budget: ContextVar[list[int]] = ContextVar("npcchat_template_budget")


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, str | bytes | list | tuple) else None


def _check(n: float, what: str) -> None:
    if not n <= MAX_TEXT:
        raise SecurityError(f"{what} would exceed {MAX_TEXT} characters or items")


def _mul(left: Any, right: Any) -> Any:
    for seq, n in ((left, right), (right, left)):
        size = _size(seq)
        if size is not None and isinstance(n, int):
            _check(size * n, "repetition")
    return left * right


def _pow(left: Any, right: Any) -> Any:
    if isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
        _check(right * math.log2(abs(left)) / 8, "a power")  # bytes of the result
    return left**right


def _add(left: Any, right: Any) -> Any:
    a, b = _size(left), _size(right)
    if a is not None and b is not None:
        _check(a + b, "concatenation")
    return left + right


def _replace(value: Any, old: Any, new: Any, count: Any = None) -> Any:
    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str) and old:
        hits = value.count(old) if count is None else min(value.count(old), int(count))
        _check(len(value) + hits * max(0, len(new) - len(old)), "replace")
    return value.replace(old, new) if count is None else value.replace(old, new, int(count))


def _counted_range(*args: int) -> Iterator[int]:
    steps = range(*args)
    if len(steps) > MAX_ITERATIONS:
        raise SecurityError(f"range of {len(steps)} items exceeds {MAX_ITERATIONS}")
    budget = _budget.get([MAX_ITERATIONS])
    for i in steps:
        budget[0] -= 1
        if budget[0] < 0:
            raise SecurityError(f"the template loops more than {MAX_ITERATIONS} times")
        yield i


class BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})
    _binops: ClassVar[dict[str, Callable[[Any, Any], Any]]] = {"*": _mul, "**": _pow, "+": _add}

    def __init__(self, **options: Any) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False, **options)
        self.globals = {"range": _counted_range}
        self.filters = {name: self.filters[name] for name in FILTERS}
        self.filters["replace"] = _replace

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        return self._binops[operator_](left, right)

    def call(self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, str):
            if name in _WIDTH_METHODS and args and isinstance(args[0], int):
                _check(args[0], name)
            if name == "replace":
                return _replace(owner, *args, **kwargs)
            if name == "join" and args:
                items = list(args[0]) if not isinstance(args[0], list | tuple) else args[0]
                _check(sum(len(str(i)) for i in items) + len(owner) * len(items), "join")
                return owner.join(items)
        return super().call(__context, __obj, *args, **kwargs)


def render_bounded(template: Any, variables: dict[str, Any]) -> str:
    """Render with a fresh iteration budget; the result is bounded too."""
    token = _budget.set([MAX_ITERATIONS])
    try:
        text: str = template.render(**variables)
    finally:
        _budget.reset(token)
    _check(len(text), "the rendered prompt")
    return text
