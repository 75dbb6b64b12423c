"""Data: record formats and validation, loading (files and hub), tokenisation and masking,
collators, cycling loaders, built-in synthetic data; tokenised examples on disk (:mod:`.store`).

Public API: :class:`DataError`, :class:`DataSpec`, :func:`load_data`, :func:`collate`,
:class:`CyclingLoader`, :class:`ExampleTable` (what load_data returns with ``DataSpec.cache_dir``);
:mod:`xright.data.synthetic` for the built-in data.
"""

from .collate import CyclingLoader, collate
from .loading import DataSpec, load_data
from .records import DataError
from .store import ExampleTable
from .synthetic import preference_records, sft_records

__all__ = ["CyclingLoader", "DataError", "DataSpec", "ExampleTable", "collate", "load_data", "preference_records",
           "sft_records"]
