"""Generation on top of the network and the checkpoint formats: ``GenerationConfig`` (config),
``generate`` (generate), n samples and beam search (search), structured output (structured)
and the CUDA-graph decode step (decode_graphs)."""
