"""Data: tokenizer, facts files, the synthetic knowledge base, packed training batches."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memray.errors import ConfigError, InputError

from .facts import Fact, read_facts, write_facts
from .packing import IGNORE_INDEX, PackedBatches
from .synthetic import STYLES, generate_facts, style_attributes
from .tokenizer import BPETokenizer, ByteTokenizer, saved_tokenizer


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["synthetic", "facts", "text", "arrow"] = "synthetic"
    # facts JSONL (facts), a UTF-8 text file (text), a directory of `memray ingest` shards (arrow)
    path: str | None = None
    num_entities: int = 400  # synthetic: facts = num_entities * num_attributes
    num_attributes: int = 5
    style: Literal["names", "syllables", "numbers"] = "names"  # synthetic: the kind of facts
    seed: int = 0
    seq_len: int = 128

    def __post_init__(self):
        if self.source != "synthetic" and not self.path:
            raise ConfigError("path", f"source '{self.source}' needs a path")
        if self.num_entities < 1:
            raise ConfigError("num_entities", f"must be >= 1, got {self.num_entities}")
        if self.style not in STYLES:
            raise ConfigError("style", f"must be one of {', '.join(STYLES)}, got {self.style!r}")
        most = len(style_attributes(self.style))
        if not 1 <= self.num_attributes <= most:
            raise ConfigError(
                "num_attributes", f"must be in [1, {most}] for style {self.style}, got {self.num_attributes}"
            )
        if self.seq_len < 2:
            raise ConfigError("seq_len", f"must be >= 2, got {self.seq_len}")


def load_documents(config: DataConfig):
    """(token documents, the facts they state or None for plain text, the tokenizer that made
    them): ingested shards carry their own tokenizer; other sources use the byte tokenizer."""
    if config.source == "arrow":
        from .arrow import ArrowDocuments

        documents = ArrowDocuments(config.path)
        return documents, None, documents.tokenizer
    tokenizer = ByteTokenizer()
    documents, facts = _byte_documents(config, tokenizer)
    return documents, facts, tokenizer


def _byte_documents(config: DataConfig, tokenizer: ByteTokenizer) -> tuple[list[list[int]], list[Fact] | None]:
    if config.source == "text":
        path = Path(config.path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"text file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read text file {path}: {exc}") from None
        paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
        if not paragraphs:
            raise InputError(f"text file {path} is empty")
        return [tokenizer.encode(p, bos=True, eos=True) for p in paragraphs], None
    if config.source == "facts":
        facts = read_facts(config.path)
    else:
        facts = generate_facts(config.num_entities, config.num_attributes, config.seed, style=config.style)
    return [tokenizer.encode(f.text, bos=True, eos=True) for f in facts], facts


__all__ = [
    "STYLES",
    "BPETokenizer",
    "ByteTokenizer",
    "DataConfig",
    "Fact",
    "IGNORE_INDEX",
    "PackedBatches",
    "generate_facts",
    "load_documents",
    "read_facts",
    "saved_tokenizer",
    "write_facts",
]
