"""The GPU check, as legs that each fit one short call on a lent GPU: every way to serve
the same model, side by side.

    python benchmarks/gpu.py --model models/gpt2-random --leg smoke        # ~1 min: first
    python benchmarks/gpu.py --model models/gpt2-random --leg continuous   # then these,
    python benchmarks/gpu.py --model models/gpt2-random --leg peer         # each < 3 min
    python benchmarks/gpu.py --model models/gpt2-random --leg compiled     # on an H100
    python benchmarks/gpu.py --model models/gpt2-random --leg steps
    python benchmarks/gpu.py --model DIR --device cpu --quick              # every leg: CPU smoke

A machine lent for minutes can stop answering mid-call, and a call returns its files only
when it ends: so each leg is its own call, writes its own file (``--out``, by default
``bench-results/gpu-<leg>.json``) after every figure, and the most important runs first.
BENCHMARKS.md has the exact commands (wheels, model, legs) for the device tool.

The legs (``--leg``; none: all of them, in this order):

- *smoke*: the model loaded in process, its decode steps captured (CUDA graphs; a CPU
  replays the captured closure instead), one request, then four together: load and capture
  times, the first request's latency, graph replays (must be > 0 on CUDA), greedy tokens
  alone == together;

- *continuous*, *steps*, *generate*: lmserve ``--scheduler continuous``, ``--scheduler
  static --static-engine steps`` (CUDA's default: batches through the continuous runner's
  captured steps) and ``--static-engine generate`` (transformers' generate per batch), each
  on a *cold* uniform load (the first after SERVING) then *single*, *uniform*, *mixed*,
  *sampled* and *shared* loads, the GPU memory its process holds at the end, and greedy
  batch invariance (of 16 prompts, how many get the same tokens together as alone), stream
  == unary, seeded sampling repeatable in company;
- *peer*: ``transformers serve --continuous-batching`` on the same loads (when installed);
- *eager*, *compiled*: transformers' own ``generate`` in process, eager and with the static
  cache (``cache_implementation="static"``: transformers compiles the decode step, CUDA
  graphs; on a GPU only), at batch 1 (the *single* load's ceiling) and batch ``--clients``
  (the *uniform* load's).

Ratios between legs (``targets``) are computed from the files of the legs run so far.

Loads (the GPU issue's): *single* = 8 requests one after another, a 48-word prompt, 64 new
tokens; *uniform* = 256 such requests from 64 clients in a closed loop (more, when a run
would last under 10 s); *mixed* = 256 requests, 3-150-word prompts, 4-96 new tokens, 64
clients; *sampled* = the mixed requests with temperature 0.8, top-p 0.95 and a seed each;
*shared* = 256 requests, each the same 510-token system prompt and a question of its own, 16
new tokens, 64 clients (the prefix cache's load: ``peer.shared_specs``).
``--quick`` shrinks every count for a CPU smoke test. On a GPU host without a
registry, ``benchmarks/gpu_host_wheels.sh --peer`` fetches what this needs into ``.whl``
(its header says how to install them there); build the model there with
``make-test-model ... --size gpt2``.
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


def smoke(setup: Setup, loads: Loads, results: Results) -> None:
    """The engine alone, in process: load, capture the decode steps, one request, then four
    together against each alone. The first thing to run on a lent GPU."""
    import torch

    from lmserve_server.config import EngineConfig
    from lmserve_server.engine.model import Engine
    from lmserve_server.engine.runner import CudaGraphCapture, rerun_capture
    from lmserve_server.engine.types import GenerationRequest
    from lmserve_server.scheduling.steps import (
        StepSettings,
        capacity,
        planner,
        prepare_runner,
        run_to_end,
    )

    name = "smoke"
    cuda = setup.device.startswith("cuda")
    started = time.perf_counter()
    engine = Engine.load(EngineConfig(model=setup.model, device=setup.device))
    results.put(name, "load_s", round(time.perf_counter() - started, 2))
    rows = 8
    settings = StepSettings(
        rows=rows,
        kv_tokens=capacity(engine, rows, rows * 1024, 0.5, 0.03),
        max_step_tokens=256,
        step_graphs=CudaGraphCapture() if cuda else rerun_capture,
        warm_up=True,
    )
    started = time.perf_counter()
    runner = prepare_runner(engine, settings)
    results.put(name, "capture_and_warm_up_s", round(time.perf_counter() - started, 2))

    def generate(prompts: Sequence[str]) -> list[tuple[int, ...]]:
        requests = [
            GenerationRequest(prompt_ids=tuple(engine.tokenize(p)), max_new_tokens=16)
            for p in prompts
        ]
        outputs = run_to_end(runner, planner(settings), [engine.new_row(r) for r in requests])
        tokens = []
        for output in outputs:
            if isinstance(output, Exception):
                raise output
            tokens.append(output.token_ids)
        return tokens

    prompts = [s.prompt for s in uniform_specs(loads, 4)]
    replays = runner.graph_replays
    started = time.perf_counter()
    generate(prompts[:1])
    results.put(name, "first_request_s", round(time.perf_counter() - started, 3))
    results.put(name, "graph_replays", runner.graph_replays - replays)
    together = generate(prompts)
    alone = [generate([p])[0] for p in prompts]
    same = sum(t == a for t, a in zip(together, alone, strict=True))
    results.put(name, "greedy_alone_equals_together", f"{same}/{len(prompts)}")
    if cuda:
        results.put(name, "peak_memory_mb", round(torch.cuda.max_memory_allocated() / 2**20))


def served_leg(setup: Setup, loads: Loads, results: Results, leg: str) -> None:
    """One lmserve mode as a daemon: its loads, correctness and GPU memory."""
    flags = SERVED_LEGS[leg]
    name = f"lmserve {flags[1]}" + (f" {flags[3]}" if len(flags) > 3 else "")
    started = time.perf_counter()
    with daemon(setup, *flags) as address:
        results.put(name, "start_to_serving_s", time.perf_counter() - started)
        served(name, measure_lmserve(address), loads, results)
        results.put(name, "correctness", correctness(address, loads))
        pid = _pid_listening(address)
        results.put(name, "gpu_memory_mb", pid and process_memory_mb(pid))


SERVED_LEGS = {
    "continuous": ("--scheduler", "continuous"),
    "steps": ("--scheduler", "static", "--static-engine", "steps"),  # CUDA's default
    "generate": ("--scheduler", "static", "--static-engine", "generate"),
}


def peer_leg(setup: Setup, loads: Loads, results: Results) -> None:
    try:
        import fastapi  # noqa: F401  (transformers serve needs its [serving] extra)
    except ImportError:
        results.put("transformers serve CB", "skipped", "pip install 'transformers[serving]'")
        return
    with peer_server(setup) as url:
        served("transformers serve CB", measure_peer(url, setup.model), loads, results)


# Most important first: a lease that ends early has measured what matters most.
LEGS = ("smoke", "continuous", "peer", "compiled", "steps", "generate", "eager")


def run_leg(leg: str, setup: Setup, loads: Loads, results: Results) -> None:
    if leg == "smoke":
        smoke(setup, loads, results)
    elif leg in SERVED_LEGS:
        served_leg(setup, loads, results, leg)
    elif leg == "peer":
        peer_leg(setup, loads, results)
    elif leg == "eager":
        in_process(setup, loads, results, compiled=False)
    elif leg == "compiled":
        # The static cache is compiled: minutes on a CPU, so only where it is the ceiling.
        if setup.device.startswith("cuda"):
            in_process(setup, loads, results, compiled=True)
        else:
            results.put("generate, static cache", "skipped", "compiled on a GPU only")


def summary(figures: dict[str, Any], results: Results, loads: Loads) -> None:
    """The issue's targets, as ratios between the legs' figures (``figures``: every leg's
    sections merged)."""
    d = figures
    ceiling = {k: v for k, v in d.get("generate, static cache", {}).items() if k != "skipped"}
    eager = d.get("generate, eager", {})
    best = ceiling or eager
    peer = d.get("transformers serve CB", {})
    for mode in ("lmserve static steps", "lmserve static generate", "lmserve continuous"):
        modes = d.get(mode, {})
        if not modes:
            continue
        batch = f"batch {loads.clients}"
        if best.get(batch) and modes.get("uniform"):
            ratio = modes["uniform"]["tokens_per_s"] / best[batch]["tokens_per_s"]
            results.put("targets", f"{mode}: uniform / ceiling", round(ratio, 3))
        if best.get("batch 1") and modes.get("single"):
            ratio = modes["single"]["tokens_per_s"] / best["batch 1"]["tokens_per_s"]
            results.put("targets", f"{mode}: single / ceiling", round(ratio, 3))
        for load_name in ("mixed", "sampled", "shared"):
            if peer.get(load_name) and modes.get(load_name):
                tok = modes[load_name]["tokens_per_s"] / peer[load_name]["tokens_per_s"]
                p99 = modes[load_name]["p99_ms"] / peer[load_name]["p99_ms"]
                results.put("targets", f"{mode}: {load_name} / peer", round(tok, 2))
                results.put("targets", f"{mode}: {load_name} p99 / peer", round(p99, 2))
    results.put("targets", "ceiling", "static cache" if ceiling else "eager (no static cache)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke test")
    parser.add_argument(
        "--leg", action="append", choices=LEGS, help="the leg to run (repeatable; default all)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=Path("bench-results"),
        help="each leg writes gpu-<leg>.json here, the ratios gpu-targets.json",
    )  # fmt: skip
    parser.add_argument(
        "--summarize", action="store_true",
        help="run no leg: compute gpu-targets.json from the legs' files in --out-dir",
    )  # fmt: skip
    args = parser.parse_args(argv)
    loads = Loads.quick() if args.quick else Loads()
    setup = Setup(
        model=args.model, device=args.device, daemon_flags=("--max-batch-size", str(loads.clients))
    )
    for leg in [leg for leg in LEGS if leg in (args.leg or LEGS) and not args.summarize]:
        results = Results(args.out_dir / f"gpu-{leg}.json")
        results.put("run", "device", _device_name(args.device))
        results.put("run", "loads", loads.__dict__)
        started = time.perf_counter()
        run_leg(leg, setup, loads, results)
        results.put("run", "leg_seconds", round(time.perf_counter() - started, 1))
    figures: dict[str, Any] = {}
    for path in sorted(args.out_dir.glob("gpu-*.json")):
        if path.name != "gpu-targets.json":
            figures.update({k: v for k, v in json.loads(path.read_text()).items() if k != "run"})
    summary(figures, Results(args.out_dir / "gpu-targets.json"), loads)
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
