"""Loader for the synthetic task files beside this file (`custom_dataset: !function synthetic_data.load`).

lm-eval resolves relative `data_files` against the current directory, so the YAML files name the task and this
loader finds its JSONL files relative to itself; the rows go straight into memory (no datasets cache is written).
"""

import json
from pathlib import Path

import datasets


DATA_DIR = Path(__file__).resolve().parent / "data"


def load(name: str, **metadata) -> datasets.DatasetDict:
    splits = {}
    for split in ("train", "test"):
        path = DATA_DIR / f"{name}_{split}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"synthetic task data {path} is missing; regenerate it with `mudd write-tasks`")
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in path.read_text().splitlines()])
    return datasets.DatasetDict(splits)
