"""Reference models written in Flax NNX, with module paths that mirror Hugging Face's so PEFT
adapter keys map onto them directly. Imports jlora.errors only."""

from jlora.models.llama import KVCache, LlamaConfig, LlamaForCausalLM, from_pretrained

__all__ = ["KVCache", "LlamaConfig", "LlamaForCausalLM", "from_pretrained"]
