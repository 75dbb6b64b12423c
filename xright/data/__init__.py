"""Data: records and validation (:mod:`.records`), one definition per data kind (:mod:`.kinds`), tokenisation
(:mod:`.tokenise`), tokenised examples on disk (:mod:`.store`), loading and blending (:mod:`.loading`), collation
and cycling loaders (:mod:`.collate`), built-in synthetic data (:mod:`.synthetic`). See docs/data.md.
"""

from .collate import CyclingLoader, collate
from .kinds import KINDS, DataKind
from .loading import DataSpec, load_data
from .records import DataError
from .store import ExampleTable
from .synthetic import preference_records, sft_records

__all__ = ["KINDS", "CyclingLoader", "DataError", "DataKind", "DataSpec", "ExampleTable", "collate", "load_data",
           "preference_records", "sft_records"]
