"""``fmkernels info``: what a model costs: parameters, memory, FLOPs, decode and prefill rooflines;
for a GGUF file, with its weights at the bytes they are held in (quantized matrices at their
format's bytes, as ``load_pretrained`` keeps them on the CPU)."""

from __future__ import annotations

import argparse
import math
import os

from rich.table import Table

from . import common


def add_parser(subparsers) -> argparse.ArgumentParser:
    from ..model.network.stats import DEVICES, DTYPE_BYTES

    parser = subparsers.add_parser(
        "info", help="what a model costs: parameters, memory, FLOPs, decode and prefill rooflines",
        description="Parameters (total and active per token), weight and KV-cache memory, FLOPs per token, "
        "training FLOPs and the roofline bounds on decode and prefill throughput, computed from the "
        "model's configuration (fmkernels.model.model_stats; derivations in fmkernels.model.network.stats).",
    )
    parser.add_argument("model", metavar="NAME|PATH",
                        help=f"a named configuration ({', '.join(common.model_names())}), a config.json or its "
                        "directory, or a GGUF file (its matrices of a block format fmkernels runs counted at "
                        "that format's bytes, the rest in --dtype)")
    parser.add_argument("--dtype", choices=list(DTYPE_BYTES), default="bf16",
                        help="weights' dtype, of all but a GGUF file's quantized matrices (default bf16)")
    parser.add_argument("--kv-dtype", choices=list(DTYPE_BYTES), help="KV cache's dtype (default: --dtype)")
    parser.add_argument("--context", type=common.integer_at_least(1), metavar="N",
                        help="cached tokens per sequence, and the prompt length for prefill "
                        "(default: the model's max_seq_len, at most 8192)")
    parser.add_argument("--batch", type=common.integer_at_least(1), default=1, metavar="N",
                        help="sequences decoded together (default 1)")
    parser.add_argument("--device", default="h100", metavar="NAME|BW,TFLOPS[,GB]",
                        help=f"{', '.join(DEVICES)} (datasheet figures), or memory bandwidth in GB/s, dense "
                        "matmul TFLOP/s and optionally memory in GB, e.g. 2976,794,80 (default h100)")
    parser.add_argument("--train-tokens", type=common.integer_at_least(1), metavar="N",
                        help="training budget in tokens (default: the Chinchilla budget, 20 per parameter)")
    parser.add_argument("--batches", type=common.integer_list, metavar="N,N,...",
                        help="the roofline table's batch sizes (default 1,4,16,64,256)")
    parser.add_argument("--contexts", type=common.integer_list, metavar="N,N,...",
                        help="the roofline table's contexts (default 1k, 4k, 16k, ... up to max_seq_len, and "
                        "--context)")
    parser.add_argument("--tp", type=common.integer_at_least(1), default=1, metavar="N",
                        help="tensor parallelism over N devices: weights and KV cache per device, and the decode "
                        "bound with the all-reduces (default 1)")
    parser.add_argument("--interconnect", type=common.number_in(0.0, math.inf, low_open=True), metavar="GBPS",
                        help="with --tp: the interconnect's GB/s per device per direction (default: the named "
                        "device's NVLink; needed for a custom --device)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (keys: README)")
    return parser


def _count_text(value: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f}{unit}"
    return f"{value:,.0f}"


def _bytes_text(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.2f} {unit}"
    return f"{value:,.0f} B"


def _flops_text(value: float) -> str:
    exponent = int(math.floor(math.log10(value))) if value > 0 else 0
    return f"{value / 10 ** exponent:.2f}e{exponent}"


def _seconds_text(value: float) -> str:
    return f"{value * 1e3:,.3f} ms" if value >= 1e-4 else f"{value * 1e6:,.2f} µs"


def _load_config(spec: str, parser: argparse.ArgumentParser):
    from ..model import ModelConfig, load_config

    if spec in common.model_names():
        return ModelConfig.from_name(spec)
    if os.path.exists(spec):
        try:
            return load_config(spec)
        except (OSError, ValueError, ImportError) as exc:
            parser.error(f"{spec}: {exc}")
    parser.error(f"{spec}: not a config.json, a directory holding one, a GGUF file or a known model name "
                 f"(names: {', '.join(common.model_names())})")


def _tensor_types(spec: str, parser: argparse.ArgumentParser):
    """A GGUF file's weights' (GGUF type, format kept) by name (``gguf.tensor_types``), else None."""
    from ..model.checkpoint import gguf

    if not gguf.is_gguf(spec):
        return None
    try:
        return gguf.tensor_types(spec)
    except (OSError, ValueError, ImportError) as exc:
        parser.error(f"{spec}: {exc}")


def _types_table(types, stats, bytes_text):
    """The GGUF file's tensor types: weights, parameters and the bytes each is held in."""
    from ..model.network.stats import _weights, element_bytes

    sizes = {name: size for name, _, size in _weights(stats.config)}
    rows: dict = {}
    for name, (kind, format) in types.items():
        row = rows.setdefault((kind, format), [0, 0, 0.0])
        row[0] += 1
        row[1] += sizes[name]
        row[2] += sizes[name] * element_bytes(format or stats.dtype)
    table = Table(title="GGUF tensor types, as loaded quantized (weights='quantized', the CPU's auto)")
    for column in ("type", "weights", "parameters", "held as", "bytes"):
        table.add_column(column, justify="left" if column in ("type", "held as") else "right")
    for (kind, format), (count, size, held) in sorted(rows.items(), key=lambda item: -item[1][2]):
        table.add_row(kind, str(count), f"{size:,}", format or f"dequantized, {stats.dtype}",
                      bytes_text(math.ceil(held)))
    table.add_row("[bold]total[/bold]", str(len(types)), f"{stats.params.total:,}", "",
                  f"[bold]{bytes_text(stats.weight_bytes())}[/bold]")
    return table


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from ..model import model_stats
    from ..model.network.stats import DTYPE_BYTES

    config = _load_config(args.model, parser)
    types = _tensor_types(args.model, parser)
    formats = None if types is None else {name: format for name, (_, format) in types.items() if format}
    try:
        stats = model_stats(
            config,
            dtype=args.dtype, kv_dtype=args.kv_dtype, context=args.context, batch=args.batch, device=args.device,
            train_tokens=args.train_tokens, table_batches=args.batches, table_contexts=args.contexts,
            weights=formats,
        )
        split = stats.tensor_parallel(args.tp, args.interconnect) if args.tp > 1 else None
    except ValueError as exc:
        if "interconnect" in str(exc):
            parser.error(f"--tp {args.tp} on --device {args.device} needs --interconnect GBPS: {exc}")
        parser.error(f"--tp {args.tp}: {exc}" if args.tp > 1 else str(exc))
    if args.interconnect is not None and split is None:
        parser.error("--interconnect goes with --tp N (N > 1)")
    if args.json:
        figures = {"model": args.model, **stats.as_dict()}
        if split is not None:
            figures["tensor_parallel"] = split.as_dict()
        print(json.dumps(figures, indent=2))
        return 0

    console = common.console()
    p = stats.params
    moe = f", {config.n_experts} experts, {config.experts_per_token} per token" if config.n_experts else ""
    console.print(
        f"[bold]{args.model}[/bold]: {config.architecture}, {config.n_layers} layers, dim {config.dim}, "
        f"{config.n_heads} heads / {config.n_kv_heads} KV heads x {config.head_dim}, ffn {config.ffn_dim}, "
        f"vocab {config.vocab_size}{moe}"
    )
    if stats.context > config.max_seq_len:
        console.print(f"--context {stats.context} is beyond the model's max_seq_len {config.max_seq_len}",
                      style="yellow")

    params = Table(title="parameters")
    for column in ("part", "parameters", "share"):
        params.add_column(column, justify="left" if column == "part" else "right")
    parts = [("embedding", p.embedding), ("attention", p.attention),
             ("experts" if config.n_experts else "mlp", p.mlp), ("router", p.router), ("norms", p.norms),
             ("lm head" + (" (tied)" if config.tie_embeddings else ""), p.lm_head)]
    for name, count in parts:
        if count or name.startswith("lm head"):
            params.add_row(name, f"{count:,}", f"{count / p.total:.1%}")
    params.add_row("[bold]total[/bold]", f"[bold]{p.total:,}[/bold] ({_count_text(p.total)})", "")
    params.add_row("active per token", f"{p.active:,} ({_count_text(p.active)})", f"{p.active / p.total:.1%}")
    console.print(params)

    memory = Table(title="memory")
    memory.add_column("what")
    memory.add_column("bytes", justify="right")
    widths: dict = {}
    for dtype, width in DTYPE_BYTES.items():
        widths.setdefault(width, []).append(dtype)
    for names in widths.values():
        chosen = " (chosen)" if stats.dtype in names and not stats.weight_formats else ""
        memory.add_row(f"weights, {'/'.join(names)}{chosen}", _bytes_text(stats.weight_bytes(names[0])))
    held = stats.dtype
    if stats.weight_formats:
        kept = sorted({format for _, format in stats.weight_formats})
        held = f"{'/'.join(kept)} blocks, the rest {stats.dtype}"
        memory.add_row(f"weights as held: {held} (chosen)", _bytes_text(stats.weight_bytes()))
    memory.add_row(f"KV cache per token ({stats.kv_dtype})", _bytes_text(stats.kv_bytes_per_token))
    memory.add_row(f"KV cache, {stats.context:,} tokens x batch {stats.batch}", _bytes_text(stats.kv_bytes()))
    memory.add_row(f"weights ({held}) + KV cache", _bytes_text(stats.weight_bytes() + stats.kv_bytes()))
    console.print(memory)
    if types is not None:
        console.print(_types_table(types, stats, _bytes_text))

    compute = Table(title="FLOPs")
    compute.add_column("what")
    compute.add_column("FLOPs", justify="right")
    compute.add_row("forward, per token: matmuls", _flops_text(2 * stats.matmul_params_per_token))
    compute.add_row(f"forward, per token: attention at {stats.context:,} keys",
                    _flops_text(stats.attention_flops_per_token()))
    compute.add_row(f"prefill of a {stats.context:,}-token prompt", _flops_text(stats.prefill_flops))
    compute.add_row(f"training on {_count_text(stats.train_tokens)} tokens (6 x active x tokens)",
                    _flops_text(stats.training_flops))
    compute.add_row("Chinchilla budget (20 tokens / parameter)", f"{_count_text(stats.chinchilla_tokens)} tokens")
    console.print(compute)

    device = stats.device
    capacity = f", {device.memory_gb:g} GB" if device.memory_gb else ""
    decode = stats.decode()
    bounds = Table(title=f"roofline on {device.name}: {device.memory_bandwidth_gb_s:g} GB/s, "
                   f"{device.tflops:g} TFLOP/s{capacity}")
    bounds.add_column("what")
    bounds.add_column("bound", justify="right")
    bounds.add_row(f"decode step, batch {decode.batch} at {decode.context:,} tokens: reads",
                   f"{_bytes_text(decode.weight_bytes)} weights + {_bytes_text(decode.kv_bytes)} KV")
    bounds.add_row("  memory time / compute time",
                   f"{_seconds_text(decode.memory_time_s)} / {_seconds_text(decode.compute_time_s)} ({decode.bound})")
    bounds.add_row("  decode tokens/s (per sequence)",
                   f"{decode.tokens_per_s:,.1f} ({decode.tokens_per_s / decode.batch:,.1f})")
    bounds.add_row(f"prefill tokens/s ({stats.context:,}-token prompt)", f"{stats.prefill_tokens_per_s:,.0f}")
    if decode.fits is False:
        bounds.add_row("[yellow]weights + KV cache exceed the device's memory[/yellow]", "")
    console.print(bounds)

    if split is not None:
        kv_note = " (each rank one, replicated)" if split.kv_replicated else ""
        parallel = Table(title=f"tensor parallel over {split.world} x {device.name}, interconnect "
                         f"{split.interconnect_gb_s:g} GB/s per device per direction")
        parallel.add_column("what")
        parallel.add_column("per device", justify="right")
        parallel.add_row("heads / KV heads", f"{split.n_heads} / {split.n_kv_heads}{kv_note}")
        parallel.add_row(f"weights ({held})", _bytes_text(split.weight_bytes))
        parallel.add_row(f"KV cache, {stats.context:,} tokens x batch {stats.batch}", _bytes_text(split.kv_bytes))
        parallel.add_row("decode step reads", f"{_bytes_text(split.step_weight_bytes)} weights + "
                         f"{_bytes_text(split.kv_bytes)} KV")
        parallel.add_row("all-reduce bytes sent per token (2 a layer)", _bytes_text(split.all_reduce_bytes_per_token))
        parallel.add_row("  memory / compute / all-reduce time",
                         f"{_seconds_text(split.memory_time_s)} / {_seconds_text(split.compute_time_s)} / "
                         f"{_seconds_text(split.communication_time_s)}")
        parallel.add_row("  decode tokens/s (vs 1 device)",
                         f"{split.tokens_per_s:,.1f} ({split.tokens_per_s / decode.tokens_per_s:.2f}x)")
        console.print(parallel)

    rows = stats.table()
    table = Table(title="decode tokens/s bound (whole batch); * compute-bound, oom: weights + KV exceed memory")
    table.add_column("batch", justify="right")
    for context in stats.table_contexts:
        table.add_column(f"{context:,} tokens", justify="right")
    for batch in stats.table_batches:
        cells = []
        for row in rows:
            if row.batch == batch:
                text = f"{row.tokens_per_s:,.0f}" + ("*" if row.bound == "compute" else "")
                cells.append(f"[dim]{text} oom[/dim]" if row.fits is False else text)
        table.add_row(str(batch), *cells)
    console.print(table)
    return 0
