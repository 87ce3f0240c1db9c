"""The network: ``ModelConfig`` (config), the tensor-parallel split (parallel), the KV caches
(kv_cache), the ``Transformer`` itself (transformer) and what a model costs (stats). Nothing
here reads a checkpoint or generates text."""
