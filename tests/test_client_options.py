"""The request options from the client's side: the CLI's flags and the load tester's JSONL
lines reach a real daemon and come back (logprobs in the JSON output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmserve import Client
from lmserve.bench_workload import load_prompts_file
from lmserve.cli import main
from tests.conftest import RunningDaemon
from tests.test_bench import bench, check_ok


def test_cli_generate_with_token_ids_and_every_option(
    daemon: RunningDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "generate", "--token-ids", "15496,2159", "--target", daemon.address, "--json",
        "--max-new-tokens", "6", "--logprobs", "2", "--logit-bias", "11=0.5",
        "--logit-bias", "13=-1", "--min-new-tokens", "2", "--repetition-penalty", "1.2",
        "--presence-penalty", "0.1", "--frequency-penalty", "0.2", "--stop-token-id", "50000",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    with Client(daemon.address) as client:
        direct = client.generate(
            [15496, 2159],
            max_new_tokens=6,
            logprobs=2,
            logit_bias={11: 0.5, 13: -1.0},
            min_new_tokens=2,
            repetition_penalty=1.2,
            presence_penalty=0.1,
            frequency_penalty=0.2,
            stop_token_ids=[50000],
        )
    assert printed["token_ids"] == list(direct.token_ids)
    assert printed["prompt_tokens"] == 2
    assert [lp["token_id"] for lp in printed["logprobs"]] == list(direct.token_ids)
    assert all(len(lp["top"]) == 2 for lp in printed["logprobs"])


def test_cli_generate_needs_a_prompt_or_token_ids(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--target", "127.0.0.1:1"]) == 2
    assert "PROMPT or --token-ids" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--logit-bias", "11"])  # not ID=BIAS


def test_jsonl_lines_may_carry_any_option(tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "Hi", "logprobs": 2, "logit_bias": {"50256": -100}, "stop": ["x"]}\n'
        '{"prompt_token_ids": [15496, 2159], "max_new_tokens": 4, "min_new_tokens": 2}\n'
    )
    first, second = load_prompts_file(jsonl, 9).specs
    assert first.generate_options() == {
        "max_new_tokens": 9,
        "logit_bias": {50256: -100.0},
        "logprobs": 2,
        "stop": ("x",),
    }
    assert second.prompt == (15496, 2159)
    assert second.generate_options() == {"max_new_tokens": 4, "min_new_tokens": 2}
    for bad, message in (
        ('{"prompt": "Hi", "temprature": 1}', "unknown field"),
        ('{"prompt": "Hi", "prompt_token_ids": [1]}', "without 'prompt'"),
        ('{"prompt_token_ids": ["a"]}', "list of token ids"),
        ('{"prompt": "Hi", "logit_bias": {"x": 1}}', "logit_bias"),
    ):
        jsonl.write_text(bad + "\n")
        with pytest.raises(ValueError, match=message):
            load_prompts_file(jsonl, 9)


def test_bench_sends_each_line_s_options(daemon: RunningDaemon, tmp_path: Path) -> None:
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(
        '{"prompt": "Hello", "max_new_tokens": 6, "logit_bias": {"50256": 100}, '
        '"min_new_tokens": 3}\n'
        '{"prompt_token_ids": [464, 2003], "max_new_tokens": 5, "repetition_penalty": 1.3}\n'
    )
    code, report, _ = bench(
        tmp_path, "--target", daemon.address, "--prompts-file", str(jsonl), "--requests", "4",
        "--concurrency", "2",
    )  # fmt: skip
    assert code == 0
    check_ok(report, 4)
    # The first line ends at its forced EOS after exactly 3 tokens; the second runs to 5.
    assert report["generated_tokens"] == 2 * 3 + 2 * 5
