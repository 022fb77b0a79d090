"""Linearize + LoRA fine-tuning: ``ligerfx train`` (``cli.py``), the loop (``trainer.py``), the data (``data.py``)."""
from .data import DataError, parse_count, read_records

__all__ = ["DataError", "parse_count", "read_records"]
