"""
Command-line options whose errors fit on one line: Twisted's typed options
say "Parameter type enforcement failed: invalid literal for int()" without
naming the option; ours name it and the kind of value wanted.
"""

from typing import Any

from twisted.python import usage

_KINDS = {int: "a whole number", float: "a number"}


class _NamedCoercion(usage.CoerceParameter):
    def dispatch(self, parameterName: str, value: Any) -> None:
        try:
            super().dispatch(parameterName, value)
        except usage.UsageError:
            raise usage.UsageError(f"--{parameterName} {value!r}: must be {_KINDS.get(self.coerce, 'valid')}")


class Options(usage.Options):
    """L{usage.Options} with typed options that name themselves in errors."""

    def __init__(self) -> None:
        super().__init__()
        self._dispatch = {name: _NamedCoercion(self, handler.coerce) if type(handler) is usage.CoerceParameter
                          else handler for name, handler in self._dispatch.items()}
