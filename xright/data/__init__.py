"""Data: records, kinds, tokenisation, the store, loading and the loaders; the modules: docs/data.md."""

from .collate import CyclingLoader, collate
from .kinds import KINDS, DataKind
from .loading import DataSpec, load_data
from .records import DataError
from .store import ExampleTable
from .synthetic import preference_records, sft_records

__all__ = ["KINDS", "CyclingLoader", "DataError", "DataKind", "DataSpec", "ExampleTable", "collate", "load_data",
           "preference_records", "sft_records"]
