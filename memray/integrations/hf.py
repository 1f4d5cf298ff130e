"""Hugging Face ``transformers``: export a trained memray model as a ``transformers`` model, and
put memray's memory layers into a ``transformers`` model.

``export_hf(checkpoint, out)`` writes ``config.json`` (``model_type: memray``, the memray model
config, ``auto_map`` to the modeling code), ``model.safetensors`` (every weight, the value pools
whole), ``generation_config.json``, ``modeling_memray.py`` and the run's tokenizer (a BPE run's
``tokenizer.json``; a byte-level run's ids are UTF-8 bytes, with BOS/EOS/PAD after them, stated
in ``config.json``). ``transformers`` is imported only where a model is loaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from memray.config import to_dict
from memray.errors import InputError
from memray.model import MemoryConfig, ProductKeyMemory

MODELING = Path(__file__).with_name("hf_modeling.py")
#: largest value pools (all of them together) exported into one safetensors file by one process
MAX_POOL_BYTES = 16 << 30


def export_hf(checkpoint: str | Path, out: str | Path, max_pool_bytes: int = MAX_POOL_BYTES) -> Path:
    """Write CHECKPOINT's model as a ``transformers`` model directory ``out``; returns it."""
    from safetensors.torch import save_file

    from memray.checkpoint.model import load_trained_model
    from memray.data import saved_tokenizer
    from memray.data.tokenizer import TOKENIZER_FILE

    model, config, ckpt, manifest = load_trained_model(checkpoint)
    pool_bytes = sum(t.weight.numel() * t.weight.element_size() for t in model.value_tables().values())
    if pool_bytes > max_pool_bytes:
        raise InputError(
            f"checkpoint {ckpt}: its value pools hold {pool_bytes / 2**30:.1f} GiB, over the "
            f"{max_pool_bytes / 2**30:.0f} GiB one process exports into one file (memory.zarr keeps them sharded)"
        )
    tokenizer = saved_tokenizer(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors", metadata={"format": "pt", "step": str(manifest["step"])})
    shutil.copyfile(MODELING, out / "modeling_memray.py")
    special = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    hf_config = {
        "architectures": ["MemrayForCausalLM"],
        "model_type": "memray",
        "auto_map": {
            "AutoConfig": "modeling_memray.MemrayConfig",
            "AutoModelForCausalLM": "modeling_memray.MemrayForCausalLM",
        },
        "memray_model": to_dict(config),
        "memray_tokenizer": tokenizer.describe(),
        "memray_checkpoint": {"path": str(ckpt), "step": manifest["step"]},
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "use_cache": False,
        "tie_word_embeddings": False,
        "dtype": "float32",
        **special,
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    generation = {**special, "do_sample": False, "use_cache": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if tokenizer.path is not None:
        shutil.copyfile(tokenizer.path, out / TOKENIZER_FILE)
    return out


# -- memory retrofits ----------------------------------------------------------------------------


class MemoryBeside(nn.Module):
    """A decoder block's FFN with a memory layer beside it, reading the same input:
    ``ffn(x) + memory(x)``."""

    def __init__(self, ffn: nn.Module, memory: ProductKeyMemory):
        super().__init__()
        self.ffn, self.memory = ffn, memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x) + self.memory(x)


class RetrofitParameters(NamedTuple):
    """The parameters :func:`add_memory` added: the value pools (row-sparse gradients: give them
    to a memray row-sparse optimizer) and the rest (keys, query and output projections)."""

    values: list[nn.Parameter]
    other: list[nn.Parameter]


def _decoder_layers(model: nn.Module):
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") for layer in layers):
        raise ValueError(
            f"add_memory needs a Llama-architecture model (model.model.layers[i].mlp), not {type(model).__name__}"
        )
    return layers


def add_memory(
    model: nn.Module, layers: list[int], config: MemoryConfig, *, replace: bool = False
) -> RetrofitParameters:
    """Put Memory+ layers into a ``transformers`` causal LM of the Llama architecture.

    Each listed decoder layer gets a :class:`ProductKeyMemory` of ``config`` beside its FFN
    (``replace=True``: instead of it), on the model's device and dtype. The memory's output
    starts at zero (its output projection, or without one its value rows), so beside the FFN the
    model computes exactly the same function as before until the memory trains. Returns the new
    parameters; the model's own are left as they were (freeze them to train the memory only).
    """
    blocks = _decoder_layers(model)
    hidden = model.config.hidden_size
    reference = next(model.parameters())
    values, other = [], []
    for index in layers:
        if not 0 <= index < len(blocks):
            raise ValueError(f"layer {index} is not one of the model's {len(blocks)} decoder layers")
        memory = ProductKeyMemory(hidden, config, device=reference.device)
        with torch.no_grad():
            if hasattr(memory, "out_proj"):
                memory.out_proj.weight.zero_()
                memory.out_proj.bias.zero_()
            else:
                memory.values.weight.zero_()
        if reference.dtype != torch.float32:
            memory.to(dtype=reference.dtype)
        block = blocks[index]
        block.mlp = memory if replace else MemoryBeside(block.mlp, memory)
        table = memory.values.weight
        values.append(table)
        other.extend(p for p in memory.parameters() if p is not table)
    return RetrofitParameters(values, other)


def memory_layers(model: nn.Module) -> dict[int, ProductKeyMemory]:
    """Decoder layer index -> the memory layer :func:`add_memory` put there."""
    found = {}
    for index, layer in enumerate(_decoder_layers(model)):
        module = layer.mlp.memory if isinstance(layer.mlp, MemoryBeside) else layer.mlp
        if isinstance(module, ProductKeyMemory):
            found[index] = module
    return found


def save_memory(model: nn.Module, path: str | Path) -> None:
    """The retrofitted memory layers' weights (value pools and usage counts included) as one
    safetensors file; nothing is pickled."""
    from safetensors.torch import save_file

    state = {
        f"layers.{index}.{key}": value.detach().contiguous()
        for index, memory in memory_layers(model).items()
        for key, value in memory.state_dict().items()
    }
    save_file(state, str(path))


def load_memory(model: nn.Module, path: str | Path) -> None:
    """Load :func:`save_memory`'s file into a model retrofitted with the same layers and config."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    for index, memory in memory_layers(model).items():
        prefix = f"layers.{index}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        missing, unexpected = memory.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise InputError(f"{path}: memory of layer {index} does not match (missing {missing[:3]})")
