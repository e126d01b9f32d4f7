"""Topic filters of the WebSocket relay: checked, made absolute within one organization,
and matched against received topics through a trie (one walk per message, whatever the
number of clients and filters).

A client's filter is relative to its organization and starts with a device level: a slug
or ``+`` (``+/telemetry``, ``sensor-1/#``, ``+/commands/+/result``). It can never name
another organization, ``$SYS`` or ``$share``: the organization's prefix is always put in
front, and a filter that is not a well-formed MQTT filter of slugs, kinds and wildcards is
refused before anything changes.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from typing import Any

from lms_core.topics import SLUG_RE

#: A level after the device: the kinds of DESIGN.md's topic table, command ids, wildcards.
_LEVEL = re.compile(r"[a-z0-9_-]{1,63}")
MAX_FILTER_CHARS = 200
MAX_LEVELS = 6


class FilterError(ValueError):
    """Why a filter is refused (a sentence for the error frame)."""


def check_filter(text: Any) -> str:
    """``text`` if it is an acceptable relative filter, else FilterError."""
    if not isinstance(text, str) or not text:
        raise FilterError("a filter is a non-empty string such as '+/telemetry'")
    if len(text) > MAX_FILTER_CHARS:
        raise FilterError(f"a filter has at most {MAX_FILTER_CHARS} characters")
    levels = text.split("/")
    if len(levels) > MAX_LEVELS:
        raise FilterError(f"a filter has at most {MAX_LEVELS} levels")
    first = levels[0]
    if first == "#":
        raise FilterError("a filter starts with a device slug or '+': use '+/#' for everything of the organization")
    if first != "+" and not SLUG_RE.fullmatch(first):
        raise FilterError(f"the first level must be a device slug or '+', got {first[:40]!r} (a filter is relative "
                          "to your organization)")
    for i, level in enumerate(levels[1:], start=1):
        if level == "#":
            if i != len(levels) - 1:
                raise FilterError("'#' may only be the last level")
        elif level != "+" and not _LEVEL.fullmatch(level):
            raise FilterError(f"level {i + 1} ({level[:40]!r}) must be a topic word, '+' or '#'")
    return text


class FilterTrie:
    """Filters -> their holders; :meth:`match` gives the holders of every filter a topic matches."""

    __slots__ = ("children", "holders", "rest")

    def __init__(self) -> None:
        self.children: dict[str, FilterTrie] = {}
        self.holders: set[Hashable] = set()  # of filters ending here
        self.rest: set[Hashable] = set()     # of filters ending here in '#'

    def add(self, absolute: str, holder: Hashable) -> None:
        node = self
        for level in absolute.split("/"):
            if level == "#":
                node.rest.add(holder)
                return
            node = node.children.setdefault(level, FilterTrie())
        node.holders.add(holder)

    def remove(self, absolute: str, holder: Hashable) -> None:
        path: list[tuple[FilterTrie, str]] = []
        node = self
        for level in absolute.split("/"):
            if level == "#":
                node.rest.discard(holder)
                break
            child = node.children.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        else:
            node.holders.discard(holder)
        # Prune empty branches, so that a trie of clients who came and went stays small.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.holders or child.rest:
                break
            del parent.children[level]

    def match(self, topic: str) -> set[Hashable]:
        out: set[Hashable] = set()
        self._match(topic.split("/"), 0, out)
        return out

    def _match(self, levels: list[str], i: int, out: set[Hashable]) -> None:
        if self.rest:
            out |= self.rest  # '#' also matches the parent level itself (MQTT 4.7.1.2)
        if i == len(levels):
            out |= self.holders
            return
        child = self.children.get(levels[i])
        if child is not None:
            child._match(levels, i + 1, out)
        plus = self.children.get("+")
        if plus is not None:
            plus._match(levels, i + 1, out)

    def empty(self) -> bool:
        return not (self.children or self.holders or self.rest)
