"""Hugging Face interoperability: ``export.py`` writes a run as a ``MixtralForCausalLM`` folder
with its tokenizer (identical logits); ``import_hf.py`` reads a Mixtral, OLMoE, Qwen3-MoE or
Qwen2-MoE folder as our model or a run folder (identical logits), refusing by name what our
model cannot express; ``gguf.py`` writes a run as one GGUF file for llama.cpp (its llama
architecture with experts, as llama.cpp's converter writes Mixtral)."""
