"""A decode step on static buffers, captured once per batch-size bucket in a CUDA graph.

A decode step of a small model on a GPU is launch-bound: each of its few hundred kernels
takes microseconds, and the host spends more than that launching each one (and the model's
own forward adds host work: cache bookkeeping, an id check that reads the ids back). Here the
step (embedding, every layer's ``append_kv`` and ``decode_attention``, the LM head and
``fmkernels.sample``) runs on buffers that live as long as the generation: input ids, cache
lengths, the block table of a paged cache, seeds, steps and the token bitmask. On CUDA the
step is captured in a ``torch.cuda.CUDAGraph`` the first time a batch-size bucket is used
(after one eager run of it on a side stream, which compiles Triton kernels and is that step's
result) and replayed afterwards: one launch per step, nothing read back until the caller reads
the tokens. Elsewhere, and with ``graphs=False``, the same step runs eagerly on the same
buffers, so its bookkeeping is tested where there is no GPU.

Buckets are powers of two below the batch and the batch itself (a batch of 12: 1, 2, 4, 8,
12): a step of n live rows runs the smallest bucket that holds them, and the rows past n are
padding. A padding row reads and writes nothing a live sequence owns: in a contiguous cache it
is a row no live sequence uses (live sequences sit in the first rows, ``ContiguousKVCache.keep``),
written at its position 0; in a paged cache its block table points at a scratch block taken
from the pool for the generation. Its token is drawn and ignored. Each step's host work is
the cache's bookkeeping (``reserve``: capacity, new blocks), a few small copies into the
buffers, the replay, and ``advance``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from ... import ops
from ..._validation import device_checks


#: A padding row's filters: greedy, nothing filtered.
_PADDING_FILTERS = {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


def bucket_sizes(capacity: int) -> List[int]:
    """The batch sizes a step runs at: powers of two below ``capacity``, then ``capacity``."""
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    sizes, size = [], 1
    while size < capacity:
        sizes.append(size)
        size *= 2
    return sizes + [capacity]


class DecodeGraphs:
    """Decode steps of ``model`` against ``cache`` for up to ``capacity`` sequences.

    Parameters
    ----------
    model : Transformer
    cache : ContiguousKVCache (``capacity`` rows) or PagedKVCache (one block free for the
        padding rows' scratch, taken here)
    capacity : int, the most sequences a step runs (generate's batch).
    sampling : dict of ``fmkernels.sample``'s options (temperature, top_k, top_p, min_p,
        return_logprobs, num_logprobs); a filter given as a tensor takes a value per row, in a
        static buffer of its own that each ``step`` fills (``rows``).
    vocab_words : int or None, the words of a row of the ``allowed`` bitmask when steps take one.
    graphs : bool, capture each bucket's step in a CUDA graph (the model must be on CUDA).
    """

    def __init__(self, model, cache, capacity: int, sampling: dict, *, vocab_words: Optional[int] = None,
                 graphs: bool = False):
        if graphs and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, it is on {model.device}")
        self.model, self.cache, self.graphs = model, cache, graphs
        self.buckets = bucket_sizes(capacity)
        rows, device = self.buckets[-1], model.device
        self.sampling = {name: value for name, value in sampling.items() if not isinstance(value, torch.Tensor)}
        self.row_values = {name: torch.zeros(rows, dtype=value.dtype, device=device)
                           for name, value in sampling.items() if isinstance(value, torch.Tensor)}
        if not cache.paged and len(cache.lengths) < rows:
            raise ValueError(f"a contiguous cache of {len(cache.lengths)} rows cannot run {rows} sequences")
        self.ids = torch.zeros(rows, 1, dtype=torch.int64, device=device)
        self.seqlens = torch.zeros(rows, dtype=torch.int32, device=device)
        self.seeds = torch.zeros(rows, dtype=torch.int64, device=device)
        self.steps = torch.zeros(rows, dtype=torch.int64, device=device)
        self.allowed = None if vocab_words is None else torch.zeros(rows, vocab_words, dtype=torch.int32,
                                                                     device=device)
        self.block_table = None
        if cache.paged:
            self.scratch_block = cache.allocator.allocate(1)[0]
            self.block_table = torch.zeros(rows, -(-cache.max_seq_len // cache.block_size), dtype=torch.int32,
                                           device=device)
        # Host copies of the buffers, filled each step and copied over without a host sync
        # (pinned memory on CUDA); ``_copied`` marks when the last copies have read them.
        pinned = device.type == "cuda"
        self._staged = {name: torch.zeros(buffer.shape, dtype=buffer.dtype, pin_memory=pinned)
                        for name, buffer in self._buffers().items()}
        self._copied = torch.cuda.Event() if pinned else None
        self._graphs = {}  # bucket -> (graph, its outputs: logits and the sample)
        self.captures = 0
        self.replays = 0

    def _buffers(self):
        """The step's inputs by name (those this runner has)."""
        buffers = dict(ids=self.ids, seqlens=self.seqlens, seeds=self.seeds, steps=self.steps,
                       allowed=self.allowed, block_table=self.block_table, **self.row_values)
        return {name: buffer for name, buffer in buffers.items() if buffer is not None}

    def bucket(self, n: int) -> int:
        """The smallest bucket that holds n rows."""
        for size in self.buckets:
            if size >= n:
                return size
        raise ValueError(f"a step runs at most {self.buckets[-1]} sequences, got {n}")

    def _kv_caches(self, bucket: int):
        if self.cache.paged:
            return list(zip(self.cache.k, self.cache.v))
        return [(k[:bucket], v[:bucket]) for k, v in zip(self.cache.k, self.cache.v)]

    def _run(self, bucket: int):
        """The step on the first ``bucket`` rows of the buffers: (logits (bucket, V), the sample)."""
        table = None if self.block_table is None else self.block_table[:bucket]
        logits = self.model.decode(self.ids[:bucket], kv_caches=self._kv_caches(bucket), seqlens=self.seqlens[:bucket],
                                   block_table=table)
        allowed = None if self.allowed is None else self.allowed[:bucket]
        rows = {name: buffer[:bucket] for name, buffer in self.row_values.items()}
        sampled = ops.sample(logits, allowed=allowed, seed=self.seeds[:bucket], step=self.steps[:bucket],
                             backend=self.model.backend, **self.sampling, **rows)
        return logits, sampled

    def _captured(self, bucket: int):
        """Warm the bucket's step up on a side stream (its result is this step's), then capture it."""
        side = torch.cuda.Stream(device=self.ids.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), device_checks(False):
            result = self._run(bucket)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), device_checks(False):
            outputs = self._run(bucket)
        self._graphs[bucket] = (graph, outputs)
        self.captures += 1
        return result

    def step(self, next_ids: Sequence[int], slots: Sequence[int], seeds: torch.Tensor, steps: torch.Tensor,
             allowed: Optional[torch.Tensor] = None, rows: Optional[Dict[str, torch.Tensor]] = None):
        """Decode one token for each sequence of ``slots`` and draw the next.

        Parameters
        ----------
        next_ids : n ints (or a host tensor): each sequence's last token.
        slots : the n cache slots (a contiguous cache: 0 .. n-1).
        seeds, steps : host Tensor (n,) int64: ``fmkernels.sample``'s per-row seed and step.
        allowed : host Tensor (n, words) int32, the token bitmask, when the runner takes one.
        rows : host Tensors (n,) by name: the per-row filters the runner was made with.

        Returns
        -------
        (logits (n, V), the sample: tokens (n,), or ``SampleOutput`` rows with logprobs), on
        the model's device. A replayed graph's tensors are overwritten by its next replay: read
        them first. Nothing here waits for the GPU.
        """
        n = len(slots)
        bucket = self.bucket(n)
        if (allowed is None) != (self.allowed is None):
            raise ValueError("allowed must be given exactly when the runner was made with vocab_words")
        rows = rows or {}
        if set(rows) != set(self.row_values):
            raise ValueError(f"rows must hold exactly the per-row filters {sorted(self.row_values)}, got {sorted(rows)}")
        self.cache.reserve(slots, 1)
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copies have read the staged rows
        staged = self._staged
        staged["ids"][:n, 0] = torch.as_tensor(next_ids, dtype=torch.int64)
        staged["seqlens"][:n] = torch.tensor([self.cache.length(slot) for slot in slots], dtype=torch.int32)
        staged["seeds"][:n] = seeds
        staged["steps"][:n] = steps
        # Padding rows: token 0 at position 0, seed 0, every token allowed, the scratch block.
        for name in ("ids", "seqlens", "seeds", "steps"):
            staged[name][n:bucket] = 0
        for name, values in rows.items():
            staged[name][:n] = values
            staged[name][n:bucket] = _PADDING_FILTERS[name]
        if self.allowed is not None:
            staged["allowed"][:n] = allowed
            staged["allowed"][n:bucket] = -1
        if self.block_table is not None:
            staged["block_table"][:bucket] = self.scratch_block
            for row, slot in enumerate(slots):
                blocks = self.cache.blocks[slot]
                staged["block_table"][row, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        for name, buffer in self._buffers().items():
            buffer[:bucket].copy_(staged[name][:bucket], non_blocking=True)
        if self._copied is not None:
            self._copied.record()
        if not self.graphs:
            logits, sampled = self._run(bucket)
        elif bucket not in self._graphs:
            logits, sampled = self._captured(bucket)
        else:
            graph, (logits, sampled) = self._graphs[bucket]
            graph.replay()
            self.replays += 1
        self.cache.advance(slots, 1)
        if isinstance(sampled, torch.Tensor):
            return logits[:n], sampled[:n]
        return logits[:n], type(sampled)(*(t[:n] for t in sampled))
