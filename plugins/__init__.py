"""First-party plugins, registered through the same hooks as third-party ones (installed as
``forge_batch.plugins``): ``readers`` (jsonl, parquet, openai-batch), ``writers`` (parquet, jsonl,
openai-batch), ``samplers``, ``constraints``, ``prepare`` (row -> prompt) and ``validate`` (constrained
outputs are checked before they are written)."""
