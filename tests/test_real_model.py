"""The real default model, SmolLM2-135M-Instruct (a Q4_1 GGUF file), served as ``lmserve
serve --model FILE.gguf`` serves it, under both schedulers, with answers that are checked:
greedy tokens equal transformers' own ``generate`` on the same weights (saved as a
safetensors folder), chat answers end at the end of the turn, JSON-schema rows close and
validate, stop strings cut real text, streams equal unary calls.

Lean on purpose (one engine for the session, one daemon per scheduler, short answers): a
135M model on two CPU cores is about 20 tokens a second per row.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch

from lmserve import ChatMessage, Client, FinishReason, GenerationResult, JsonSchema
from lmserve_server.config import EngineConfig, ServerConfig
from lmserve_server.engine.model import Engine
from tests.conftest import MODELS, RunningDaemon

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"

# Six questions with short, checkable answers.
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "What is 12 plus 30?",
    "Say hello in Spanish.",
    "What is the largest planet in the solar system?",
    "Write one short sentence about cats.",
]
FRANCE = 0
MAX_NEW_TOKENS = 16
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 16},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
CALL_TIMEOUT_S = 300  # a loaded 2-core machine; well inside pytest's last resort


def chat(question: str) -> list[ChatMessage]:
    return [ChatMessage("user", question)]


@pytest.fixture(scope="session")
def smollm2_engine(smollm2_gguf: Path) -> Engine:
    """The GGUF file loaded as ``lmserve serve --model FILE.gguf`` loads it (weights packed)."""
    return Engine.load(EngineConfig(model=str(smollm2_gguf)))


@pytest.fixture(scope="session")
def converted_dir(smollm2_gguf: Path) -> Path:
    """The same weights as transformers dequantizes them, saved with save_pretrained once
    (kept in models/ beside the file: converting takes as long as loading)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = MODELS / (smollm2_gguf.stem + "-converted")
    if (target / "config.json").is_file():
        return target
    scratch = MODELS / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    source = {"pretrained_model_name_or_path": smollm2_gguf.parent, "gguf_file": smollm2_gguf.name}
    AutoTokenizer.from_pretrained(**source).save_pretrained(scratch)
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=torch.float32)
    # Its weights are plain float32 tensors already; transformers only still marks the model
    # as GGUF-quantized, and refuses to save one so marked.
    model.hf_quantizer = None
    model.save_pretrained(scratch)
    try:
        os.replace(scratch, target)
    except OSError:  # another test session converted it meanwhile
        shutil.rmtree(scratch, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


@pytest.fixture(scope="session")
def reference(converted_dir: Path) -> list[tuple[list[int], tuple[int, ...], bool]]:
    """Per question: its prompt's ids, transformers' greedy ``generate`` alone on the converted
    folder (the tokens before EOS), and whether it ended at EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    model = AutoModelForCausalLM.from_pretrained(converted_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    out = []
    for question in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        with torch.no_grad():
            generated = model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=MAX_NEW_TOKENS,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )[0, len(ids) :].tolist()
        ended = eos in generated
        out.append((ids, tuple(generated[: generated.index(eos)] if ended else generated), ended))
    return out


@pytest.fixture(scope="module", params=["static", "continuous"])
def daemon(
    request: pytest.FixtureRequest, smollm2_gguf: Path, smollm2_engine: Engine
) -> Iterator[RunningDaemon]:
    config = ServerConfig(
        engine=EngineConfig(model=str(smollm2_gguf)),
        port=0,
        scheduler=request.param,
        max_batch_size=8,
        max_wait_ms=100,  # static: the six questions sent together are batched together
        kv_cache_tokens=4096,  # continuous: 8 slots of 512 tokens, 190 MB (not 8192 each)
        warm_up=False,
    )
    running = RunningDaemon(config, smollm2_engine)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(daemon: RunningDaemon) -> Iterator[Client]:
    with Client(daemon.address, timeout=CALL_TIMEOUT_S) as c:
        yield c


def together(client: Client, calls: list[dict[str, object]]) -> list[GenerationResult]:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(lambda kw: client.generate(**kw), call) for call in calls]
        return [f.result() for f in futures]


@pytest.fixture(scope="module")
def answers(client: Client) -> list[GenerationResult]:
    """The six questions sent at once, greedy."""
    return together(
        client, [{"prompt": chat(q), "max_new_tokens": MAX_NEW_TOKENS} for q in QUESTIONS]
    )


def test_the_model_info_says_it_is_served_from_a_gguf_file(client: Client) -> None:
    info = client.model_info()
    assert (info.weights_format, info.gguf_file_type) == ("gguf", "Q4_1")
    assert (info.dtype, info.max_context, info.eos_token_id) == ("float32", 8192, 2)


def test_six_chat_prompts_together_equal_transformers_generate(
    answers: list[GenerationResult], reference: list[tuple[list[int], tuple[int, ...], bool]]
) -> None:
    """Batched with one another, from a GGUF file, through lmserve's engine: the tokens are
    transformers' own greedy ``generate`` of each prompt alone, on the converted weights."""
    assert max(a.batch_size for a in answers) > 1  # they did share forward passes
    for answer, (ids, tokens, ended) in zip(answers, reference, strict=True):
        assert answer.prompt_tokens == len(ids)
        assert answer.token_ids == tokens
        assert answer.finish_reason is (FinishReason.EOS if ended else FinishReason.LENGTH)
    assert len({a.token_ids for a in answers}) == len(QUESTIONS)


def test_a_chat_answer_ends_at_the_end_of_the_turn_and_is_right(
    answers: list[GenerationResult],
) -> None:
    france = answers[FRANCE]
    assert france.finish_reason is FinishReason.EOS
    assert france.completion_tokens < MAX_NEW_TOKENS
    assert "Paris" in france.text
    assert "<|im_end|>" not in france.text


def test_json_schema_rows_greedy_and_sampled_close_and_validate(client: Client) -> None:
    ask = chat("Invent a person and give their name, age and city as JSON.")
    schema = JsonSchema(json.dumps(PERSON))
    rows = together(
        client,
        [
            {"prompt": ask, "max_new_tokens": 64, "structured_output": schema},
            *(
                {
                    "prompt": ask,
                    "max_new_tokens": 64,
                    "structured_output": schema,
                    "temperature": 0.8,
                    "seed": seed,
                }
                for seed in (1, 2)
            ),
        ],
    )
    for row in rows:
        assert row.finish_reason is FinishReason.STOP, row
        jsonschema.validate(json.loads(row.text), PERSON)


def test_a_stop_string_cuts_the_answer_before_it(
    client: Client, answers: list[GenerationResult]
) -> None:
    full = answers[FRANCE].text
    cut = client.generate(chat(QUESTIONS[FRANCE]), max_new_tokens=MAX_NEW_TOKENS, stop=["Paris"])
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full[: full.index("Paris")]
    assert cut.text.strip()  # real text came before it


def test_a_stream_equals_the_unary_answer_greedy_and_sampled(
    client: Client, answers: list[GenerationResult]
) -> None:
    sampled: dict[str, Any] = {"temperature": 0.9, "seed": 7, "max_new_tokens": 8}
    spanish = chat(QUESTIONS[3])
    cases: list[tuple[list[ChatMessage], dict[str, Any], GenerationResult]] = [
        (chat(QUESTIONS[FRANCE]), {"max_new_tokens": MAX_NEW_TOKENS}, answers[FRANCE]),
        (spanish, sampled, client.generate(spanish, **sampled)),
    ]
    for prompt, options, unary in cases:
        chunks = list(client.stream(prompt, **options))
        assert "".join(c.text for c in chunks) == unary.text
        assert tuple(t for c in chunks for t in c.token_ids) == unary.token_ids
        assert chunks[-1].finish_reason is unary.finish_reason


def test_the_converted_folder_serves_the_same_tokens_as_the_gguf_file(
    converted_dir: Path, reference: list[tuple[list[int], tuple[int, ...], bool]]
) -> None:
    """The safetensors folder the GGUF file converts to, served by lmserve as well: the same
    tokens as transformers' (which the GGUF file's daemons equal, above)."""
    config = ServerConfig(
        engine=EngineConfig(model=str(converted_dir)), port=0, max_wait_ms=100, warm_up=False
    )
    running = RunningDaemon(config, Engine.load(config.engine))
    try:
        with Client(running.address, timeout=CALL_TIMEOUT_S) as client:
            assert client.model_info().weights_format == "transformers"
            answers = together(
                client,
                [{"prompt": chat(q), "max_new_tokens": MAX_NEW_TOKENS} for q in QUESTIONS],
            )
    finally:
        running.stop()
    assert [a.token_ids for a in answers] == [tokens for _, tokens, _ in reference]


def test_the_readmes_first_steps_print_what_it_says(daemon: RunningDaemon, tmp_path: Path) -> None:
    """The README's "First steps" block, pasted against this daemon: each command prints
    the line its comment shows."""
    text = README.read_text()
    steps = text[text.index("### First steps\n") : text.index("### GGUF files served directly")]
    (block,) = re.findall(r"```bash\n(.*?)```", steps, flags=re.S)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMSERVE_")}
    env["LMSERVE_TARGET"] = daemon.address
    env["LMSERVE_TIMEOUT"] = str(CALL_TIMEOUT_S)
    proc = subprocess.run(
        ["bash", "-e", "-c", block],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT_S + 60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    shown = [line.removeprefix("# ") for line in block.splitlines() if line.startswith("# ")]
    assert shown and all(line in out for line in shown), proc.stdout
    for name, value in (("weights_format", "gguf"), ("gguf_file_type", "Q4_1")):
        assert any(re.fullmatch(rf"{name}\s+{value}", line) for line in out), proc.stdout


def test_the_load_tester_sends_chat_prompts_that_end_their_turn(daemon: RunningDaemon) -> None:
    """``lmserve-client bench --chat``: the mixed workload's prompts as user messages."""
    command = [sys.executable, "-m", "lmserve.cli", "bench", "--target", daemon.address]
    command += ["--chat", "--mixed", "--prompt-tokens", "4:12", "--new-tokens", "4:8"]
    command += ["--requests", "4", "--concurrency", "4", "--warmup", "0", "--json", "-"]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=CALL_TIMEOUT_S, env=os.environ.copy()
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["requests"] == {"sent": 4, "ok": 4, "errors": 0}
    assert report["workload"]["chat"] is True
