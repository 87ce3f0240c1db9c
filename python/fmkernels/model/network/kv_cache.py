"""KV caches for the model: contiguous rows, or a paged pool with a reference-counted block
allocator.

Both hold one (k, v) pair per layer in the layouts the ops take (DESIGN.md):
contiguous (batch, max_seq_len, kv_heads, head_dim) with ``cache_seqlens``, or paged
(num_blocks, block_size, kv_heads, head_dim) with a ``block_table`` (batch, max_blocks).
The model asks a cache for ``prepare(slots, n_new)`` (the cache_seqlens, and the block table
for a paged one, of the sequences in the batch; ``reserve`` does its checks and allocation
alone, for a caller that lays out those tensors itself) before a forward pass and calls
``advance(slots, n_new)`` after it; ``n_new`` is one count for every slot, or one per slot
(a packed prefill of ragged prompts, which writes where ``prompt_rows`` says).
``fork(src, dst)`` starts a sequence as a copy of another (the samples of one prompt, a beam
chosen twice).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

NewTokens = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class PromptRows:
    """Where a packed prefill writes its prompts' keys and values, in one ``append_kv`` per layer:
    the packed tokens scattered into ``rows`` padded rows of ``width`` positions, row r written
    from position 0 of cache row ``block_table[r, 0]`` (a contiguous cache's rows are the blocks
    of a pool with block_size max_seq_len). A padded position lands in its own sequence's row or
    last block, past its length, where nothing is read before a later token overwrites it.

    block_table : (rows, 1) int32.
    width : positions per row.
    index : (total_tokens,) int64, each packed token's place among the rows x width positions.
    cache_seqlens : (rows,) int32 zeros.
    """

    block_table: torch.Tensor
    width: int
    index: torch.Tensor
    cache_seqlens: torch.Tensor


def _prompt_rows(rows: List[int], width: int, starts: List[int], lengths: List[int], device) -> PromptRows:
    """PromptRows for cache rows ``rows``, sequence i's tokens from padded row starts[i] on."""
    index = torch.cat([torch.arange(length) + start * width for start, length in zip(starts, lengths)])
    return PromptRows(torch.tensor(rows, dtype=torch.int32)[:, None].to(device), width, index.to(device),
                      torch.zeros(len(rows), dtype=torch.int32, device=device))


def _per_slot(slots: Sequence[int], n_new: NewTokens) -> List[int]:
    """n_new as one count per slot."""
    if isinstance(n_new, int):
        return [n_new] * len(slots)
    counts = list(n_new)
    if len(counts) != len(slots):
        raise ValueError(f"n_new must be one int or one count per slot ({len(slots)}), got {len(counts)} counts")
    return counts


class ContiguousKVCache:
    """One row of max_seq_len positions per sequence slot.

    ``k[layer]``, ``v[layer]``: (batch, max_seq_len, kv_heads, head_dim). A forward pass runs
    on a contiguous range of slots (a view, no copy); ``keep(slots)`` moves the given slots
    to the front, so finished sequences drop out of the decode batch.
    """

    paged = False

    def __init__(self, n_layers: int, batch: int, max_seq_len: int, kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device="cpu"):
        if batch <= 0 or max_seq_len <= 0:
            raise ValueError(f"batch and max_seq_len must be positive, got {batch} and {max_seq_len}")
        shape = (batch, max_seq_len, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len
        self.lengths: List[int] = [0] * batch

    def length(self, slot: int) -> int:
        """The number of tokens the sequence in ``slot`` holds (0 for an empty slot)."""
        if not 0 <= slot < len(self.lengths):
            raise ValueError(f"slot must be a row of the cache in [0, {len(self.lengths)}), got {slot}")
        return self.lengths[slot]

    def reserve(self, slots: Sequence[int], n_new: NewTokens) -> None:
        """Checks that each slot has room for n_new more tokens."""
        for slot, count in zip(slots, _per_slot(slots, n_new)):
            if self.length(slot) + count > self.max_seq_len:
                raise ValueError(
                    f"sequence in slot {slot} needs {self.lengths[slot] + count} positions, "
                    f"the cache holds max_seq_len={self.max_seq_len}"
                )

    def prepare(self, slots: Sequence[int], n_new: NewTokens) -> Tuple[torch.Tensor, None]:
        """cache_seqlens (len(slots),) int32 for a pass writing n_new tokens to each slot."""
        self.reserve(slots, n_new)
        device = self.k[0].device
        return torch.tensor([self.lengths[s] for s in slots], dtype=torch.int32, device=device), None

    def layer(self, index: int, slots: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(k, v) of one layer for the slots' rows: views (n_slots, max_seq_len, kv_heads, head_dim)
        of a consecutive range of slots."""
        start = slots[0]
        if list(slots) != list(range(start, start + len(slots))):
            raise ValueError(f"a contiguous cache runs a consecutive range of slots, got {list(slots)}")
        rows = slice(start, start + len(slots))
        return self.k[index][rows], self.v[index][rows]

    def prompt_rows(self, slots: Sequence[int], lengths: Sequence[int]) -> PromptRows:
        """Where prompts of ``lengths`` go in empty ``slots``: one padded row of the longest
        length per prompt, written to its slot's row."""
        width = max(lengths)
        return _prompt_rows(list(slots), width, list(range(len(slots))), list(lengths), self.k[0].device)

    def advance(self, slots: Sequence[int], n_new: NewTokens) -> None:
        for slot, count in zip(slots, _per_slot(slots, n_new)):
            self.lengths[slot] += count

    def fork(self, src: int, dst: int) -> None:
        """Starts the empty row ``dst`` as a copy of sequence ``src``: positions [0, length) of
        every layer's keys and values are copied; the two then go on differently."""
        if self.length(dst):
            raise ValueError(f"slot {dst} already holds a sequence")
        length = self.length(src)
        for cache in (*self.k, *self.v):
            cache[dst, :length] = cache[src, :length]
        self.lengths[dst] = length

    def keep(self, slots: Sequence[int]) -> None:
        """Moves the rows of ``slots`` to slots 0..len(slots)-1 (in that order); the rest are freed."""
        slots = list(slots)
        if slots == list(range(len(slots))):
            return
        index = torch.tensor(slots, device=self.k[0].device)
        used = max(self.lengths[s] for s in slots)  # positions past every kept length hold nothing
        for cache in (*self.k, *self.v):
            cache[: len(slots), :used] = cache[:, :used].index_select(0, index)
        self.lengths = [self.lengths[s] for s in slots] + [0] * (len(self.lengths) - len(slots))


class BlockAllocator:
    """Hands out blocks of a pool of ``num_blocks`` (lowest ids first), each with a reference
    count: an allocated block has one user, ``share`` adds one, ``free`` drops one, and a block
    returns to the pool when its last user frees it."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))
        self._references = [0] * num_blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def references(self, block: int) -> int:
        """How many sequences use ``block`` (0 for a free block)."""
        return self._references[block]

    def allocate(self, n: int) -> List[int]:
        if n > len(self._free):
            raise RuntimeError(
                f"KV cache pool exhausted: {n} more block(s) needed, {len(self._free)} of {self.num_blocks} free; "
                f"give the paged cache more blocks (num_blocks) or run fewer or shorter sequences"
            )
        blocks = [self._free.pop() for _ in range(n)]
        for block in blocks:
            self._references[block] = 1
        return blocks

    def _require_allocated(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            if not 0 <= block < self.num_blocks or not self._references[block]:
                raise ValueError(f"block {block} is not allocated (blocks of a pool of {self.num_blocks})")

    def share(self, blocks: Sequence[int]) -> None:
        """One more sequence uses each of ``blocks``."""
        self._require_allocated(blocks)
        for block in blocks:
            self._references[block] += 1

    def free(self, blocks: Sequence[int]) -> None:
        """One sequence fewer uses each of ``blocks``; those no sequence uses return to the pool."""
        self._require_allocated(blocks)
        for block in blocks:
            self._references[block] -= 1
            if not self._references[block]:
                self._free.append(block)
        self._free.sort(reverse=True)


class PagedKVCache:
    """A pool of blocks shared by sequences, each with its own list of blocks.

    ``k[layer]``, ``v[layer]``: (num_blocks, block_size, kv_heads, head_dim). Blocks are
    allocated as a sequence grows (``prepare``) and returned when it ends (``free``); a
    slot is any int the caller uses to name a sequence. Forked sequences share their full
    blocks (``fork``).
    """

    paged = True

    def __init__(self, n_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, *,
                 max_seq_len: Optional[int] = None, dtype: torch.dtype = torch.float32, device="cpu"):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.allocator = BlockAllocator(num_blocks)
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.block_size = block_size
        self.max_seq_len = max_seq_len if max_seq_len is not None else num_blocks * block_size
        self.blocks: Dict[int, List[int]] = {}
        self.lengths: Dict[int, int] = {}

    def length(self, slot: int) -> int:
        """The number of tokens the sequence in ``slot`` holds (0 for a slot with no sequence)."""
        return self.lengths.get(slot, 0)

    def reserve(self, slots: Sequence[int], n_new: NewTokens) -> None:
        """Allocates the blocks that n_new more tokens per slot need."""
        for slot, count in zip(slots, _per_slot(slots, n_new)):
            length = self.lengths.setdefault(slot, 0)
            blocks = self.blocks.setdefault(slot, [])
            if length + count > self.max_seq_len:
                raise ValueError(
                    f"sequence in slot {slot} needs {length + count} positions, the cache allows "
                    f"max_seq_len={self.max_seq_len}"
                )
            needed = -(-(length + count) // self.block_size) - len(blocks)
            if needed > 0:
                blocks.extend(self.allocator.allocate(needed))

    def prepare(self, slots: Sequence[int], n_new: NewTokens) -> Tuple[torch.Tensor, torch.Tensor]:
        """Allocates the blocks that n_new more tokens per slot need (``reserve``); returns
        cache_seqlens (n,) int32 and block_table (n, max_blocks) int32 for the slots."""
        self.reserve(slots, n_new)
        device = self.k[0].device
        width = max(len(self.blocks[s]) for s in slots)
        # Unused entries point at block 0; decode_attention never reads past a sequence's length.
        table = torch.zeros((len(slots), width), dtype=torch.int32)
        for row, slot in enumerate(slots):
            table[row, : len(self.blocks[slot])] = torch.tensor(self.blocks[slot], dtype=torch.int32)
        seqlens = torch.tensor([self.lengths[s] for s in slots], dtype=torch.int32)
        return seqlens.to(device), table.to(device)

    def layer(self, index: int, slots: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.k[index], self.v[index]

    def prompt_rows(self, slots: Sequence[int], lengths: Sequence[int]) -> PromptRows:
        """Where prompts of ``lengths`` go in ``slots`` (empty, their blocks allocated by
        ``prepare``): one padded row per block, block_size wide."""
        rows, starts = [], []
        for slot, length in zip(slots, lengths):
            starts.append(len(rows))
            rows += self.blocks[slot][: -(-length // self.block_size)]
        return _prompt_rows(rows, self.block_size, starts, list(lengths), self.k[0].device)

    def advance(self, slots: Sequence[int], n_new: NewTokens) -> None:
        for slot, count in zip(slots, _per_slot(slots, n_new)):
            self.lengths[slot] += count

    def fork(self, src: int, dst: int) -> None:
        """Starts sequence ``dst`` as a copy of ``src``, so the two can go on differently; beam
        search forks a beam chosen more than once, generate a prompt's samples.

        The full blocks are shared, not copied: the cache is append-only, so neither sequence
        writes them again. A partly filled last block, which both would write next, is copied
        into a new block of dst's own. A shared block returns to the pool when the last
        sequence using it is freed.
        """
        if dst in self.blocks:
            raise ValueError(f"slot {dst} already holds a sequence")
        if src not in self.blocks:
            raise ValueError(f"slot {src} holds no sequence to fork")
        length, blocks = self.lengths[src], self.blocks[src]
        full, filled = divmod(length, self.block_size)
        copy = self.allocator.allocate(1 if filled else 0)
        self.allocator.share(blocks[:full])
        for block in copy:
            for cache in (*self.k, *self.v):
                cache[block, :filled] = cache[blocks[full], :filled]
        self.blocks[dst] = blocks[:full] + copy
        self.lengths[dst] = length

    def free(self, slot: int) -> None:
        """Ends the sequence in ``slot``: blocks no other sequence shares return to the pool."""
        self.allocator.free(self.blocks.pop(slot, []))
        self.lengths.pop(slot, None)
