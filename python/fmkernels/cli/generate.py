"""``fmkernels generate``: text from fmkernels.model, streamed, then prefill and decode tokens/s."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import common

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate", help="generate text with fmkernels.model, streamed, with tokens/s",
        description="Generate text after a prompt with fmkernels.model, printing it as tokens come, then "
        "prefill and decode tokens/s. --model is a checkpoint directory (config.json, safetensors, "
        "tokenizer.json), a .gguf file, or a named configuration (random weights, byte-level tokenizer). "
        "--chat sends TEXT as a user message through the checkpoint's chat template and streams the answer.",
    )
    parser.add_argument("--model", required=True, metavar="PATH|NAME",
                        help="a local Hugging Face checkpoint directory, a .gguf file, or one of: "
                        + ", ".join(common.model_names()))
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", metavar="TEXT", help="text to continue")
    text.add_argument("--chat", metavar="TEXT", help="a user message, answered through the chat template")
    parser.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    parser.add_argument("--max-new-tokens", type=common.integer_at_least(1), default=64, metavar="N",
                        help="default 64")
    parser.add_argument("--temperature", type=common.number_in(0.0, math.inf), default=0.0, metavar="T",
                        help="0 is greedy (default)")
    parser.add_argument("--top-k", type=common.integer_at_least(0), default=0, metavar="K", help="0 is off (default)")
    parser.add_argument("--top-p", type=common.number_in(0.0, 1.0, low_open=True), default=1.0, metavar="P",
                        help="1.0 is off (default)")
    parser.add_argument("--min-p", type=common.number_in(0.0, 1.0), default=0.0, metavar="P",
                        help="0.0 is off (default)")
    parser.add_argument("--seed", type=common.integer_at_least(0), default=0, metavar="S", help="default 0")
    parser.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop strings (cut from the output)")
    structure = parser.add_mutually_exclusive_group()
    structure.add_argument("--json-schema", metavar="FILE|JSON",
                           help="constrain the output to JSON valid under this schema (a file, or the schema itself)")
    structure.add_argument("--json-object", action="store_true", help="constrain the output to a JSON object")
    structure.add_argument("--regex", metavar="PATTERN", help="constrain the output to match PATTERN in full")
    structure.add_argument("--grammar", metavar="FILE",
                           help="constrain the output to a Lark grammar (llguidance's syntax, start rule 'start')")
    structure.add_argument("--choices", nargs="+", metavar="TEXT", help="constrain the output to one of these")
    parser.add_argument("--backend", default="auto", help="the ops' backend (default auto)")
    parser.add_argument("--kv-cache", choices=("contiguous", "paged"), default="contiguous")
    parser.add_argument("--dtype", choices=sorted(_DTYPES),
                        help="weights' dtype (default: the checkpoint's; float32 for a named model)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="where the model runs (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--weights", choices=("auto", "quantized", "dequantized"), default="auto",
                        help="a .gguf file's quantized matrices: kept in their block format, or dequantized to "
                        "--dtype; auto (default) keeps them on the CPU and dequantizes on a GPU")
    return parser


def _load_model(args: argparse.Namespace, parser: argparse.ArgumentParser, device: torch.device):
    """(model, tokenizer) for --model: a checkpoint directory, or a named config with random weights."""
    from ..model import ByteTokenizer, ModelConfig, Transformer, load_pretrained, load_tokenizer

    dtype = _DTYPES[args.dtype] if args.dtype else None
    err = common.console(stderr=True)
    gguf = os.path.isfile(args.model) and args.model.endswith(".gguf")
    if os.path.isdir(args.model) or gguf:
        try:
            model = load_pretrained(args.model, dtype=dtype, device=device, backend=args.backend,
                                    tensor_parallel=common.tensor_parallel(), weights=args.weights)
        except (OSError, ValueError) as exc:
            parser.error(f"--model {args.model}: {exc}")
        except ImportError as exc:
            parser.error(str(exc))
        if gguf or os.path.isfile(os.path.join(args.model, "tokenizer.json")):
            try:
                return model, load_tokenizer(args.model)
            except ImportError as exc:
                parser.error(str(exc))
        if model.config.vocab_size < ByteTokenizer.vocab_size:
            parser.error(f"--model {args.model}: no tokenizer.json, and its vocabulary "
                         f"({model.config.vocab_size}) is too small for the byte-level tokenizer")
        err.print(f"{args.model} has no tokenizer.json: using the byte-level tokenizer", style="yellow")
        return model, ByteTokenizer()
    if args.model not in common.model_names():
        looks_like_path = os.sep in args.model or args.model.startswith(".")
        what = "no such checkpoint directory" if looks_like_path else "not a directory or a known model name"
        parser.error(f"--model {args.model}: {what} (names: {', '.join(common.model_names())})")
    if args.weights == "quantized":
        parser.error(f"--weights quantized keeps a .gguf file's blocks; --model {args.model} is a named "
                     f"configuration with random float weights")
    config = ModelConfig.from_name(args.model)
    if config.vocab_size < ByteTokenizer.vocab_size:
        parser.error(f"--model {args.model}: its vocabulary is too small for the byte-level tokenizer")
    model = Transformer.from_config(config, seed=0, dtype=dtype or torch.float32, device=device, backend=args.backend,
                                    tensor_parallel=common.tensor_parallel())
    err.print(f"{args.model}: random weights (seed 0) and a byte-level tokenizer; the output is noise",
              style="yellow")
    return model, ByteTokenizer()


def _constraint(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The structured-output constraint the flags ask for, or None."""
    from ..model import structured

    try:
        if args.json_schema is not None:
            text = args.json_schema
            if not text.lstrip().startswith("{"):
                with open(text) as f:
                    text = f.read()
            return structured.json_schema(text)
        if args.json_object:
            return structured.json_object()
        if args.regex is not None:
            return structured.regex(args.regex)
        if args.grammar is not None:
            with open(args.grammar) as f:
                return structured.grammar(f.read())
        if args.choices is not None:
            return structured.choices(args.choices)
    except (ImportError, OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    return None


def _config(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The GenerationConfig the flags ask for."""
    from ..model import GenerationConfig

    try:
        return GenerationConfig(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            min_p=args.min_p, seed=args.seed, stop_strings=tuple(args.stop), kv_cache=args.kv_cache,
            return_result=True, constraint=_constraint(args, parser),
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..model import StreamDecoder, generate
    from ..model.network import parallel

    config = _config(args, parser)
    device = common.choose_device(args, parser)
    model, tokenizer = _load_model(args, parser, device)
    if args.system is not None and args.chat is None:
        parser.error("--system goes with --chat")
    request = {}
    if args.chat is not None:
        from ..model import chat

        messages = [{"role": "system", "content": args.system}] if args.system is not None else []
        messages.append({"role": "user", "content": args.chat})
        try:
            prompt = chat.apply_chat_template(tokenizer, messages)
        except (ImportError, ValueError) as exc:
            parser.error(f"--chat: {exc}")
        request["messages"] = messages
    else:
        prompt = tokenizer.encode(args.prompt)
        if not prompt:
            parser.error("--prompt: the prompt encodes to no tokens")
        request["prompts"] = [prompt]
    # Under torchrun every rank computes the same tokens; rank 0 prints them.
    first = parallel.is_first_rank(model)
    out = sys.stdout if first else open(os.devnull, "w")
    stream = StreamDecoder(tokenizer, prompt)
    # Text that a stop string could still claim (its last len - 1 characters) waits; a stop
    # string found is never printed (generate cuts it from its text in the same way).
    hold = max((len(s) for s in args.stop), default=1) - 1
    state = {"text": "", "printed": 0, "first": None}

    def on_token(_: int, token: int) -> None:
        if state["first"] is None:
            state["first"] = time.perf_counter()
        state["text"] += stream.push(token)
        cuts = [cut for cut in (state["text"].find(s) for s in args.stop) if cut >= 0]
        safe = min(cuts) if cuts else len(state["text"]) - hold
        if safe > state["printed"]:
            out.write(state["text"][state["printed"]:safe])
            out.flush()
            state["printed"] = safe

    if args.chat is None:
        out.write(args.prompt)
    start = time.perf_counter()
    try:
        result = generate(model, config=config, tokenizer=tokenizer, on_token=on_token, **request)
    except ValueError as exc:
        parser.error(str(exc))
    end = time.perf_counter()
    text = result.texts[0]
    out.write(text[state["printed"]:] + "\n")
    out.flush()
    new = len(result.tokens[0])
    prefill_s = state["first"] - start
    decode_s = end - state["first"]
    if model.tensor_parallel is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not first:
        out.close()
        return 0
    console = common.console()
    console.print(f"prefill: {len(prompt)} tokens in {prefill_s * 1e3:.1f} ms, "
                  f"{len(prompt) / prefill_s:.1f} tokens/s")
    if new > 1:
        console.print(f"decode: {new - 1} tokens in {decode_s * 1e3:.1f} ms, {(new - 1) / decode_s:.1f} tokens/s "
                      f"(stopped: {result.finish_reasons[0]})")
    else:
        console.print(f"decode: no tokens after the first (stopped: {result.finish_reasons[0]})")
    return 0
