"""Packed batches: deterministic, disjoint per rank, independent of the number of ranks."""

import numpy as np
import pytest
import torch

from memray.data import PackedBatches
from memray.data.arrow import ArrowDocuments
from memray.data.ingest import ingest
from memray.data.packing import IGNORE_INDEX
from memray.distributed.plan import balanced_ranges

PAD = 99


def _documents(count=37, seed=0):
    """BOS=97 + 1..40 distinct tokens + EOS=98; a few longer than a row."""
    rng = np.random.default_rng(seed)
    docs, token = [], 0
    for i in range(count):
        n = int(rng.integers(1, 40)) if i % 9 else 45  # every 9th is longer than seq_len + 1 = 17
        docs.append([97, *range(token, token + n), 98])
        token += n
    return docs


def _batches(docs, world, rank, steps, batch=5, seq_len=16, seed=3):
    batches = PackedBatches(docs, seq_len, batch, PAD, seed, rows=slice(*balanced_ranges(batch, world)[rank]))
    return [batches.next() for _ in range(steps)], batches


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_take_disjoint_rows_of_the_same_global_batch(world):
    docs = _documents()
    whole, _ = _batches(docs, 1, 0, steps=12)  # spans several epochs
    parts = [_batches(docs, world, rank, steps=12)[0] for rank in range(world)]
    for step in range(12):
        inputs = torch.cat([p[step][0] for p in parts])
        targets = torch.cat([p[step][1] for p in parts])
        assert torch.equal(inputs, whole[step][0]) and torch.equal(targets, whole[step][1])
    # batch 5 over 4 ranks: shares 2,1,1,1 rows, no row twice
    assert sum(p[0][0].shape[0] for p in parts) == 5


def test_an_epoch_holds_every_token_and_resumes_exactly():
    docs = _documents()
    batches = PackedBatches(docs, 16, 1, PAD, seed=3)
    seen = []
    for _ in range(batches.batches_per_epoch):
        inputs, targets = batches.next()
        row = torch.cat([inputs[0], targets[0, -1:]])
        seen += [t for t in row.tolist() if 0 <= t < 97]
    # long documents continue over rows with one token of overlap (so no target is lost)
    expected = sorted(t for d in docs for t in d if t < 97)
    assert sorted(set(seen)) == expected and len(seen) >= len(expected)
    order_a = [batches.next()[0] for _ in range(3)]
    resumed = PackedBatches(docs, 16, 1, PAD, seed=3)
    resumed.position = type(batches.position)(batches.position.epoch, batches.position.batch - 3)
    assert all(torch.equal(a, resumed.next()[0]) for a in order_a)
    assert batches.position.epoch == 1  # epochs reshuffle by seed
    assert not torch.equal(
        PackedBatches(docs, 16, 1, PAD, seed=4).next()[0], PackedBatches(docs, 16, 1, PAD, seed=3).next()[0]
    )


def test_padding_is_ignored_and_rows_do_not_split_short_documents():
    docs = [[97, 1, 2, 98], [97, 3, 98], [97, 4, 5, 6, 7, 98]]
    inputs, targets = PackedBatches(docs, 7, 2, PAD, seed=0).next()
    assert (targets == IGNORE_INDEX).sum() == (inputs == PAD).sum() + (targets == IGNORE_INDEX).logical_and(
        inputs != PAD
    ).sum()
    for row in torch.cat([inputs, targets[:, -1:]], dim=1).tolist():
        body = [t for t in row if t != PAD]
        # whole documents only: each BOS has its EOS in the same row
        assert body.count(97) == body.count(98)


def test_arrow_shards_pack_like_token_lists(tmp_path):
    texts = [f"document {i} " + "x" * (i * 7 % 50) for i in range(60)]
    (tmp_path / "a.jsonl").write_text("".join(f'{{"text": "{t}"}}\n' for t in texts))
    ingest([tmp_path / "a.jsonl"], tmp_path / "out", shard_tokens=300, workers=1)
    arrow = ArrowDocuments(tmp_path / "out")
    as_lists = [arrow[i] for i in range(len(arrow))]
    assert len(arrow.manifest["shards"]) > 1
    assert arrow.lengths().tolist() == [len(d) for d in as_lists]
    assert arrow.tokens(5, 2, 9).tolist() == as_lists[5][2:9]
    for rank in range(2):
        a, _ = _batches(arrow, 2, rank, steps=6, seq_len=32)
        b, _ = _batches(as_lists, 2, rank, steps=6, seq_len=32)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
