"""The data layer: tables -> events -> labels -> split -> vocab -> parquet shards -> Batch.

Importing the package loads nothing heavy: its names (``prepare``, ``load_tables``,
``DatasetSchema``, ...) are imported when first used (PEP 562), so that
``import engagerec.data.schema`` (what a reader, the model builder, predict and export need)
never loads DuckDB, the out-of-core writer's engine.

Example::

    >>> from engagerec.data import DatasetSchema, prepare
    >>> prepare.__module__, DatasetSchema.__module__
    ('engagerec.data.prepare', 'engagerec.data.schema')
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "ADAPTERS": "engagerec.data.adapters",
    "DataError": "engagerec.data.errors",
    "DatasetSchema": "engagerec.data.schema",
    "RawTables": "engagerec.data.raw",
    "format_summary": "engagerec.data.prepare",
    "load_tables": "engagerec.data.adapters",
    "prepare": "engagerec.data.prepare",
    "register_adapter": "engagerec.data.adapters",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """``name``, imported from its module on first use (PEP 562).

    Args:
        name: one of ``__all__``.

    Raises:
        AttributeError: for any other name.
    """
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list:
    """The package's names, the lazy ones included."""
    return sorted(set(globals()) | set(_EXPORTS))


class _DataPackage(types.ModuleType):
    """The package's module type: ``engagerec.data.prepare`` names the function, as it always
    has, even after the submodule of the same name is imported (the import system then records
    the submodule as an attribute of its package; the submodule stays in ``sys.modules``)."""

    @property
    def prepare(self) -> Any:
        """``engagerec.data.prepare.prepare``, the dataset writer."""
        return importlib.import_module("engagerec.data.prepare").prepare

    @prepare.setter
    def prepare(self, module: types.ModuleType) -> None:
        pass  # the submodule being recorded: reachable as sys.modules["engagerec.data.prepare"]


sys.modules[__name__].__class__ = _DataPackage
