"""Model files: GGUF / safetensors loaders, tokenizer, chat templates, config, registry.

Deliberately empty of imports: resolving a model name must not pay for torch or tokenizers.
Import what you need from the submodules (e.g. ``forge_batch.models.registry.load_model_files``).
"""
