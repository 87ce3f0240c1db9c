"""Checkpoint formats on top of the network: a Hugging Face directory (huggingface), a GGUF
file (gguf), tokenizers (tokenizer), chat templates (chat), and ``load`` (``load_pretrained``,
``load_config``, ``load_tokenizer``), which picks the format from the path."""
