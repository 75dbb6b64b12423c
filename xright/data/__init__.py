"""Data: record formats and validation, loading (files and hub), tokenisation and masking,
collators, cycling loaders, built-in synthetic data.

Public API: :class:`DataError`, :class:`DataSpec`, :func:`load_data`, :func:`collate`,
:class:`CyclingLoader`; :mod:`xright.data.synthetic` for the built-in data.
"""

from .collate import CyclingLoader, collate
from .loading import DataSpec, load_data
from .records import DataError
from .synthetic import preference_records, sft_records

__all__ = ["CyclingLoader", "DataError", "DataSpec", "collate", "load_data", "preference_records",
           "sft_records"]
