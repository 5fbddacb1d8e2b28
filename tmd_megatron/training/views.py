"""Read-only views of state mappings (no dependencies: roles and exports both use them)."""
from __future__ import annotations

from collections.abc import Mapping


class Prefixed(Mapping):
    """A view of a state mapping with every key prefixed (the student's Wan weights live under `wan.`)."""

    def __init__(self, inner: Mapping, prefix: str, extra: Mapping | None = None):
        self.inner, self.prefix, self.extra = inner, prefix, dict(extra or {})

    def __getitem__(self, key):
        if key in self.extra:
            return self.extra[key]
        if key.startswith(self.prefix):
            return self.inner[key[len(self.prefix):]]
        raise KeyError(key)

    def __iter__(self):
        yield from (self.prefix + k for k in self.inner.keys())
        yield from self.extra

    def __len__(self):
        return len(self.inner) + len(self.extra)

    def __contains__(self, key):
        return key in self.extra or (key.startswith(self.prefix) and key[len(self.prefix):] in self.inner)
