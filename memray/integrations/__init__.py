"""memray with other tools: Hugging Face ``transformers`` export and memory retrofits (``hf``)."""
