"""Structured output against hostile requests, over real gRPC on a real daemon: a grammar that
crashes the grammar library, schemas nested past any reader, a recursive ``$defs`` that
blows the library's limits, a reason tens of kilobytes long and regexes whose every token
costs a tenth of a second are each INVALID_ARGUMENT with a short reason, and the daemon
serves on; a row whose mask goes over its budget after its compile ends with that reason;
the compile cache stays within its bytes. The fuzz test runs the daemon's compile service
in a child process, so a shape that crashes it fails the test instead of the test run."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from lmserve import Client, Regex
from lmserve.v1 import lmserve_pb2, lmserve_pb2_grpc
from lmserve_server.engine.model import Engine
from lmserve_server.engine.rows import Row
from lmserve_server.engine.types import GenerationRequest
from lmserve_server.errors import InvalidArgumentError
from lmserve_server.grammar.bitmask import allocate_bitmask
from lmserve_server.grammar.compiler import GrammarCompiler
from lmserve_server.grammar.matcher import CompiledGrammar
from lmserve_server.grammar.spec import GrammarSpec
from lmserve_server.interceptors import MAX_STATUS_MESSAGE_CHARS
from lmserve_server.testmodel import GPT2_EOS
from tests.conftest import RunningDaemon
from tests.test_continuous import batch_of, run
from tests.test_engine import PROMPTS, request, solo

VOCAB = 50257


def chained_rules(count: int) -> str:
    """``rN: "x" rN+1 | "y"``: the library recurses once per rule (3,000 overflow a default
    thread's stack: a segmentation fault)."""
    rules = [f'r{i}: "x" r{i + 1} | "y"' for i in range(count)]
    return "start: r0\n" + "\n".join(rules) + f'\nr{count}: "z"'


def nested_objects(depth: int) -> str:
    opening = '{"type": "object", "required": ["a"], "properties": {"a": '
    return opening * depth + '{"type": "integer"}' + "}}" * depth


def nested_arrays(depth: int) -> str:
    return (
        '{"type": "array", "minItems": 1, "items": ' * depth + '{"type": "integer"}' + "}" * depth
    )


RECURSIVE_DEFS = json.dumps(
    {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {"a": {"$ref": "#/$defs/node"}, "b": {"$ref": "#/$defs/node"}},
                "required": ["a", "b"],
            }
        },
        "$ref": "#/$defs/node",
    }
)
# A pattern the library refuses quoting it: 77 KB of reason before any cut.
LONG_REASON_SCHEMA = json.dumps({"type": "string", "pattern": "(" + "a" * 77_000})
HEAVY_REGEX = "((a{50}){50}){50}"


def generate(address: str, output: lmserve_pb2.StructuredOutput) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        stub = lmserve_pb2_grpc.GeneratorStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(
                lmserve_pb2.GenerateRequest(
                    prompt="Hi", max_new_tokens=4, structured_output=output
                ),
                timeout=120,
            )
    return err.value


def assert_serving(address: str) -> None:
    with Client(address, timeout=60) as client:
        assert client.health() == "SERVING"
        assert client.generate("Hi", max_new_tokens=2).completion_tokens == 2


def test_a_grammar_that_crashes_the_library_is_invalid_argument(daemon: RunningDaemon) -> None:
    err = generate(daemon.address, lmserve_pb2.StructuredOutput(grammar=chained_rules(3000)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(
        "structured_output.grammar: the grammar library crashed compiling it"
    )
    assert_serving(daemon.address)
    # The probe's next child compiles the next grammar as before.
    with Client(daemon.address, timeout=60) as client:
        assert client.generate("Hi", max_new_tokens=3, structured_output=Regex("[0-9]{3}")).text


@pytest.mark.parametrize(
    ("output", "says"),
    [
        (lmserve_pb2.StructuredOutput(json_schema=nested_objects(500)), "nested too deeply"),
        (lmserve_pb2.StructuredOutput(json_schema=nested_arrays(2000)), "nested too deeply"),
        (lmserve_pb2.StructuredOutput(json_schema=RECURSIVE_DEFS), "structured_output.json_schema"),
        (lmserve_pb2.StructuredOutput(json_schema=LONG_REASON_SCHEMA), "regex parse error"),
        (lmserve_pb2.StructuredOutput(regex=HEAVY_REGEX), "--grammar-mask-budget-ms"),
    ],
    ids=["500-objects-deep", "2000-arrays-deep", "recursive-defs", "77KB-reason", "heavy-regex"],
)
def test_a_hostile_spec_is_invalid_argument_with_a_short_reason(
    daemon: RunningDaemon, output: lmserve_pb2.StructuredOutput, says: str
) -> None:
    err = generate(daemon.address, output)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert says in err.details()
    assert len(err.details()) <= MAX_STATUS_MESSAGE_CHARS
    assert_serving(daemon.address)


def over_budget_grammar(engine: Engine) -> CompiledGrammar:
    """A grammar compiled as the daemon does, then given a budget every mask goes over."""
    compiler = GrammarCompiler(
        engine.tokenizer,
        model_vocab_size=engine.vocab_size,
        end_token_ids=engine.end_token_ids,
        timeout_s=30,
        cache_size=4,
    )
    try:
        grammar = asyncio.run(compiler.compile(GrammarSpec("regex", "[0-9]+")))
    finally:
        compiler.close()
    grammar.mask_budget_s = 1e-9
    return grammar


def test_rows_over_their_budget_end_and_their_neighbours_get_their_solo_tokens(
    engine: Engine,
) -> None:
    grammar = over_budget_grammar(engine)
    neighbours = [request(engine, p, n) for p, n in zip(PROMPTS, [8, 5, 7], strict=False)]
    constrained = [request(engine, "Digits:", 8, grammar=grammar) for _ in range(2)]
    mixed = [neighbours[0], constrained[0], neighbours[1], constrained[1], neighbours[2]]
    alone = [solo(engine, engine.decode(r.prompt_ids), r.max_new_tokens) for r in neighbours]
    # The continuous scheduler's steps, rows arriving one a step.
    rows = [engine.new_row(r) for r in mixed]
    run(batch_of(engine, rows=5), rows, arrive_every=1)
    outcomes: list[object] = [r.error or r.output() for r in rows]
    # A static batch (generate) of the same rows.
    outcomes_static = engine.generate_batch([engine.new_row(r) for r in mixed])
    for got in (outcomes, outcomes_static):
        assert [got[i] for i in (0, 2, 4)] == alone
        for i in (1, 3):
            assert isinstance(got[i], InvalidArgumentError)
            assert "--grammar-mask-budget-ms" in str(got[i])


def test_a_row_whose_mask_goes_over_its_budget_ends_with_the_reason(
    tiny_model_dir: Path,
) -> None:
    """After a compile that passed its probe, a mask over the budget ends the row at its next
    token, INVALID_ARGUMENT naming the setting (here every fill is over a 1 ns budget)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    compiler = GrammarCompiler(
        tokenizer,
        model_vocab_size=VOCAB,
        end_token_ids={GPT2_EOS},
        timeout_s=30,
        cache_size=4,
        mask_budget_s=1.0,  # the probe's steps pass
    )
    try:
        grammar = asyncio.run(compiler.compile(GrammarSpec("regex", "[0-9]+")))
    finally:
        compiler.close()
    grammar.mask_budget_s = 1e-9
    row = Row(
        GenerationRequest(prompt_ids=(1, 2), max_new_tokens=8, grammar=grammar),
        decode=tokenizer.decode,
        end_token_ids=frozenset({GPT2_EOS}),
    )
    assert row.matcher is not None
    row.matcher.fill_bitmask(allocate_bitmask(1, VOCAB), 0)
    assert row.take(tokenizer.convert_tokens_to_ids("1"))
    assert isinstance(row.error, InvalidArgumentError)
    assert "--grammar-mask-budget-ms" in str(row.error) and row.tokens == []


# The daemon's compile service in a child: each shape's outcome, one line each.
_FUZZ = textwrap.dedent(
    """
    import asyncio, json, sys
    from transformers import AutoTokenizer
    from lmserve_server.errors import InvalidArgumentError
    from lmserve_server.grammar.compiler import GrammarCompiler
    from lmserve_server.grammar.spec import GrammarSpec

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
    compiler = GrammarCompiler(tokenizer, model_vocab_size=50257, end_token_ids={50256},
                               timeout_s=20, cache_size=4)

    async def run():
        for kind, text in json.loads(sys.stdin.read()):
            try:
                await compiler.compile(GrammarSpec(kind, text))
                print("compiled", flush=True)
            except InvalidArgumentError as err:
                print("refused", len(str(err)), flush=True)

    asyncio.run(run())
    compiler.close()
    """
)


def fuzz_shapes() -> list[tuple[str, str]]:
    shapes: list[tuple[str, str]] = []
    for n in (10, 1000, 2000, 3000, 4000):
        shapes.append(("grammar", chained_rules(n)))
    for depth in (10, 200, 1000, 10_000, 30_000):
        shapes.append(("grammar", "start: " + "(" * depth + '"x"' + ")" * depth))
        shapes.append(("regex", "(" * depth + "a" + ")" * depth))
        shapes.append(("regex", "(?:a|" * depth + "b" + ")" * depth))
    for depth in (10, 100, 128, 129, 300, 500, 2000):
        shapes.append(("json_schema", nested_objects(depth)))
        shapes.append(("json_schema", nested_arrays(depth)))
    alternatives = " | ".join(f'"w{i}"' for i in range(5000))
    shapes += [
        ("json_schema", RECURSIVE_DEFS),
        ("json_schema", LONG_REASON_SCHEMA),
        ("regex", HEAVY_REGEX),
        ("regex", "(.*a){40}"),
        ("regex", "a{0,65535}"),
        ("regex", "[a-z]{1000}" * 20),
        ("grammar", f"start: {alternatives}"),
        ("grammar", 'start: x\nx: x x | "a"'),
        ("grammar", "start: x\nx: x"),
    ]
    return shapes


def test_fuzzed_shapes_never_crash_the_compile_service(tiny_model_dir: Path) -> None:
    shapes = fuzz_shapes()
    done = subprocess.run(
        [sys.executable, "-c", _FUZZ, str(tiny_model_dir)],
        input=json.dumps(shapes),
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    outcomes = done.stdout.split("\n")[:-1]
    assert len(outcomes) == len(shapes)
    for (kind, text), outcome in zip(shapes, outcomes, strict=True):
        if outcome != "compiled":
            _, length = outcome.split()
            assert int(length) < 400, (kind, text[:60])
    assert outcomes[0] == "compiled" and "refused" in outcomes[3]  # 10 rules; 3,000 rules


_CACHE_RSS = textwrap.dedent(
    """
    import asyncio, os, sys
    from transformers import AutoTokenizer
    from lmserve_server.grammar.compiler import GrammarCompiler
    from lmserve_server.grammar.spec import GrammarSpec

    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cap = int(sys.argv[2])
    compiler = GrammarCompiler(AutoTokenizer.from_pretrained(sys.argv[1]), model_vocab_size=50257,
                               end_token_ids={50256}, timeout_s=60, cache_size=256, cache_bytes=cap)

    async def run():
        await compiler.compile(GrammarSpec("regex", "a+"))
        before = rss()
        for n in range(10, 46):  # 36 regexes of a few megabytes each
            await compiler.compile(GrammarSpec("regex", "((a{20}){20}){%d}" % n))
        print(rss() - before, compiler.cached_bytes, compiler.cached)

    asyncio.run(run())
    compiler.close()
    """
)


def test_the_grammar_cache_and_the_memory_stay_within_their_bytes(tiny_model_dir: Path) -> None:
    """36 distinct regexes of a few megabytes each through a cache of 32 MiB: the cache
    evicts by bytes and the process's resident memory grows by at most the cache's bytes and
    10% (measured in a child process of its own)."""
    cap = 32 * 1024 * 1024
    done = subprocess.run(
        [sys.executable, "-c", _CACHE_RSS, str(tiny_model_dir), str(cap)],
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    growth, cached_bytes, cached = map(int, done.stdout.split())
    assert 0 < cached_bytes <= cap and 1 < cached < 36
    assert growth <= cap * 1.1
