"""Deterministic batches of packed token rows for language-model training.

Documents (token sequences, each starting with BOS and ending with EOS) are shuffled per epoch by
seed and packed greedily into rows of ``seq_len + 1`` tokens without splitting a document that
fits in a row (a longer one continues over the next rows, one token overlapping so no target is
lost); the rest of a row is padding, which the loss ignores. Global batch ``b`` is rows
``[b * batch_size, (b + 1) * batch_size)`` of the epoch's packing, wrapping around when an epoch
holds fewer rows than one batch.

Documents are read through one interface, ``len(documents)``, ``documents.lengths()`` and
``documents.tokens(index, start, stop)``: memory-mapped Arrow shards
(:class:`memray.data.arrow.ArrowDocuments`) and :class:`TokenLists` in memory (plain lists of
token lists are wrapped in one). The packing is planned from document lengths alone (Arrow
shards give them without reading tokens) and stored as compact
arrays of pieces (document, start, length); a rank builds only its own rows of each global batch
(``rows``, a slice of the batch), so ranks read disjoint token ranges and nobody materializes the
corpus. The position (epoch, batch) fully determines the next batch, and the global batch does
not depend on the number of ranks, so a run resumes exactly, on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100


@dataclass
class Position:
    epoch: int = 0
    batch: int = 0


@dataclass
class _Packing:
    row_ptr: np.ndarray  # [rows + 1] first piece of each row
    doc: np.ndarray  # [pieces] document of each piece
    start: np.ndarray  # [pieces] first token of the piece in its document
    length: np.ndarray  # [pieces]

    @property
    def num_rows(self) -> int:
        return len(self.row_ptr) - 1


def plan_packing(lengths, width: int, order) -> _Packing:
    """Greedy packing of documents (in ``order``) into rows of ``width`` tokens."""
    lengths = np.asarray(lengths, dtype=np.int64)
    row_ptr, doc, start, length = [0], [], [], []
    filled = 0
    for i, n in zip(order.tolist(), lengths[order].tolist()):
        if filled and filled + n > width:
            row_ptr.append(len(doc))
            filled = 0
        s = 0
        while n - s > width:  # the row is empty here: a long document fills whole rows
            doc.append(i), start.append(s), length.append(width)
            row_ptr.append(len(doc))
            s += width - 1
        doc.append(i), start.append(s), length.append(n - s)
        filled += n - s
    if filled:
        row_ptr.append(len(doc))
    as_array = lambda xs: np.asarray(xs, dtype=np.int64)  # noqa: E731
    return _Packing(as_array(row_ptr), as_array(doc), as_array(start), as_array(length))


class TokenLists:
    """Documents in memory (lists of token ids), read like :class:`memray.data.arrow.ArrowDocuments`."""

    def __init__(self, documents: list[list[int]]):
        self.documents = documents

    def __len__(self) -> int:
        return len(self.documents)

    def lengths(self) -> list[int]:
        return [len(d) for d in self.documents]

    def tokens(self, index: int, start: int, stop: int) -> list[int]:
        return self.documents[index][start:stop]


class PackedBatches:
    def __init__(self, documents, seq_len: int, batch_size: int, pad_id: int, seed: int = 0, rows: slice | None = None):
        """``documents``: Arrow shards, :class:`TokenLists`, or a list of token lists;
        ``rows``: this rank's share of every global batch (default: all ``batch_size`` rows)."""
        if not len(documents):
            raise ValueError("no documents to train on")
        self.documents = TokenLists(documents) if isinstance(documents, list) else documents
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.rows = range(batch_size)[rows or slice(None)]
        self.position = Position()
        self._lengths = np.asarray(self.documents.lengths(), dtype=np.int64)
        self._packing: tuple[int, _Packing] | None = None

    def packing(self, epoch: int) -> _Packing:
        if self._packing is None or self._packing[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._lengths))
            self._packing = (epoch, plan_packing(self._lengths, self.seq_len + 1, order))
        return self._packing[1]

    @property
    def batches_per_epoch(self) -> int:
        return max(1, self.packing(self.position.epoch).num_rows // self.batch_size)

    def _row(self, packing: _Packing, row: int) -> np.ndarray:
        out = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        at = 0
        for p in range(packing.row_ptr[row], packing.row_ptr[row + 1]):
            n = int(packing.length[p])
            start = int(packing.start[p])
            out[at : at + n] = self.documents.tokens(int(packing.doc[p]), start, start + n)
            at += n
        return out

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's rows of the next global batch: (inputs, targets) [rows, seq_len]; padding
        targets are IGNORE_INDEX."""
        packing = self.packing(self.position.epoch)
        if self.position.batch >= max(1, packing.num_rows // self.batch_size):
            self.position = Position(self.position.epoch + 1, 0)
            packing = self.packing(self.position.epoch)
        first = self.position.batch * self.batch_size
        rows = [self._row(packing, (first + k) % packing.num_rows) for k in self.rows]
        self.position.batch += 1
        data = torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, self.seq_len + 1, dtype=torch.long)
        inputs, targets = data[:, :-1], data[:, 1:].clone()
        targets[targets == self.pad_id] = IGNORE_INDEX
        return inputs, targets
