"""xgrammar against llguidance on lmserve's loads: the measurements behind the choice of
structured-output library (the figures and the choice are in BENCHMARKS.md).

    python benchmarks/grammar_libs.py [--model DIR] [--rows 16] [--threads 2]

llguidance comes with the server extra; xgrammar does not (``pip install xgrammar`` first,
keeping torch as it is: on Linux x86_64 it also pulls triton, ~1 GB).

With the real GPT-2 tokenizer (the one ``lmserve make-test-model`` writes, made on the spot
when --model is not given), for each library, side by side:

1. set-up: the tokenizer's index, once per daemon;
2. compile: three JSON schemas (10, 20 and 30 properties: nested objects, arrays, enums,
   bounds), any JSON object, a regex, a choice and an EBNF grammar; cold (a fresh compiler,
   median of --reps) and cached (the same text again); JSON is compact (no insignificant
   whitespace) in both;
3. first mask: compile + the first mask fill, what a request waits before its first token;
4. per row: fill a bitmask row and accept the document's next token, over every token of a
   valid compact document (us per token, median and p99);
5. a step of --rows rows, each under a schema at its own place in its document: the masks
   filled one row after another on the calling thread, with the library's own parallel
   fill over --threads threads, and with two Python threads (does a fill release the GIL?);
6. the mask applied to a (rows, vocab) float32 logits tensor: the library's CPU apply and
   lmserve's vectorized one (``lmserve_server.grammar.bitmask``), checked equal;
7. schema keywords a library may not enforce (uniqueItems, ...): does it refuse the
   schema, enforce the keyword, or ignore it and let a document that breaks it through?
8. pathological inputs: how long a cold compile runs (the script waits up to 30 s);
9. dependency weight: what each installs.

Each library's figures are taken one after the other in one process on this machine;
before each the script waits (up to 30 s) for the CPUs to be quiet (``harness.py``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import wait_for_quiet

# ---- the workloads ------------------------------------------------------------------------

_ADDRESS = {
    "type": "object",
    "properties": {
        "street": {"type": "string", "maxLength": 60},
        "city": {"type": "string", "maxLength": 40},
        "postcode": {"type": "string", "pattern": "^[0-9]{5}$"},
        "country": {"type": "string", "enum": ["DE", "FR", "GB", "US", "JP"]},
    },
    "required": ["street", "city", "postcode", "country"],
    "additionalProperties": False,
}
SCHEMAS: dict[str, dict[str, Any]] = {
    # 10 properties, flat: a user record.
    "user-10": {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "name": {"type": "string", "minLength": 1, "maxLength": 40},
            "email": {"type": "string", "maxLength": 80},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "active": {"type": "boolean"},
            "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
            "score": {"type": "number"},
            "manager_id": {"type": ["integer", "null"]},
            "locale": {"type": "string", "enum": ["en-GB", "en-US", "de-DE", "fr-FR"]},
        },
        "required": ["id", "name", "email", "age", "active", "role", "tags", "score"],
        "additionalProperties": False,
    },
    # 20 properties over nested objects and an array of objects: an order.
    "order-20": {
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
            "status": {"type": "string", "enum": ["pending", "paid", "shipped", "cancelled"]},
            "customer": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "name": {"type": "string", "maxLength": 40},
                    "email": {"type": "string"},
                    "address": _ADDRESS,
                },
                "required": ["id", "name", "email", "address"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 10,
                "items": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                        "unit_price": {"type": "number", "minimum": 0},
                        "gift": {"type": "boolean"},
                    },
                    "required": ["sku", "quantity", "unit_price"],
                    "additionalProperties": False,
                },
            },
            "currency": {"type": "string", "enum": ["EUR", "USD", "GBP"]},
            "total": {"type": "number"},
            "notes": {"type": ["string", "null"]},
        },
        "required": ["order_id", "status", "customer", "items", "currency", "total"],
        "additionalProperties": False,
    },
    # 30 properties, three levels deep, arrays of enums and of objects: an incident report.
    "incident-30": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "title": {"type": "string", "maxLength": 80},
            "severity": {"type": "string", "enum": ["sev1", "sev2", "sev3", "sev4"]},
            "status": {"type": "string", "enum": ["open", "mitigated", "resolved"]},
            "started_at": {"type": "string"},
            "resolved_at": {"type": ["string", "null"]},
            "services": {
                "type": "array",
                "items": {"type": "string", "enum": ["api", "db", "cache", "queue", "web"]},
                "maxItems": 5,
            },
            "customer_impact": {
                "type": "object",
                "properties": {
                    "users_affected": {"type": "integer", "minimum": 0},
                    "regions": {"type": "array", "items": {"type": "string"}},
                    "revenue_loss": {"type": "number"},
                    "sla_breached": {"type": "boolean"},
                },
                "required": ["users_affected", "regions", "sla_breached"],
                "additionalProperties": False,
            },
            "timeline": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "at": {"type": "string"},
                        "kind": {"type": "string", "enum": ["detect", "page", "fix", "note"]},
                        "text": {"type": "string", "maxLength": 200},
                    },
                    "required": ["at", "kind", "text"],
                    "additionalProperties": False,
                },
            },
            "owner": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "team": {"type": "string"},
                    "oncall": {"type": "boolean"},
                    "contact": {
                        "type": "object",
                        "properties": {
                            "email": {"type": "string"},
                            "phone": {"type": "string", "pattern": "^\\+[0-9]{8,15}$"},
                        },
                        "required": ["email"],
                        "additionalProperties": False,
                    },
                },
                "required": ["name", "team", "oncall", "contact"],
                "additionalProperties": False,
            },
            "root_cause": {"type": "string"},
            "action_items": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
            "postmortem_due": {"type": "boolean"},
        },
        "required": [
            "id",
            "title",
            "severity",
            "status",
            "started_at",
            "services",
            "customer_impact",
            "timeline",
            "owner",
            "root_cause",
            "action_items",
            "postmortem_due",
        ],
        "additionalProperties": False,
    },
}
# A valid document of each schema, every property in the schema's order.
DOCUMENTS: dict[str, Any] = {
    "user-10": {
        "id": 4211,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "age": 36,
        "active": True,
        "role": "editor",
        "tags": ["math", "engines"],
        "score": 97.5,
        "manager_id": None,
        "locale": "en-GB",
    },
    "order-20": {
        "order_id": "ORD-004211",
        "status": "paid",
        "customer": {
            "id": 77,
            "name": "Grace Hopper",
            "email": "grace@example.org",
            "address": {
                "street": "1 Harbour Road",
                "city": "Arlington",
                "postcode": "22201",
                "country": "US",
            },
        },
        "items": [
            {"sku": "KB-101", "quantity": 2, "unit_price": 49.9, "gift": False},
            {"sku": "MS-7", "quantity": 1, "unit_price": 19.0},
        ],
        "currency": "USD",
        "total": 118.8,
        "notes": "leave at the door",
    },
    "incident-30": {
        "id": "INC-2024-0042",
        "title": "Checkout latency above 2 s in eu-west",
        "severity": "sev2",
        "status": "resolved",
        "started_at": "2024-05-04T10:12:00Z",
        "resolved_at": "2024-05-04T11:40:00Z",
        "services": ["api", "db"],
        "customer_impact": {
            "users_affected": 12000,
            "regions": ["eu-west-1"],
            "revenue_loss": 5400.0,
            "sla_breached": False,
        },
        "timeline": [
            {"at": "10:12", "kind": "detect", "text": "p99 alert fired"},
            {"at": "10:20", "kind": "page", "text": "database on-call paged"},
            {"at": "11:35", "kind": "fix", "text": "index rebuilt on orders"},
        ],
        "owner": {
            "name": "Lin",
            "team": "payments",
            "oncall": True,
            "contact": {"email": "lin@example.com", "phone": "+4930123456"},
        },
        "root_cause": "a missing index after a migration",
        "action_items": ["add migration check", "alert on slow queries"],
        "postmortem_due": True,
    },
}
REGEX = r"[a-z0-9._]{1,20}@[a-z0-9]{1,15}\.(com|org|net)"
REGEX_TEXT = "jane.doe@example.com"
CHOICE = ["positive", "negative", "neutral", "mixed"]
CHOICE_TEXT = "neutral"
# The same arithmetic grammar in each library's dialect: xgrammar takes GBNF-style EBNF
# (llama.cpp's), llguidance a Lark-like syntax.
EBNF_XGRAMMAR = """
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= num | "(" expr ")"
num ::= [0-9]+
"""
LARK_LLGUIDANCE = """
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUM | "(" expr ")"
NUM: /[0-9]+/
"""
GRAMMAR_TEXT = "(12+3)*4-5/6"
# Inputs whose compile is expensive by construction.
PATHOLOGICAL = {
    "regex .{0,20000}": ("regex", ".{0,20000}"),
    "regex [a-z]{1,3000}": ("regex", "[a-z]{1,3000}"),
    "regex ((a|b){1,40}){1,40}": ("regex", "((a|b){1,40}){1,40}"),
    "schema pattern ^([a-z]{1,50}-){1,50}$": (
        "json_schema",
        json.dumps({"type": "string", "pattern": "^([a-z]{1,50}-){1,50}$"}),
    ),
    "schema pattern ^([a-z]{1,80}-){1,80}$": (
        "json_schema",
        json.dumps({"type": "string", "pattern": "^([a-z]{1,80}-){1,80}$"}),
    ),
    "schema 200 props, maxLength 2000": (
        "json_schema",
        json.dumps(
            {
                "type": "object",
                "properties": {
                    f"p{i}": {"type": "string", "minLength": 10, "maxLength": 2000}
                    for i in range(200)
                },
                "required": [f"p{i}" for i in range(200)],
            }
        ),
    ),
    "schema anyOf of 300 objects": (
        "json_schema",
        json.dumps(
            {
                "anyOf": [
                    {"type": "object", "properties": {f"k{i}": {"type": "string"}}}
                    for i in range(300)
                ]
            }
        ),
    ),
}
# Schema keywords a library may not enforce, and a compact document that breaks each: does
# the library refuse the schema, enforce the keyword, or ignore it (and let the document
# through)?
KEYWORDS = {
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1,1]"),
    "propertyNames": (
        {"type": "object", "propertyNames": {"pattern": "^a"}, "additionalProperties": True},
        '{"b":1}',
    ),
    "multipleOf": ({"type": "integer", "multipleOf": 7}, "8"),
    "format: email": ({"type": "string", "format": "email"}, '"not an email"'),
}
# How long one pathological compile may run before the script stops waiting for it (the
# library's thread can't be stopped; it is left running, a daemon thread).
PATHOLOGICAL_WAIT_S = 30.0


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def workloads() -> list[tuple[str, str, str, str]]:
    """(name, kind, text, a valid output) for every kind of constraint."""
    out = [
        (name, "json_schema", json.dumps(s), compact(DOCUMENTS[name]))
        for name, s in SCHEMAS.items()
    ]
    out += [
        ("json_object", "json_object", "", compact(DOCUMENTS["order-20"])),
        ("regex", "regex", REGEX, REGEX_TEXT),
        ("choice", "choice", json.dumps(CHOICE), CHOICE_TEXT),
        ("grammar", "grammar", "", GRAMMAR_TEXT),
    ]
    return out


# ---- the two libraries behind one small interface ------------------------------------------


class Lib:
    name = ""
    package = ""
    setup_s = 0.0  # building the tokenizer's index

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        raise NotImplementedError

    def compile(self, kind: str, text: str, *, cached: bool) -> Any:
        raise NotImplementedError

    def matcher(self, compiled: Any) -> Any:
        raise NotImplementedError

    def fill(self, matcher: Any, bitmask: Any, index: int) -> None:
        raise NotImplementedError

    def accept(self, matcher: Any, token: int) -> bool:
        raise NotImplementedError

    def accepting(self, matcher: Any) -> bool:
        raise NotImplementedError

    def fill_par(self, matchers: Sequence[Any], bitmask: Any) -> None:
        raise NotImplementedError

    def apply(self, logits: Any, bitmask: Any) -> None:
        raise NotImplementedError


class XGrammar(Lib):
    name = "xgrammar"
    package = "xgrammar"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        start = time.perf_counter()
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.setup_s = time.perf_counter() - start
        self.cold = None
        self.warm = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self.batch = xgr.BatchGrammarMatcher(max_threads=ARGS.threads)

    def compile(self, kind: str, text: str, *, cached: bool) -> Any:
        compiler = (
            self.warm
            if cached
            else self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        )
        if kind == "json_schema":
            return compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        if kind == "json_object":
            return compiler.compile_json_schema(
                '{"type":"object"}', any_whitespace=False, separators=(",", ":")
            )
        if kind == "regex":
            return compiler.compile_regex(text)
        if kind == "choice":
            options = json.loads(text)
            return compiler.compile_grammar("root ::= " + " | ".join(map(json.dumps, options)))
        return compiler.compile_grammar(text or EBNF_XGRAMMAR)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, index: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, index)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.accept_token(self.info.stop_token_ids[0])) and matcher.is_terminated()

    def fill_par(self, matchers: Sequence[Any], bitmask: Any) -> None:
        self.batch.batch_fill_next_token_bitmask(list(matchers), bitmask)

    def apply(self, logits: Any, bitmask: Any) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask, backend="cpu")


class LLGuidance(Lib):
    name = "llguidance"
    package = "llguidance"

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf

        self.llg = llguidance
        start = time.perf_counter()
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.setup_s = time.perf_counter() - start
        self.executor = llguidance.LLExecutor(num_threads=ARGS.threads)
        self.cache: dict[tuple[str, str], Any] = {}

    def grammar(self, kind: str, text: str) -> str:
        m = self.llg.LLMatcher
        compact_json = {"whitespace_flexible": False}
        if kind == "json_schema":
            return m.grammar_from_json_schema(text, defaults=compact_json)
        if kind == "json_object":
            return m.grammar_from_json_schema('{"type":"object"}', defaults=compact_json)
        if kind == "regex":
            return m.grammar_from_regex(text)
        if kind == "choice":
            return m.grammar_from_lark("start: " + " | ".join(map(json.dumps, json.loads(text))))
        return m.grammar_from_lark(text or LARK_LLGUIDANCE)

    def compile(self, kind: str, text: str, *, cached: bool) -> Any:
        # llguidance has no compiled-grammar object apart from a matcher: a cache keeps a
        # fresh matcher and hands out deep copies of it.
        if cached and (kind, text) in self.cache:
            return self.cache[kind, text].deep_copy()
        matcher = self.llg.LLMatcher(self.tokenizer, self.grammar(kind, text), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        if cached:
            self.cache[kind, text] = matcher
            return matcher.deep_copy()
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: Any, index: int) -> None:
        # As llguidance.torch does (which imports torch's compiler, 2 s, for its apply).
        row = bitmask[index]
        matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def fill_par(self, matchers: Sequence[Any], bitmask: Any) -> None:
        self.executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)],
            bitmask.data_ptr(),
            bitmask.shape[1] * 4,
            bitmask.shape[0],
        )

    def apply(self, logits: Any, bitmask: Any) -> None:
        # llguidance's own apply is a torch.compile kernel (needs a C++ compiler and
        # compiles on first use); its numpy twin is the CPU reference.
        import llguidance.numpy

        arr = logits.numpy()
        llguidance.numpy.apply_token_bitmask_inplace(arr, bitmask.numpy())


# ---- measuring ----------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def median_ms(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1000


def p99(samples: Sequence[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def say(text: str = "") -> None:
    print(text, flush=True)


def row(label: str, values: dict[str, str]) -> None:
    say(f"  {label:<42}" + "".join(f"{values.get(n, '-'):>16}" for n in ARGS.libs))


def measure(lib: Lib, tokenizer: Any, vocab_size: int) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"compile": {}, "cached": {}, "first_mask": {}, "fill": {}}
    bitmask = torch.full((ARGS.rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    for name, kind, text, valid in workloads():
        wait_for_quiet(max_wait_s=ARGS.quiet_s)

        def cold_compile(kind: str = kind, text: str = text) -> Any:
            return lib.compile(kind, text, cached=False)

        def cached_compile(kind: str = kind, text: str = text) -> Any:
            return lib.compile(kind, text, cached=True)

        cold = [timed(cold_compile)[0] for _ in range(ARGS.reps)]
        cached_compile()
        cached = [timed(cached_compile)[0] for _ in range(ARGS.reps)]
        firsts = []
        for _ in range(ARGS.reps):
            start = time.perf_counter()
            m = lib.matcher(lib.compile(kind, text, cached=False))
            lib.fill(m, bitmask, 0)
            firsts.append(time.perf_counter() - start)
        out["compile"][name] = median_ms(cold)
        out["cached"][name] = median_ms(cached)
        out["first_mask"][name] = median_ms(firsts)
        # The per-token loop: fill the row, check the document's token is allowed, accept it.
        tokens = tokenizer.encode(valid, add_special_tokens=False)
        compiled = lib.compile(kind, text, cached=True)
        fills: list[float] = []
        accepts: list[float] = []
        for _ in range(ARGS.passes):
            m = lib.matcher(compiled)
            for token in tokens:
                t0 = time.perf_counter()
                lib.fill(m, bitmask, 0)
                t1 = time.perf_counter()
                allowed = (int(bitmask[0, token // 32]) >> (token % 32)) & 1
                if not allowed:
                    raise AssertionError(f"{lib.name} {name}: token {token} masked in {valid!r}")
                t2 = time.perf_counter()
                if not lib.accept(m, token):
                    raise AssertionError(f"{lib.name} {name}: token {token} refused")
                accepts.append(time.perf_counter() - t2)
                fills.append(t1 - t0)
            if not lib.accepting(m):
                raise AssertionError(f"{lib.name} {name}: {valid!r} does not complete")
        out["fill"][name] = (
            statistics.median(fills) * 1e6,
            p99(fills) * 1e6,
            statistics.mean(accepts) * 1e6,
            len(tokens),
        )
    out["step"] = step(lib, tokenizer, vocab_size)
    out["apply"] = apply_cost(lib, vocab_size)
    out["keywords"] = keywords(lib, tokenizer)
    out["pathological"] = pathological(lib)
    return out


def step(lib: Lib, tokenizer: Any, vocab_size: int) -> dict[str, float]:
    """A step of ARGS.rows rows under the three schemas, each row at its own offset in its
    document; the fills of a step timed together, then every row accepts its next token."""
    import torch

    docs = [(json.dumps(SCHEMAS[n]), compact(DOCUMENTS[n])) for n in SCHEMAS]
    rows = []
    for i in range(ARGS.rows):
        text, valid = docs[i % len(docs)]
        tokens = tokenizer.encode(valid, add_special_tokens=False)
        m = lib.matcher(lib.compile("json_schema", text, cached=True))
        offset = (i * 7) % (len(tokens) // 2)
        for t in tokens[:offset]:
            lib.accept(m, t)
        rows.append([m, tokens, offset, text])
    bitmask = torch.full((ARGS.rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)
    steps = min(len(r[1]) - r[2] for r in rows) - 1
    offsets = [r[2] for r in rows]

    def rewind() -> None:
        """Every row back at its starting offset, with a new matcher."""
        for r, offset in zip(rows, offsets, strict=True):
            r[0] = lib.matcher(lib.compile("json_schema", r[3], cached=True))
            for t in r[1][:offset]:
                lib.accept(r[0], t)
            r[2] = offset

    def run(fill_all: Callable[[], None]) -> float:
        rewind()
        wait_for_quiet(max_wait_s=ARGS.quiet_s)
        samples = []
        for _ in range(steps):
            samples.append(timed(fill_all)[0])
            for r in rows:
                lib.accept(r[0], r[1][r[2]])
                r[2] += 1
        return statistics.median(samples) * 1000

    def serial() -> None:
        for i, r in enumerate(rows):
            lib.fill(r[0], bitmask, i)

    def python_threads() -> None:
        half = len(rows) // 2
        t = threading.Thread(
            target=lambda: [lib.fill(r[0], bitmask, i) for i, r in enumerate(rows[:half])]
        )
        t.start()
        for i, r in enumerate(rows[half:], start=half):
            lib.fill(r[0], bitmask, i)
        t.join()

    def accept_all() -> float:
        rewind()
        samples = []
        for _ in range(steps):
            start = time.perf_counter()
            for r in rows:
                lib.accept(r[0], r[1][r[2]])
                r[2] += 1
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1000

    return {
        "serial": run(serial),
        "library parallel": run(lambda: lib.fill_par([r[0] for r in rows], bitmask)),
        "two python threads": run(python_threads),
        "accept": accept_all(),
        "steps": steps,
    }


def apply_cost(lib: Lib, vocab_size: int) -> dict[str, float]:
    import torch

    from lmserve_server.grammar.bitmask import BitmaskApplier

    torch.manual_seed(0)
    words = (vocab_size + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (ARGS.rows, words), dtype=torch.int32)
    logits = torch.randn(ARGS.rows, vocab_size)
    reference = logits.clone()
    lib.apply(reference, bitmask)
    applier = BitmaskApplier("cpu", torch.float32)
    rows = torch.arange(ARGS.rows)
    ours = logits.clone()
    applier.apply(ours, rows, bitmask)
    if not torch.equal(ours, reference):
        raise AssertionError(f"lmserve's apply differs from {lib.name}'s")
    # Steady state, as a step sees it: the same tensors applied to again and again (its
    # allocations recycled; the first calls of a process also pay for fresh pages).
    x, y = logits.clone(), logits.clone()
    for _ in range(10):
        lib.apply(x, bitmask)
        applier.apply(y, rows, bitmask)
    wait_for_quiet(max_wait_s=ARGS.quiet_s)
    library, vectorized = [], []
    for _ in range(50):
        library.append(timed(lambda: lib.apply(x, bitmask))[0])
        vectorized.append(timed(lambda: applier.apply(y, rows, bitmask))[0])
    return {"library": median_ms(library), "lmserve": median_ms(vectorized)}


def pathological(lib: Lib) -> dict[str, str]:
    out = {}
    for label, (kind, text) in PATHOLOGICAL.items():
        wait_for_quiet(max_wait_s=ARGS.quiet_s)
        result: dict[str, str] = {}

        def run(kind: str = kind, text: str = text, result: dict[str, str] = result) -> None:
            try:
                seconds, _ = timed(lambda: lib.compile(kind, text, cached=False))
                result["r"] = f"{seconds * 1000:.0f} ms ok"
            except Exception as err:
                result["r"] = f"refused ({type(err).__name__})"
                result["why"] = " ".join(str(err).split())[:120]

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(PATHOLOGICAL_WAIT_S)
        out[label] = result.get("r", f"> {PATHOLOGICAL_WAIT_S:g} s")
        if "why" in result:
            say(f"    {lib.name} {label}: {result['why']}")
    return out


def keywords(lib: Lib, tokenizer: Any) -> dict[str, str]:
    out = {}
    for keyword, (schema, breaking) in KEYWORDS.items():
        try:
            compiled = lib.compile("json_schema", json.dumps(schema), cached=False)
        except Exception:
            out[keyword] = "refused"
            continue
        matcher = lib.matcher(compiled)
        passed = all(lib.accept(matcher, t) for t in tokenizer.encode(breaking))
        out[keyword] = "IGNORED" if passed and lib.accepting(matcher) else "enforced"
    return out


def dependency_weight(package: str) -> str:
    """The package's own size and the packages it requires beyond the server's."""
    dist = importlib.metadata.distribution(package)
    size = sum((f.size or 0) for f in dist.files or ())
    requires = [
        r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip()
        for r in dist.requires or ()
        if "extra ==" not in r
    ]
    return f"{size / 2**20:.1f} MiB; requires: {', '.join(requires) or 'nothing'}"


ARGS: argparse.Namespace


def main() -> int:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint whose tokenizer to use (default: make one)")
    parser.add_argument("--rows", type=int, default=16, help="rows of a step (default 16)")
    parser.add_argument("--threads", type=int, default=2, help="parallel fill threads")
    parser.add_argument("--reps", type=int, default=5, help="compiles per median")
    parser.add_argument("--passes", type=int, default=3, help="passes over each document")
    parser.add_argument("--quiet-s", type=float, default=30.0, help="most wait for quiet CPUs")
    parser.add_argument("--libs", nargs="+", default=["xgrammar", "llguidance"])
    ARGS = parser.parse_args()

    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(ARGS.threads)
    if ARGS.model is None:
        from lmserve_server.testmodel import write_test_model

        ARGS.model = str(write_test_model(tempfile.mkdtemp(prefix="grammar-libs-")))
    tokenizer = AutoTokenizer.from_pretrained(ARGS.model)
    vocab_size = len(tokenizer)
    say(
        f"tokenizer: {type(tokenizer).__name__}, {vocab_size} tokens; {ARGS.rows} rows a step; "
        f"torch threads {torch.get_num_threads()}"
    )
    classes = {"xgrammar": XGrammar, "llguidance": LLGuidance}
    results: dict[str, dict[str, Any]] = {}
    setup: dict[str, str] = {}
    for name in list(ARGS.libs):
        wait_for_quiet(max_wait_s=ARGS.quiet_s)
        try:
            lib = classes[name](tokenizer, vocab_size)
        except ImportError:  # xgrammar is not a dependency of lmserve
            say(f"{name}: not installed (pip install {name}); left out")
            ARGS.libs.remove(name)
            continue
        setup[name] = f"{lib.setup_s * 1000:.0f} ms"
        results[name] = measure(lib, tokenizer, vocab_size)
        version = importlib.metadata.version(lib.package)
        setup[name + " version"] = version

    say("\nversions")
    row("", {n: setup[n + " version"] for n in ARGS.libs})
    say("set-up (tokenizer index, once per daemon)")
    row("", {n: setup[n] for n in ARGS.libs})
    for key, title in (
        ("compile", "compile, cold (ms, median)"),
        ("cached", "compile, cached (ms, median)"),
        ("first_mask", "compile + first mask fill, cold (ms)"),
    ):
        say(title)
        for name in results[ARGS.libs[0]][key]:
            row(name, {n: f"{results[n][key][name]:.3f}" for n in ARGS.libs})
    say("per row and token: fill us (median / p99), accept us (mean), tokens")
    for name in results[ARGS.libs[0]]["fill"]:
        row(
            name,
            {n: "{:.0f}/{:.0f} {:.0f} {}".format(*results[n]["fill"][name]) for n in ARGS.libs},
        )
    say(f"a step of {ARGS.rows} schema rows (ms, median over the documents' steps)")
    for key in ("serial", "library parallel", "two python threads", "accept"):
        row(
            f"fill {key}" if key != "accept" else "accept, every row",
            {n: f"{results[n]['step'][key]:.3f}" for n in ARGS.libs},
        )
    say(f"apply a ({ARGS.rows}, {vocab_size}) float32 mask (ms, median; results equal)")
    for key in ("library", "lmserve"):
        row(key, {n: f"{results[n]['apply'][key]:.3f}" for n in ARGS.libs})
    say("a schema keyword the library can't enforce, and a document breaking it")
    for keyword in KEYWORDS:
        row(keyword, {n: results[n]["keywords"][keyword] for n in ARGS.libs})
    say(f"pathological compiles (cold; waited for up to {PATHOLOGICAL_WAIT_S:g} s)")
    for label in PATHOLOGICAL:
        row(label[:42], {n: results[n]["pathological"][label] for n in ARGS.libs})
    say("dependency weight")
    for n in ARGS.libs:
        say(f"  {n}: {dependency_weight(n)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
