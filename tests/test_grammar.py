"""The grammar module on its own, with the real GPT-2 tokenizer of the test checkpoint: the
compile service (errors naming the field, the cache's bound and hits, sharing, the time
limit), the row matcher driven by hand through outputs that complete a JSON schema, a regex
and a choice, and the vectorized bitmask against the library's reference apply."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llguidance.numpy
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from lmserve_server.errors import InvalidArgumentError
from lmserve_server.grammar.bitmask import BitmaskApplier, allocate_bitmask
from lmserve_server.grammar.compiler import GrammarCompiler
from lmserve_server.grammar.matcher import CompiledGrammar, RowMatcher, fill_bitmasks
from lmserve_server.grammar.spec import GrammarSpec
from lmserve_server.testmodel import GPT2_EOS

VOCAB = 50257

USER_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "role": {"type": "string", "enum": ["admin", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


class Counts:
    def __init__(self) -> None:
        self.compiles: list[str] = []
        self.seconds: list[float] = []  # each compile's, as lmserve_grammar_compile_seconds
        self.hits = 0

    def compiled(self, kind: str, seconds: float) -> None:
        self.compiles.append(kind)
        self.seconds.append(seconds)

    def hit(self) -> None:
        self.hits += 1


def make_compiler(
    tokenizer: Any, counts: Counts | None = None, *, vocab: int = VOCAB, **kwargs: Any
) -> GrammarCompiler:
    counts = counts or Counts()
    settings: dict[str, Any] = {"timeout_s": 30.0, "cache_size": 16, **kwargs}
    return GrammarCompiler(
        tokenizer,
        model_vocab_size=vocab,
        end_token_ids={GPT2_EOS},
        on_compile=counts.compiled,
        on_hit=counts.hit,
        **settings,
    )


@pytest.fixture
def compiler(tokenizer: PreTrainedTokenizerBase) -> Iterator[GrammarCompiler]:
    c = make_compiler(tokenizer)
    yield c
    c.close()


def compile_now(compiler: GrammarCompiler, spec: GrammarSpec) -> CompiledGrammar:
    return asyncio.run(compiler.compile(spec))


def allowed(bitmask: torch.Tensor, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def allowed_tokens(bitmask: torch.Tensor, row: int, vocab: int = VOCAB) -> set[int]:
    words = bitmask[row].tolist()
    return {t for t in range(vocab) if (words[t // 32] >> (t % 32)) & 1}


def drive(grammar: CompiledGrammar, tokens: list[int]) -> RowMatcher:
    """Every token of ``tokens`` through a new row matcher, each checked allowed by the
    row's mask first, as the sampler will do."""
    matcher = grammar.matcher()
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    for i, token in enumerate(tokens):
        assert not matcher.is_finished(), f"finished before token {i}"
        matcher.fill_bitmask(bitmask, 0)
        assert allowed(bitmask, 0, token), f"token {i} ({token}) not allowed"
        assert matcher.accept(token), matcher.error
    return matcher


# ---- the matcher on hand-driven outputs -------------------------------------------------------


def test_a_compact_document_completes_its_json_schema(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = compile_now(compiler, GrammarSpec("json_schema", json.dumps(USER_SCHEMA)))
    document = {"name": "Ada", "age": 36, "role": "viewer", "tags": ["math", "x"]}
    text = json.dumps(document, separators=(",", ":"))
    matcher = drive(grammar, tokenizer.encode(text))
    assert matcher.is_accepting() and matcher.is_finished() and matcher.error is None
    # Finished: only the end token may follow.
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed_tokens(bitmask, 0) == {GPT2_EOS}


def test_json_is_compact_and_bounded_by_the_schema(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = compile_now(compiler, GrammarSpec("json_schema", json.dumps(USER_SCHEMA)))
    matcher = drive(grammar, tokenizer.encode('{"name":'))
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    # No whitespace before the value, and no token that starts the wrong type.
    for text in (" ", ' "', "\n", "1", "true"):
        (token,) = tokenizer.encode(text)
        assert not allowed(bitmask, 0, token), text
    assert allowed(bitmask, 0, tokenizer.encode('"')[0])
    # A refused token puts the matcher in error, and says why.
    assert not matcher.accept(tokenizer.encode(" ")[0])
    assert matcher.error and matcher.is_finished()


def test_an_unfinished_document_is_neither_accepting_nor_finished(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = compile_now(compiler, GrammarSpec("json_object"))
    matcher = drive(grammar, tokenizer.encode('{"a":[1,2'))
    assert not matcher.is_accepting() and not matcher.is_finished()
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert not allowed(bitmask, 0, GPT2_EOS)
    matcher = drive(grammar, tokenizer.encode('{"a":[1,2],"b":{"c":null}}'))
    assert matcher.is_finished()


def test_a_regex_completes_and_an_open_one_allows_the_end_token(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = compile_now(compiler, GrammarSpec("regex", r"[a-z]+@example\.(com|org)"))
    matcher = drive(grammar, tokenizer.encode("jane@example.org"))
    assert matcher.is_finished()
    # After "a+" matched "aa", more may follow or the row may end: both allowed.
    open_grammar = compile_now(compiler, GrammarSpec("regex", "a+"))
    matcher = drive(open_grammar, tokenizer.encode("aa"))
    assert matcher.is_accepting() and not matcher.is_finished()
    bitmask = allocate_bitmask(1, open_grammar.vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    assert allowed(bitmask, 0, GPT2_EOS) and allowed(bitmask, 0, tokenizer.encode("a")[0])


def test_a_choice_allows_its_options_only(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    options = ["green", "grey", 'say "no"\n']
    grammar = compile_now(compiler, GrammarSpec.choice(options))
    for option in options:
        assert drive(grammar, tokenizer.encode(option)).is_finished(), option
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    grammar.matcher().fill_bitmask(bitmask, 0)
    assert not allowed(bitmask, 0, tokenizer.encode("blue")[0])
    assert allowed(bitmask, 0, tokenizer.encode("g")[0])


def test_a_lark_grammar(compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase) -> None:
    lark = 'start: sum\nsum: NUM ("+" NUM)*\nNUM: /[0-9]+/\n'
    grammar = compile_now(compiler, GrammarSpec("grammar", lark))
    assert drive(grammar, tokenizer.encode("12+3+456")).is_accepting()
    matcher = grammar.matcher()
    assert not matcher.accept(tokenizer.encode("+")[0])


def test_rows_fill_one_buffer(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammars = [
        compile_now(compiler, GrammarSpec("json_schema", json.dumps(USER_SCHEMA))),
        compile_now(compiler, GrammarSpec.choice(["red", "blue"])),
        compile_now(compiler, GrammarSpec("regex", "[0-9]{3}")),
    ]
    rows = [(g.matcher(), i) for i, g in enumerate(grammars)]
    alone = allocate_bitmask(4, VOCAB)
    fill_bitmasks(rows, alone)
    # The schema forces '{"name":"' first: every allowed token is a piece of it.
    first = allowed_tokens(alone, 0)
    assert first and all('{"name":"'.startswith(tokenizer.decode([t])) for t in first)
    assert allowed_tokens(alone, 1) >= {tokenizer.encode("red")[0], tokenizer.encode("blue")[0]}
    assert (alone[3] == -1).all()  # a row no matcher filled is left as it was
    with pytest.raises(ValueError, match="int32"):
        rows[0][0].fill_bitmask(torch.zeros(1, 1571, dtype=torch.int64), 0)


def test_masks_span_a_model_vocabulary_wider_than_the_tokenizer(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    padded = 50304  # e.g. embeddings padded to a multiple of 64
    compiler = make_compiler(tokenizer, vocab=padded)
    try:
        grammar = compile_now(compiler, GrammarSpec("regex", "[a-z ]+"))
    finally:
        compiler.close()
    assert grammar.vocab_size == padded
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    assert bitmask.shape == (1, 1572)
    grammar.matcher().fill_bitmask(bitmask, 0)
    tokens = allowed_tokens(bitmask, 0, padded)
    assert tokens and max(tokens) < VOCAB


# ---- the compile service ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "field", "says"),
    [
        (GrammarSpec("json_schema", '{"type": "object"'), "structured_output.json_schema", "JSON"),
        (GrammarSpec("json_schema", "[1, 2]"), "structured_output.json_schema", "object"),
        (GrammarSpec("json_schema", '{"type": "strin"}'), "structured_output.json_schema", "strin"),
        (
            GrammarSpec("json_schema", '{"type": "array", "uniqueItems": true}'),
            "structured_output.json_schema",
            "uniqueItems",
        ),
        (GrammarSpec("regex", "a(b"), "structured_output.regex", "unclosed"),
        (GrammarSpec("regex", "a(?=b)"), "structured_output.regex", "regex"),
        (GrammarSpec("grammar", 'start: "a" ("b"'), "structured_output.grammar", "Expected"),
        (GrammarSpec("grammar", "start: missing_rule"), "structured_output.grammar", "missing"),
    ],
)
def test_a_bad_spec_is_invalid_argument_naming_its_field(
    compiler: GrammarCompiler, spec: GrammarSpec, field: str, says: str
) -> None:
    with pytest.raises(InvalidArgumentError) as err:
        compile_now(compiler, spec)
    message = str(err.value)
    assert message.startswith(f"{field}: ") and says in message
    assert "\n" not in message and len(message) < 400


def test_the_cache_is_bounded_least_recently_used_first_out(tokenizer: Any) -> None:
    counts = Counts()
    compiler = make_compiler(tokenizer, counts, cache_size=2)
    a, b, c = (GrammarSpec("regex", r) for r in ("a+", "b+", "c+"))

    async def run() -> None:
        first = await compiler.compile(a)
        assert await compiler.compile(a) is first  # a hit: the same compiled grammar
        await compiler.compile(b)
        await compiler.compile(a)  # a is now the most recently used
        await compiler.compile(c)  # evicts b
        assert compiler.cached == 2
        await compiler.compile(a)
        await compiler.compile(b)  # compiled again

    try:
        asyncio.run(run())
    finally:
        compiler.close()
    assert counts.compiles == ["regex"] * 4  # a, b, c, b again
    assert counts.hits == 3


def test_a_refused_spec_is_cached_too(tokenizer: Any) -> None:
    counts = Counts()
    compiler = make_compiler(tokenizer, counts)
    bad = GrammarSpec("regex", "a(b")
    try:
        for _ in range(3):
            with pytest.raises(InvalidArgumentError, match=r"^structured_output\.regex: "):
                compile_now(compiler, bad)
    finally:
        compiler.close()
    assert (len(counts.compiles), counts.hits) == (1, 2)


def test_concurrent_requests_share_one_compile(tokenizer: Any) -> None:
    counts = Counts()
    compiler = make_compiler(tokenizer, counts)
    spec = GrammarSpec("json_schema", json.dumps(USER_SCHEMA))

    async def run() -> list[CompiledGrammar]:
        return await asyncio.gather(*(compiler.compile(spec) for _ in range(5)))

    started = time.perf_counter()
    try:
        grammars = asyncio.run(run())
    finally:
        compiler.close()
    waited = time.perf_counter() - started
    assert counts.compiles == ["json_schema"]
    assert all(g is grammars[0] for g in grammars)
    # The compile's own time: some, and no more than the callers waited for it.
    assert 0 < counts.seconds[0] <= waited, (counts.seconds, waited)


def big_schema(properties: int) -> str:
    """A schema whose compile takes tens of milliseconds or more (measured: 5000 properties
    ~0.27 s on a 2-core CPU)."""
    return json.dumps(
        {
            "type": "object",
            "properties": {f"field_{i}": {"type": "string"} for i in range(properties)},
            "required": [f"field_{i}" for i in range(properties)],
        }
    )


def test_a_compile_over_the_time_limit_is_invalid_argument_stopped_and_cached(
    tokenizer: Any,
) -> None:
    counts = Counts()
    compiler = make_compiler(tokenizer, counts, timeout_s=0.001)
    spec = GrammarSpec("json_schema", big_schema(5000))

    async def run() -> None:
        # (The limit counts from the tokenizer's index being ready: it is built once.)
        with pytest.raises(InvalidArgumentError) as err:
            await compiler.compile(spec)
        assert str(err.value).startswith("structured_output.json_schema: took longer than")
        assert "--grammar-compile-timeout-s" in str(err.value)
        # Its probe was killed and the refusal kept: the same schema is then refused at once.
        for _ in range(600):
            if compiler.cached == 1:
                break
            await asyncio.sleep(0.05)
        with pytest.raises(InvalidArgumentError, match="took longer than"):
            await compiler.compile(spec)

    try:
        asyncio.run(run())
    finally:
        compiler.close()
    assert counts.compiles == ["json_schema"] and counts.hits == 1


def test_a_tokenizer_the_library_cannot_read_is_invalid_argument() -> None:
    compiler = make_compiler(object())
    try:
        with pytest.raises(InvalidArgumentError, match=r"^structured_output: .*fast tokenizer"):
            compile_now(compiler, GrammarSpec("regex", "a"))
    finally:
        compiler.close()


# ---- the bitmask -------------------------------------------------------------------------------


def reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The library's own apply (numpy), on a copy."""
    out = logits.clone().numpy()
    llguidance.numpy.apply_token_bitmask_inplace(out, bitmask.numpy())
    return torch.from_numpy(out)


@pytest.mark.parametrize("vocab", [VOCAB, 50304, 50000, 64])
def test_apply_matches_the_library_on_the_masked_rows_and_leaves_the_others(vocab: int) -> None:
    generator = torch.Generator().manual_seed(vocab)
    words = (VOCAB + 31) // 32 if vocab > 64 else 2
    logits = torch.randn(6, vocab, generator=generator)
    rows = torch.tensor([4, 1, 3])
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32, generator=generator)
    scores = logits.clone()
    BitmaskApplier("cpu", scores.dtype).apply(scores, rows, bitmask)
    expected = logits.clone()
    expected[rows] = reference(logits[rows], bitmask)
    assert torch.equal(scores, expected)
    for untouched in (0, 2, 5):  # bit-for-bit as they were
        assert torch.equal(scores[untouched], logits[untouched])


def test_apply_a_real_mask_in_half_precision(
    compiler: GrammarCompiler, tokenizer: PreTrainedTokenizerBase
) -> None:
    grammar = compile_now(compiler, GrammarSpec.choice(["alpha", "beta"]))
    bitmask = allocate_bitmask(1, grammar.vocab_size)
    grammar.matcher().fill_bitmask(bitmask, 0)
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scores = logits.to(dtype)
        applier = BitmaskApplier("cpu", dtype)
        applier.apply(scores, torch.tensor([1]), bitmask)
        finite = set(torch.isfinite(scores[1]).nonzero().flatten().tolist())
        assert finite == allowed_tokens(bitmask, 0)
        assert torch.equal(scores[0], logits[0].to(dtype))
        assert torch.equal(scores[1][list(finite)], logits[1][list(finite)].to(dtype))


def test_apply_with_no_rows_changes_nothing() -> None:
    logits = torch.randn(2, 100)
    scores = logits.clone()
    BitmaskApplier("cpu", scores.dtype).apply(
        scores, torch.empty(0, dtype=torch.int64), torch.empty(0, 4, dtype=torch.int32)
    )
    assert torch.equal(scores, logits)
