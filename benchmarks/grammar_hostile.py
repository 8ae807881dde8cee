"""Heavy regexes beside an unconstrained stream: does one tenant's costly grammar slow another?

    python benchmarks/grammar_hostile.py --model models/gpt2-random [--rounds 3]

A continuous daemon serves one unconstrained stream (a 48-word prompt, greedy,
``--stream-tokens`` new tokens). In the *alone* leg nothing else runs; in the *heavy* leg 8
requests under regexes whose masks cost ~0.1 s a token (``((a{50}){50}){N}`` and the like:
new texts each round, so each is compiled, not served from the cache) are sent at the same
moment as the stream. Figure: the stream's inter-token gaps (as its client receives the
chunks), p50, per leg; legs interleaved by round, the ratio heavy / alone per round and its
median (the target: at most 1.5x). Also checked: the stream's tokens are the same in both
legs, and what each heavy request got (its status).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, wait_for_quiet
from peer import WORDS

import lmserve
from lmserve import Client, Regex
from lmserve.bench_stats import percentile


def heavy_regexes(round_: int) -> list[str]:
    """8 costly regexes (nested counted repetitions: a tenth of a second a token), their
    texts new in each round."""
    n = 40 + round_
    return [
        f"((a{{50}}){{50}}){{{n}}}",
        f"((a{{50}}){{{n}}}){{50}}",
        f"((a{{{n}}}){{50}}){{50}}",
        f"((b{{50}}){{50}}){{{n}}}",
        f"((c{{50}}){{50}}){{{n}}}",
        f"((ab{{50}}){{50}}){{{n}}}",
        f"((x{{50}}){{50}}){{{n}}}",
        f"((a{{48}}){{49}}){{{n}}}",
    ]


@dataclass
class Leg:
    """The stream's gaps (s) and tokens, and the heavy requests' outcomes."""

    gaps: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return 1000 * percentile(self.gaps[1:], 50)  # the first is the time to first token


def leg(address: str, prompt: str, stream_tokens: int, regexes: list[str]) -> Leg:
    got = Leg()
    gaps, tokens, outcomes = got.gaps, got.tokens, got.outcomes
    started = threading.Barrier(1 + len(regexes))

    def stream() -> None:
        with Client(address, timeout=900) as client:
            started.wait()
            last = time.perf_counter()
            for chunk in client.stream(prompt, max_new_tokens=stream_tokens, temperature=0.0):
                now = time.perf_counter()
                if chunk.token_ids:
                    gaps.extend([now - last] + [0.0] * (len(chunk.token_ids) - 1))
                    tokens.extend(chunk.token_ids)
                last = now

    def heavy(regex: str) -> None:
        with Client(address, timeout=900) as client:
            started.wait()
            try:
                client.generate(
                    "a a a", max_new_tokens=stream_tokens, structured_output=Regex(regex)
                )
                outcomes.append("OK")
            except lmserve.LmserveError as err:
                outcomes.append(type(err).__name__)

    threads = [threading.Thread(target=stream)]
    threads += [threading.Thread(target=heavy, args=(r,)) for r in regexes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return got


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stream-tokens", type=int, default=48)
    parser.add_argument("--flags", default="", help="more `lmserve serve` flags")
    parser.add_argument("--json", default="bench-results/grammar_hostile.json")
    args = parser.parse_args(argv)
    setup = Setup(model=args.model, device=args.device)
    prompt = " ".join(random.Random(5).choices(WORDS, k=48))
    flags = ["--scheduler", "continuous", "--kv-cache-tokens", "8192", *args.flags.split()]
    results: dict[str, list[Leg]] = {"alone": [], "heavy": []}
    with daemon(setup, *flags) as address:
        leg(address, prompt, 4, [])  # warm
        for round_ in range(args.rounds):
            legs = [("alone", []), ("heavy", heavy_regexes(round_))]
            for name, regexes in legs if round_ % 2 == 0 else legs[::-1]:
                wait_for_quiet()
                got = leg(address, prompt, args.stream_tokens, regexes)
                results[name].append(got)
                print(
                    f"round {round_ + 1} {name:>5}: stream inter-token p50 {got.p50_ms:6.1f} ms "
                    f"over {len(got.gaps) - 1} gaps; heavy requests: "
                    f"{dict(Counter(got.outcomes)) or '-'}",
                    flush=True,
                )
    pairs = list(zip(results["heavy"], results["alone"], strict=True))
    ratios = [h.p50_ms / a.p50_ms for h, a in pairs]
    same = all(h.tokens == a.tokens for h, a in pairs)
    print(
        f"stream's inter-token p50, with 8 heavy-regex requests / alone: median "
        f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)}); "
        f"the stream's tokens the same in both legs: {same}",
        flush=True,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    rounds = {name: [asdict(x) for x in legs] for name, legs in results.items()}
    Path(args.json).write_text(json.dumps({"rounds": rounds, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
