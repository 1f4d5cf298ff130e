"""memray models for Hugging Face ``transformers`` (copied as ``modeling_memray.py`` into a model
exported with ``memray export --format hf`` and registered there through ``auto_map``).

``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` builds the same
``memray.model.Transformer`` that memray trains, from the ``memray_model`` section of
``config.json``, so its logits are memray's; the memory layers' kernels come from the
``memray-layers`` package, which must be installed where the model is loaded. Batches must be
unpadded (an ``attention_mask`` with zeros is refused); ``generate()`` recomputes the sequence
at each step (``use_cache`` is off: memray's own KV cache is not a ``transformers`` Cache).
"""

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

try:
    from transformers import PreTrainedConfig
except ImportError:  # transformers < 5
    from transformers import PretrainedConfig as PreTrainedConfig


class MemrayConfig(PreTrainedConfig):
    model_type = "memray"

    def __init__(self, memray_model=None, **kwargs):
        self.memray_model = dict(memray_model or {})
        kwargs.setdefault("use_cache", False)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class MemrayForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MemrayConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["Block"]

    def __init__(self, config: MemrayConfig):
        super().__init__(config)
        from memray.config import from_dict
        from memray.model import ModelConfig, Transformer

        self.model = Transformer(from_dict(ModelConfig, config.memray_model, prefix="model"))
        self.post_init()

    def _init_weights(self, module):
        """memray initialises its own weights, and from_pretrained loads them all; what is derived
        rather than saved (the rotary tables) is recomputed here, as memray does after loading."""
        from memray.model.layers import Rotary

        if isinstance(module, Rotary):
            with torch.no_grad():
                module.reset_parameters()

    def get_input_embeddings(self):
        return self.model.embed

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("memray models take unpadded batches: attention_mask must be all ones")
        logits = self.model(input_ids)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
