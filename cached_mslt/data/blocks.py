"""Prepared (token-id) examples served in the same blocks as the activation store.

Live training reads the prepared dataset through the same block structure and the same
loader as cached training reads the store, so with one seed both see identical rows in
identical order: that is what lets a test compare them step by step.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class PreparedBlocks(Dataset):
    """Item i = rows [i * block_rows, (i + 1) * block_rows) of a prepared split, limited to
    the first `num_rows`: the same rows, keys and block boundaries as a store's BlockDataset
    (token ids in place of hidden states)."""

    def __init__(self, dataset, block_rows: int, num_rows: int | None = None):
        self.dataset = dataset
        self.block_rows = block_rows
        self.num_rows = len(dataset) if num_rows is None else min(num_rows, len(dataset))

    def __len__(self) -> int:
        return -(-self.num_rows // self.block_rows)

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        batch = self.dataset[start:stop]
        return {
            "input_ids": torch.as_tensor(batch["input_ids"], dtype=torch.long),
            "attention_mask": torch.as_tensor(batch["attention_mask"], dtype=torch.long),
            "labels": torch.as_tensor(batch["labels"], dtype=torch.long),
            "row_index": torch.arange(start, stop, dtype=torch.long),
        }

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.block_rows
        return self.rows(start, min(start + self.block_rows, self.num_rows))
