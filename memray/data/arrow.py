"""Reading ingested Arrow shards (``memray ingest``): memory-mapped, checked, in manifest order.

``ArrowDocuments(dir)`` is a read-only sequence of token lists over every shard, each shard
memory-mapped (the operating system pages documents in as they are read, so the corpus need not
fit in memory). The manifest's schema version is checked, its tokenizer loaded (``.tokenizer``),
and every shard against its SHA-256, before anything is read. ``PackedBatches`` packs, shuffles
per epoch by seed and records its position, so a resumed run continues with the next batch; each
rank of a sharded run keeps its own rows of every global batch.
"""

from __future__ import annotations

import bisect
import json
from pathlib import Path

from memray.errors import InputError
from memray.files import sha256_file

from .ingest import MANIFEST, SCHEMA_VERSION
from .tokenizer import load_tokenizer


class ArrowDocuments:
    def __init__(self, directory: str | Path, verify: bool = True):
        import pyarrow as pa

        self.directory = Path(directory)
        try:
            manifest = json.loads((self.directory / MANIFEST).read_text())
            shards = manifest["shards"]
        except FileNotFoundError:
            raise InputError(
                f"{self.directory}: no {MANIFEST} (not an ingested directory, or ingestion did not finish)"
            ) from None
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{self.directory}/{MANIFEST} is not a valid manifest") from None
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise InputError(
                f"{self.directory}/{MANIFEST}: schema version {manifest.get('schema_version')}, "
                f"this reader reads {SCHEMA_VERSION}"
            )
        self.tokenizer = load_tokenizer(manifest.get("tokenizer") or {}, self.directory)
        self.manifest = manifest
        self._columns, self._offsets, self._starts, total = [], [], [], 0
        for shard in shards:
            path = self.directory / shard["file"]
            if not path.is_file():
                raise InputError(f"{self.directory}: shard {shard['file']} is missing")
            if verify and sha256_file(path) != shard["sha256"]:
                raise InputError(f"{self.directory}: shard {shard['file']} is damaged (checksum mismatch)")
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all()
            column = table.column("tokens").combine_chunks()
            self._columns.append(column)
            self._offsets.append(column.offsets.to_numpy())
            self._starts.append(total)
            total += table.num_rows
        self._len = total
        if total == 0:
            raise InputError(f"{self.directory}: the shards hold no documents")

    def lengths(self):
        """Every document's token count (from the list offsets; no tokens are read)."""
        import numpy as np

        return np.concatenate([np.diff(offsets) for offsets in self._offsets])

    def tokens(self, index: int, start: int, stop: int):
        """Tokens ``[start, stop)`` of document ``index`` (a numpy view of the mapped shard)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        first = int(self._offsets[shard][index - self._starts[shard]])
        return self._columns[shard].values[first + start : first + stop].to_numpy()

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> list[int]:
        if not 0 <= index < self._len:
            raise IndexError(index)
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._columns[shard][index - self._starts[shard]].values.to_numpy().tolist()
