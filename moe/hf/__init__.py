"""Hugging Face interoperability: ``export.py`` writes a run as a ``MixtralForCausalLM`` folder
with its tokenizer (identical logits)."""
