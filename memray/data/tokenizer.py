"""Tokenizers: byte-level (the default, nothing to train) and a byte-level BPE trained on the corpus.

Both encode text to ids with three special tokens (BOS, EOS, PAD) and describe themselves for an
ingestion manifest (``describe()``); ``load_tokenizer`` rebuilds one from such a description.
A BPE tokenizer lives in a ``tokenizer.json`` of the ``tokenizers`` library beside the shards it
encoded (its SHA-256 in the manifest), and is copied into every run and checkpoint trained on
them so evaluation decodes with the same vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from memray.errors import InputError

TOKEN_DTYPE_MAX = 1 << 16  # shards store ids as uint16
BPE_SPECIALS = ("<bos>", "<eos>", "<pad>")
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    name = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259
    # the answer follows the prompt's space as its own byte; prompts end with that space
    prompt_suffix = " "
    path = None  # nothing to save beside a run: the byte tokenizer is built in

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Bytes up to the first EOS; other special tokens are dropped."""
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i < 256:
                out.append(i)
        return out.decode("utf-8", errors="replace")

    def describe(self) -> dict:
        return {
            "kind": self.name,
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


class BPETokenizer:
    """A byte-level BPE (``tokenizers`` library) with ``<bos>``, ``<eos>``, ``<pad>``."""

    name = "bpe"
    # byte-level BPE merges a word's leading space into the word: a prompt ends before the space
    prompt_suffix = ""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a plain Exception for unreadable files
            raise InputError(f"{self.path}: not a readable tokenizers JSON file ({exc})") from None
        ids = [self._tok.token_to_id(s) for s in BPE_SPECIALS]
        if None in ids:
            raise InputError(f"{self.path}: the tokenizer lacks the special tokens {BPE_SPECIALS}")
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = self._tok.get_vocab_size()
        if self.vocab_size > TOKEN_DTYPE_MAX:
            raise InputError(f"{self.path}: vocabulary of {self.vocab_size} exceeds {TOKEN_DTYPE_MAX} (uint16 shards)")
        self._specials = set(ids)

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """BOS + ids + EOS for each text (the library's threads, for ingestion)."""
        return [[self.bos_id, *e.ids, self.eos_id] for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text up to the first EOS; other special tokens are dropped."""
        kept = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in self._specials:
                kept.append(i)
        return self._tok.decode(kept)

    def describe(self) -> dict:
        from memray.files import sha256_file

        return {
            "kind": self.name,
            "file": self.path.name,
            "sha256": sha256_file(self.path),
            "vocab_size": self.vocab_size,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
        }


def train_bpe(texts, vocab_size: int, path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE of ``vocab_size`` ids (specials included) on an iterator of texts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not 256 + len(BPE_SPECIALS) <= vocab_size <= TOKEN_DTYPE_MAX:
        raise InputError(f"--vocab-size must be in [{256 + len(BPE_SPECIALS)}, {TOKEN_DTYPE_MAX}], got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(BPE_SPECIALS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return BPETokenizer(path)


def load_tokenizer(spec: dict, directory: str | Path):
    """The tokenizer an ingestion manifest (or a checkpoint) describes; a BPE file checked by SHA-256."""
    from memray.files import sha256_file

    kind = spec.get("kind")
    if kind == ByteTokenizer.name:
        return ByteTokenizer()
    if kind == BPETokenizer.name:
        path = Path(directory) / spec.get("file", TOKENIZER_FILE)
        if not path.is_file():
            raise InputError(f"{directory}: tokenizer file {path.name} is missing")
        if spec.get("sha256") and sha256_file(path) != spec["sha256"]:
            raise InputError(f"{directory}: tokenizer file {path.name} is damaged (checksum mismatch)")
        return BPETokenizer(path)
    raise InputError(f"{directory}: unknown tokenizer {spec!r} (this version reads 'byte' and 'bpe')")


def saved_tokenizer(directory: str | Path):
    """The tokenizer of a run or checkpoint directory: its ``tokenizer.json`` if it has one
    (a run trained on BPE shards), else the byte tokenizer."""
    path = Path(directory) / TOKENIZER_FILE
    return BPETokenizer(path) if path.is_file() else ByteTokenizer()
