"""Tiny pipelines a test module builds once, on first use, and shares between its tests (building one costs more
than most tests that use it); each test that takes one gets it back unwrapped, whatever the test wrapped."""

import s2fast


class BuiltOnce:
    def __init__(self, builders):
        self.builders, self._built = builders, {}

    def __getitem__(self, name):
        if name not in self._built:
            self._built[name] = self.builders[name]()
        return self._built[name]

    def unwrapped_after(self, name):
        """A fixture's body: the case ``name``, unwrapped after the test."""
        case = self[name]
        yield case
        s2fast.unwrap(case.pipe)
