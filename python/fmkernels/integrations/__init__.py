"""fmkernels inside other libraries.

* ``fmkernels.integrations.transformers``: ``attn_implementation="fmkernels"`` for Hugging Face
  transformers models, and ``FilterLogits``, fmkernels' top-k/top-p/min-p filter as a logits
  processor for transformers' ``generate``. Importing it needs transformers.
"""
