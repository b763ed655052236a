"""Tests of raysft/config/, one file per module."""

MINIMAL = {"model": {"name_or_path": "some/model"}, "data": {"train": {"path": "train.jsonl"}}}
"""The two required keys: what each config test starts from."""
