"""Deterministic batches of packed token rows for language-model training.

Documents (token lists, each starting with BOS and ending with EOS) are shuffled per epoch by
seed and packed greedily into rows of ``seq_len + 1`` tokens without splitting a document that
fits in a row; the rest of a row is padding, which the loss ignores. The position (epoch, batch)
fully determines the next batch, so a run can resume exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0


class PackedBatches:
    def __init__(self, documents: list[list[int]], seq_len: int, batch_size: int, pad_id: int, seed: int = 0):
        if not documents:
            raise ValueError("no documents to train on")
        self.documents = documents
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.position = Position()
        self._epoch_rows: tuple[int, list[list[int]]] | None = None

    def _rows(self, epoch: int) -> list[list[int]]:
        if self._epoch_rows is not None and self._epoch_rows[0] == epoch:
            return self._epoch_rows[1]
        order = list(range(len(self.documents)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        width = self.seq_len + 1
        rows: list[list[int]] = []
        row: list[int] = []
        for i in order:
            doc = self.documents[i]
            if len(row) + len(doc) > width and row:
                rows.append(row)
                row = []
            while len(doc) > width:  # a document longer than a row continues in the next rows
                rows.append(doc[:width])
                doc = doc[width - 1:]
            row = row + doc
        if row:
            rows.append(row)
        rows = [r + [self.pad_id] * (width - len(r)) for r in rows]
        self._epoch_rows = (epoch, rows)
        return rows

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self._rows(self.position.epoch)) // self.batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) [batch_size, seq_len]; padding targets are IGNORE_INDEX."""
        rows = self._rows(self.position.epoch)
        per_epoch = max(1, len(rows) // self.batch_size)
        if self.position.batch >= per_epoch:
            self.position = Position(self.position.epoch + 1, 0)
            rows = self._rows(self.position.epoch)
        start = self.position.batch * self.batch_size
        chunk = rows[start:start + self.batch_size]
        while len(chunk) < self.batch_size:  # fewer rows than one batch: wrap around
            chunk = chunk + rows[: self.batch_size - len(chunk)]
        self.position.batch += 1
        data = torch.tensor(chunk, dtype=torch.long)
        inputs, targets = data[:, :-1], data[:, 1:].clone()
        targets[targets == self.pad_id] = IGNORE_INDEX
        return inputs, targets
