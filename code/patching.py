"""One way to patch a library or an object for the length of a call, and undo it afterwards.

The converters reach into libraries that keep state in globals (abctoolkit, ``xml.etree``, a
module's ``print``) and extraction swaps layers' ``forward`` for faster kernels. Each patch must
leave the object exactly as it was, including *not* having an attribute it did not have before
(an instance ``forward`` that shadows the class's, say).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

_ABSENT = object()


def _own_attributes(obj: Any) -> dict[str, Any] | None:
    try:
        return vars(obj)
    except TypeError:  # no __dict__ (slots, builtins): getattr/setattr only
        return None


@contextlib.contextmanager
def patched(obj: Any, **attrs: Any) -> Iterator[Any]:
    """Set ``obj.name = value`` for each keyword, yield ``obj``, then restore every attribute: the
    previous value where ``obj`` had one of its own, otherwise the attribute is deleted again (so a
    class attribute or module fallback shows through as before). Restores on error too."""
    own = _own_attributes(obj)
    saved: list[tuple[str, Any]] = []
    try:
        for name, value in attrs.items():
            previous = own.get(name, _ABSENT) if own is not None else getattr(obj, name, _ABSENT)
            saved.append((name, previous))
            setattr(obj, name, value)
        yield obj
    finally:
        for name, previous in reversed(saved):
            if previous is _ABSENT:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, previous)
