"""Replacing one attribute of an OpenFL object, once, with a way back (the tests restore them)."""
from __future__ import annotations

import inspect
from collections.abc import Callable

_REPLACED: list[tuple[object, str, object, object]] = []  # (owner, attribute, original, maker), in order applied


def replace(owner: object, name: str, make: Callable[[object], object]) -> None:
    """Set owner.name to make(original), unless this same `make` (the same code) already did: installing twice
    changes nothing, and two adjustments of one attribute wrap one another. (A static method is restored as one:
    what is kept for restore_all is the attribute as the class holds it.)"""
    maker = getattr(make, "__code__", make)
    if any(o is owner and n == name and m == maker for o, n, _, m in _REPLACED):
        return
    original = getattr(owner, name)
    _REPLACED.append((owner, name, inspect.getattr_static(owner, name), maker))
    setattr(owner, name, make(original))


def restore_all() -> None:
    """Put back every original that replace() swapped out."""
    while _REPLACED:
        owner, name, original, _ = _REPLACED.pop()
        setattr(owner, name, original)
