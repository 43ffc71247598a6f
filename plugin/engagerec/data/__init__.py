"""The data layer: tables -> events -> labels -> split -> vocab -> parquet shards -> Batch."""

from engagerec.data.adapters import ADAPTERS, load_tables, register_adapter
from engagerec.data.errors import DataError
from engagerec.data.prepare import format_summary, prepare
from engagerec.data.raw import RawTables
from engagerec.data.schema import DatasetSchema

__all__ = [
    "ADAPTERS",
    "DataError",
    "DatasetSchema",
    "RawTables",
    "format_summary",
    "load_tables",
    "prepare",
    "register_adapter",
]
