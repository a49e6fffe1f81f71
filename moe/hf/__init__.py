"""Hugging Face interoperability: ``export.py`` writes a run as a ``MixtralForCausalLM`` folder
with its tokenizer (identical logits); ``import_hf.py`` reads a Mixtral, OLMoE, Qwen3-MoE or
Qwen2-MoE folder as our model or a run folder (identical logits), refusing by name what our
model cannot express."""
