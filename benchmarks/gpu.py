"""The whole GPU check in one run: every way to serve the same model, side by side.

    python benchmarks/gpu.py --model models/gpt2-random                  # one H100/H200, ~6 min
    python benchmarks/gpu.py --model DIR --device cpu --quick            # the smoke test

Legs, each writing its figures to ``--out`` (JSON) as soon as it has them, so a run cut
short still leaves what it measured:

- in process, transformers' own ``generate``: eager, and with the static cache
  (``cache_implementation="static"``: transformers compiles the decode step, CUDA graphs),
  at batch 1 (the *single* load's ceiling) and batch ``--clients`` (the *uniform* load's);
- lmserve ``--scheduler static --static-engine steps`` (CUDA's default: batches through
  the continuous runner's captured steps), ``--scheduler static --static-engine generate``
  (transformers' generate per batch), ``--scheduler continuous``, and
  ``transformers serve --continuous-batching`` (the peer, when installed): each on a *cold*
  uniform load (the first after SERVING) then *single*, *uniform*, *mixed*, *sampled* and
  *shared* loads, and the GPU memory its process holds at the end;
- for both lmserve modes: greedy batch invariance (of 16 prompts, how many get the same
  tokens sent together as alone), stream == unary, seeded sampling repeatable in company.

Loads (the GPU issue's): *single* = 8 requests one after another, a 48-word prompt, 64 new
tokens; *uniform* = 256 such requests from 64 clients in a closed loop (more, when a run
would last under 10 s); *mixed* = 256 requests, 3-150-word prompts, 4-96 new tokens, 64
clients; *sampled* = the mixed requests with temperature 0.8, top-p 0.95 and a seed each;
*shared* = 256 requests, each the same 510-token system prompt and a question of its own, 16
new tokens, 64 clients (the prefix cache's load: ``peer.shared_specs``).
``--quick`` shrinks every count for a CPU smoke test. On a GPU host without a
registry, ``benchmarks/gpu_host_wheels.sh --peer`` fetches what this needs into ``.whl``
(``../shared/gpu-host/wheels.sh``, whose header says how to install them, and llguidance);
build the model there with ``make-test-model ... --size gpt2``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Setup, daemon, headline, load
from peer import SAMPLING, WORDS, measure_peer, peer_server, shared_specs

from lmserve import Client
from lmserve.bench_workload import RequestSpec


@dataclass(frozen=True)
class Loads:
    """The counts of one run; ``--quick`` makes them small."""

    clients: int = 64
    single_requests: int = 8
    uniform_requests: int = 256
    mixed_requests: int = 256
    new_tokens: int = 64
    min_seconds: float = 10.0  # a uniform run shorter than this is repeated larger

    @classmethod
    def quick(cls) -> Loads:
        return cls(clients=4, single_requests=2, uniform_requests=8, mixed_requests=8,
                   new_tokens=8, min_seconds=0.0)  # fmt: skip


def single_specs(loads: Loads) -> list[RequestSpec]:
    rng = random.Random(1)
    prompt = " ".join(rng.choices(WORDS, k=48))
    return [RequestSpec(prompt, loads.new_tokens)] * loads.single_requests


def uniform_specs(loads: Loads, count: int | None = None) -> list[RequestSpec]:
    rng = random.Random(2)
    return [
        RequestSpec(" ".join(rng.choices(WORDS, k=48)), loads.new_tokens)
        for _ in range(count or loads.uniform_requests)
    ]


def mixed_specs(loads: Loads) -> list[RequestSpec]:
    rng = random.Random(3)
    top = 96 if loads.new_tokens >= 64 else loads.new_tokens
    return [
        RequestSpec(" ".join(rng.choices(WORDS, k=rng.randint(3, 150))), rng.randint(4, top))
        for _ in range(loads.mixed_requests)
    ]


def sampled_specs(loads: Loads) -> list[RequestSpec]:
    """The mixed requests, sampled as most traffic is (``peer.SAMPLING``, a seed each)."""
    return [
        RequestSpec(s.prompt, s.max_new_tokens, (*SAMPLING.items(), ("seed", i)))
        for i, s in enumerate(mixed_specs(loads))
    ]


class Results:
    """The run's figures, written to ``path`` after every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        path.parent.mkdir(parents=True, exist_ok=True)

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, default=str))
        print(f"{section:>22} {key:<22} {_short(value)}", flush=True)


def _short(value: Any) -> str:
    if isinstance(value, dict) and "p99_ms" in value:
        return (
            f"{value['tokens_per_s']:9.1f} tok/s  p50 {value['p50_ms']:8.0f} ms  "
            f"p99 {value['p99_ms']:8.0f} ms"
        )
    if isinstance(value, dict) and "tokens_per_s" in value:
        return f"{value['tokens_per_s']:9.1f} tok/s  (first call {value['first_call_s']:.1f} s)"
    return json.dumps(value, default=str)


# ---- in process: transformers' own generate ----------------------------------------------


def in_process(setup: Setup, loads: Loads, results: Results, *, compiled: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = "generate, static cache" if compiled else "generate, eager"
    dtype = torch.float16 if setup.device.startswith("cuda") else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(setup.model, padding_side="left")
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(setup.model, dtype=dtype).to(setup.device)
    model.eval()
    extra: dict[str, Any] = {"cache_implementation": "static"} if compiled else {}

    def run(prompts: Sequence[str]) -> float:
        batch = tokenizer(list(prompts), return_tensors="pt", padding=True).to(setup.device)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=loads.new_tokens,
                min_new_tokens=loads.new_tokens,  # every row makes them all: tok/s is exact
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
                **extra,
            )
        if setup.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        generated = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        return generated / seconds

    prompts = [s.prompt for s in uniform_specs(loads, loads.clients)]
    for label, batch in (("batch 1", prompts[:1]), (f"batch {loads.clients}", prompts)):
        started = time.perf_counter()
        run(batch)  # the first call of a shape: compiles under the static cache
        first_s = time.perf_counter() - started
        rates = [run(batch) for _ in range(2)]
        results.put(name, label, {"tokens_per_s": max(rates), "first_call_s": first_s})
    if setup.device.startswith("cuda"):
        results.put(name, "peak_memory_mb", torch.cuda.max_memory_allocated() / 2**20)
    if setup.device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- served: lmserve's two modes and the peer ---------------------------------------------


def served(
    name: str, measure: Callable[[Sequence[RequestSpec], int], dict[str, float]], loads: Loads,
    results: Results,
) -> None:  # fmt: skip
    cold = measure(uniform_specs(loads), loads.clients)  # the first full load after SERVING
    results.put(name, "uniform, cold", cold)
    results.put(name, "single", measure(single_specs(loads), 1))
    uniform = measure(uniform_specs(loads), loads.clients)
    if uniform["seconds"] < loads.min_seconds:  # too short to trust: more of the same
        scale = loads.min_seconds / max(uniform["seconds"], 1e-3)
        uniform = measure(uniform_specs(loads, int(loads.uniform_requests * scale)), loads.clients)
    results.put(name, "uniform", uniform)
    results.put(name, "cold / steady", cold["tokens_per_s"] / uniform["tokens_per_s"])
    results.put(name, "mixed", measure(mixed_specs(loads), loads.clients))
    results.put(name, "sampled", measure(sampled_specs(loads), loads.clients))
    shared = shared_specs(loads.mixed_requests, new_tokens=min(16, loads.new_tokens))
    results.put(name, "shared", measure(shared, loads.clients))


def measure_lmserve(address: str) -> Callable[[Sequence[RequestSpec], int], dict[str, float]]:
    def run(specs: Sequence[RequestSpec], clients: int) -> dict[str, float]:
        return headline(load(address, specs, requests=len(specs), concurrency=clients).report)

    return run


def correctness(address: str, loads: Loads) -> dict[str, Any]:
    """Greedy batch invariance, stream == unary and seeded sampling, over real gRPC."""
    prompts = [s.prompt for s in uniform_specs(loads, 16)]
    n = loads.new_tokens
    with Client(address, timeout=600) as client:
        alone = [client.generate(p, max_new_tokens=n).token_ids for p in prompts]
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(lambda p: client.generate(p, max_new_tokens=n), prompts))
            streams = list(pool.map(lambda p: list(client.stream(p, max_new_tokens=n)), prompts))
            seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 7}
            first = client.generate(prompts[0], max_new_tokens=n, **seeded).token_ids
            company = [pool.submit(client.generate, p, max_new_tokens=n) for p in prompts[1:8]]
            again = client.generate(prompts[0], max_new_tokens=n, **seeded).token_ids
            for f in company:
                f.result()
    streamed = [tuple(t for c in chunks for t in c.token_ids) for chunks in streams]
    invariant = sum(t.token_ids == a for t, a in zip(together, alone, strict=True))
    stream_ok = sum(s == t.token_ids for s, t in zip(streamed, together, strict=True))
    return {
        "greedy_batch_invariant": f"{invariant}/16",
        "max_batch_size_seen": max(r.batch_size for r in together),
        "stream_equals_unary": f"{stream_ok}/16",
        "seeded_sample_repeats": first == again,
    }


def process_memory_mb(pid: int) -> float | None:
    """The GPU memory ``pid`` holds (nvidia-smi), or None without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    used = [float(m) for p, m in (line.split(",") for line in out.splitlines() if "," in line)
            if int(p) == pid]  # fmt: skip
    return sum(used) if used else None


def summary(results: Results, loads: Loads) -> None:
    """The issue's targets, as ratios measured in this run."""
    d = results.data
    ceiling = d.get("generate, static cache", {})
    eager = d.get("generate, eager", {})
    best = ceiling or eager
    peer = d.get("transformers serve CB", {})
    for mode in ("lmserve static", "lmserve static generate", "lmserve continuous"):
        figures = d.get(mode, {})
        if not figures:
            continue
        batch = f"batch {loads.clients}"
        if best.get(batch) and figures.get("uniform"):
            ratio = figures["uniform"]["tokens_per_s"] / best[batch]["tokens_per_s"]
            results.put("targets", f"{mode}: uniform / ceiling", round(ratio, 3))
        if best.get("batch 1") and figures.get("single"):
            ratio = figures["single"]["tokens_per_s"] / best["batch 1"]["tokens_per_s"]
            results.put("targets", f"{mode}: single / ceiling", round(ratio, 3))
        for load_name in ("mixed", "sampled", "shared"):
            if peer.get(load_name) and figures.get(load_name):
                tok = figures[load_name]["tokens_per_s"] / peer[load_name]["tokens_per_s"]
                p99 = figures[load_name]["p99_ms"] / peer[load_name]["p99_ms"]
                results.put("targets", f"{mode}: {load_name} / peer", round(tok, 2))
                results.put("targets", f"{mode}: {load_name} p99 / peer", round(p99, 2))
    results.put("targets", "ceiling", "static cache" if ceiling else "eager (no static cache)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument("--out", default="bench-results/gpu.json")
    parser.add_argument("--skip", default="", help="comma-separated legs to leave out: eager, "
                        "static-cache, static, static-generate, continuous, peer")  # fmt: skip
    args = parser.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    loads = Loads.quick() if args.quick else Loads()
    results = Results(Path(args.out))
    results.put("run", "device", _device_name(args.device))
    results.put("run", "loads", loads.__dict__)
    setup = Setup(
        model=args.model, device=args.device, daemon_flags=("--max-batch-size", str(loads.clients))
    )
    if "eager" not in skip:
        in_process(setup, loads, results, compiled=False)
    # The static cache is compiled: minutes on a CPU, so only where it is the ceiling.
    if "static-cache" not in skip and args.device.startswith("cuda"):
        in_process(setup, loads, results, compiled=True)
    modes = {
        "static": ("--scheduler", "static", "--static-engine", "steps"),  # CUDA's default
        "static-generate": ("--scheduler", "static", "--static-engine", "generate"),
        "continuous": ("--scheduler", "continuous"),
    }
    for mode, flags in modes.items():
        if mode in skip:
            continue
        name = f"lmserve {mode.replace('-', ' ')}"
        started = time.perf_counter()
        with daemon(setup, *flags) as address:
            results.put(name, "start_to_serving_s", time.perf_counter() - started)
            served(name, measure_lmserve(address), loads, results)
            results.put(name, "correctness", correctness(address, loads))
            pid = _pid_listening(address)
            results.put(name, "gpu_memory_mb", pid and process_memory_mb(pid))
    if "peer" not in skip:
        try:
            import fastapi  # noqa: F401  (transformers serve needs its [serving] extra)
        except ImportError:
            results.put("transformers serve CB", "skipped", "pip install 'transformers[serving]'")
        else:
            with peer_server(setup) as url:
                served("transformers serve CB", measure_peer(url, setup.model), loads, results)
    summary(results, loads)
    return 0


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _pid_listening(address: str) -> int | None:
    """The pid of the process listening on ``address``'s port (the daemon just started)."""
    port = address.rsplit(":", 1)[1]
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True,
                         check=False).stdout  # fmt: skip
    for part in out.split("pid=")[1:]:
        return int(part.split(",")[0])
    return None


if __name__ == "__main__":
    sys.exit(main())
