"""What several subcommands share: the console, argument types, --device and --impl, table helpers."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Iterator, List, Optional, Sequence

import torch
from rich.console import Console
from rich.table import Table

from .. import registry

# Where output is not a terminal (a log, a pipe), rich would wrap tables at 80 columns.
LOG_WIDTH = 200
# The last column (a verdict, or why a row was skipped) is never squeezed below this.
RESULT_WIDTH = 16


def console(stderr: bool = False) -> Console:
    stream = sys.stderr if stderr else sys.stdout
    wide = not stream.isatty() and "COLUMNS" not in os.environ
    return Console(stderr=stderr, width=LOG_WIDTH if wide else None)


# ----------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------


def op_name(value: str) -> str:
    if value not in registry.OPS:
        raise argparse.ArgumentTypeError(f"invalid op {value!r} (choose from {', '.join(registry.OPS)})")
    return value


def integer_at_least(minimum: int):
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        return number

    return parse


def number_in(low: float, high: float, low_open: bool = False):
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {value!r}") from None
        if not (low < number if low_open else low <= number) or not number <= high:
            interval = f"{'(' if low_open else '['}{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {value}")
        return number

    return parse


def integer_list(value: str) -> List[int]:
    parse = integer_at_least(1)
    return [parse(item) for item in value.split(",") if item.strip()]


def model_names() -> List[str]:
    from ..model import ModelConfig

    return ModelConfig.names()


#: What an --impl function of each op takes and returns (README.md, "Your own kernels", says the same).
IMPL_SIGNATURES = """\
your implementation (--impl MODULE:FUNCTION) is called with the reference op's arguments, by
keyword (fmkernels.reference.<op>), and returns what it returns; raise NotImplementedError
for a case it cannot run (listed as skipped). Examples: examples/ in the repository.

  attention(q, k, v, *, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse)
      q (batch, seqlen_q, q_heads, head_dim), k/v (batch, seqlen_k, kv_heads, head_dim), or
      packed (total_tokens, heads, head_dim) with cu_seqlens_q/_k (int32, batch + 1); causal is
      bottom-right aligned; scale None means 1/sqrt(head_dim). Returns out (q's shape and
      dtype), or (out, lse) with return_lse: lse float32, natural log, (batch, q_heads,
      seqlen_q) or (q_heads, total_q) packed; -inf (and out 0) for a query that sees no key.
  decode_attention(q, k_cache, v_cache, cache_seqlens, *, block_table, scale, return_lse)
      q (batch, n_new, q_heads, head_dim); cache contiguous (batch, max_seqlen, kv_heads,
      head_dim) or paged (num_blocks, block_size, kv_heads, head_dim) with block_table (int32,
      batch x max_blocks); cache_seqlens (int32, batch) counts the new tokens, already in the
      cache; query i sees positions <= i + cache_seqlens[b] - n_new. Returns out, or (out, lse)
      with lse float32 (batch, q_heads, n_new).
  append_kv(k_cache, v_cache, k, v, cache_seqlens, *, block_table)
      writes k, v (batch, n_new, kv_heads, head_dim) into the caches at positions
      cache_seqlens[b] + [0, n_new), in place; returns None.
  filter_logits(logits, *, temperature, top_k, top_p, min_p)
      logits (batch, vocab); parameters scalars or (batch,) tensors. Returns logits /
      temperature in logits' dtype with the removed tokens at -inf (top-k, then top-p, then
      min-p; temperature 0 keeps the argmax only).
  sample(logits, *, temperature, top_k, top_p, min_p, seed, step, return_logprobs, num_logprobs)
      returns int64 tokens (batch,), the reference's Gumbel-max draws for the same seed and
      step, or with return_logprobs a fmkernels.reference.SampleOutput (tokens, logprobs,
      top_ids, top_logprobs).
  linear(x, weight)
      x (..., K), weight (N, K) as torch.nn.Linear holds it. Returns x @ weight^T (..., N) in
      x's dtype.
"""


def add_op_arguments(parser: argparse.ArgumentParser) -> None:
    """OP ..., --device and --impl, as check and bench take them."""
    parser.add_argument(
        "ops", nargs="*", type=op_name, metavar="OP",
        help=f"ops to run: {', '.join(registry.OPS)} (default: all)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"),
        help="where the inputs live (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--impl", action="append", default=[], metavar="MODULE:FUNCTION",
        help="also run your own implementation of the named OP(s): a function with the "
        "reference's signature (fmkernels.reference.<op>); MODULE is imported from the current "
        "directory or the Python path; repeatable",
    )


def choose_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> torch.device:
    """--device, or cuda when a GPU is visible, else cpu; under torchrun this process's GPU."""
    if args.device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU on this machine")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and tensor_parallel():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun process
        torch.cuda.set_device(device)
    return device


def tensor_parallel() -> bool:
    """Under torchrun with more than one process: the model is split over them."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _load_user_function(spec: str, parser: argparse.ArgumentParser):
    # A console script's sys.path starts with its bin folder, not the user's directory.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return registry.load_impl(spec)
    except (ValueError, TypeError) as exc:
        parser.error(str(exc))


@contextlib.contextmanager
def user_impls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Iterator[None]:
    """Register each --impl function as a 'user' implementation of the named ops while the command runs."""
    if args.impl and not args.ops:
        parser.error("--impl needs the op(s) the function implements, e.g. check attention --impl mymodule:my_attention")
    registered = []
    try:
        for spec in dict.fromkeys(args.impl):
            fn = _load_user_function(spec, parser)
            for op in dict.fromkeys(args.ops):
                mismatch = registry.signature_error(op, fn)
                if mismatch:
                    parser.error(f"--impl {spec} cannot implement {op}: {mismatch}")
                registry.register_impl(op, spec, fn, kind="user")
                registered.append((op, spec))
        yield
    finally:
        for op, spec in registered:
            registry.unregister_impl(op, spec)


# ----------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------


def time_text(milliseconds: Optional[float]) -> str:
    if milliseconds is None:
        return "-"
    if milliseconds < 1:
        return f"{milliseconds * 1e3:.1f} µs"
    if milliseconds < 1000:
        return f"{milliseconds:.2f} ms"
    return f"{milliseconds / 1e3:.2f} s"


def bench_table(title: str, caption: str, numbers: Sequence[str]) -> Table:
    """op, implementation and shape, then the right-aligned ``numbers`` columns, then a note."""
    table = Table(title=title, caption=caption)
    table.add_column("op", no_wrap=True)
    table.add_column("implementation", no_wrap=True)
    table.add_column("shape")
    for column in numbers:
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("note", min_width=RESULT_WIDTH)
    return table
