"""Stop strings, found in a row's text as it grows at a cost per new character that does not
depend on how many stop strings there are or how long they are.

An Aho-Corasick automaton over a request's stop strings (built once per set of strings and
cached): its state after the text so far is the longest tail of the text that begins some
stop string. So one transition per new character tells both what a row needs:

- a stop string has just ended (the longest one ending here begins earliest), and where it
  begins: the text is cut there;
- how much of the text's tail a stream must hold back, since a stop string may be completing
  (the state's depth).

Scanning the whole tail for every stop string instead cost 3.1 ms per token per row with
16 strings of 256 characters (the most a request may send).
"""

from __future__ import annotations

import functools
from collections import deque


class StopAutomaton:
    """The automaton of a set of stop strings (immutable, shared by every row using them)."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._next: list[dict[str, int]] = [{}]  # the trie's edges
        self.depth = [0]  # each state's string's length
        self._fail = [0]  # the longest proper suffix of its string that is a state
        self.ending = [0]  # the longest stop string that ends its string (0: none)
        for stop in stops:
            state = 0
            for char in stop:
                following = self._next[state].get(char)
                if following is None:
                    following = len(self._next)
                    self._next[state][char] = following
                    self._next.append({})
                    self.depth.append(self.depth[state] + 1)
                    self._fail.append(0)
                    self.ending.append(0)
                state = following
            self.ending[state] = len(stop)
        queue = deque(self._next[0].values())
        while queue:  # breadth first: a state's suffix link is shallower, so it is ready
            state = queue.popleft()
            self.ending[state] = max(self.ending[state], self.ending[self._fail[state]])
            for char, following in self._next[state].items():
                self._fail[following] = self.step(self._fail[state], char) if state else 0
                queue.append(following)

    def step(self, state: int, char: str) -> int:
        """The state after ``char``."""
        while True:
            following = self._next[state].get(char)
            if following is not None:
                return following
            if state == 0:
                return 0
            state = self._fail[state]


@functools.lru_cache(maxsize=256)
def automaton(stops: tuple[str, ...]) -> StopAutomaton:
    """The automaton of ``stops``, built once for each set a request sends."""
    return StopAutomaton(stops)


class StopScan:
    """One row's scan of its text against its stop strings."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._automaton = automaton(stops)
        self._state = 0

    def feed(self, text: str, offset: int) -> int | None:
        """Scans ``text``, the row's text from ``offset`` on; returns where the earliest stop
        string ending in it begins (in the whole text), or None."""
        machine = self._automaton
        found = None
        state = self._state
        for i, char in enumerate(text):
            state = machine.step(state, char)
            length = machine.ending[state]
            if length:
                start = offset + i + 1 - length
                found = start if found is None else min(found, start)
        self._state = state
        return found

    @property
    def held(self) -> int:
        """How long a tail of the text so far a stop string begins with."""
        return self._automaton.depth[self._state]
