"""`topk-ds demo` end to end on a small budget: every stage through the real commands (two
DeepSpeed CPU ranks per model), the report, reuse of finished stages, and refusing other settings."""

import json

import pytest

from conftest import run_cli
from test_eval import assert_clean_failure

STEPS = 40
ARGS = ["--docs", 400, "--steps", STEPS, "--stats-tokens", 16_000, "--eval-limit", 20, "--samples", 2]


@pytest.mark.slow
def test_demo_runs_every_stage_then_reuses_them(tmp_path):
    out = tmp_path / "demo"
    first = run_cli("demo", "--out", out, *ARGS, timeout=1500)
    assert first.stdout.strip().splitlines()[-1] == (f"wrote the demo's report to {out / 'report.md'} "
                                                     f"(neuron browser: {out / 'site' / 'index.html'})")
    report = (out / "report.md").read_text()
    for heading in ("## Table 1", "## Figure 3", "## Concept neurons", "## Steering", "## TopK LM vs SAE", "## Figure 5",
                    "## Stages"):
        assert heading in report
    compare = json.loads((out / "compare" / "compare.json").read_text())
    assert [c["kind"] for c in compare["contenders"]] == ["topk", "dense", "sae"]
    assert "| | TopK LM | dense | SAE 1x |" in report and "| topics recovered" in report
    for name in ("dense", "topk"):
        records = [json.loads(line) for line in (out / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))
        assert records[-1]["tokens"] == STEPS * 2 * 8 * 128  # two ranks x micro-batch 8 x 128 tokens
        assert "2 ranks" in (out / "runs" / name / "train.log").read_text()
        assert json.loads((out / "hf" / name / "config.json").read_text())["topk_enabled"] == (name == "topk")
        assert f"| {name} | {STEPS} | 1" in report  # the training row of Table 1
    table = (out / "eval" / "table.md").read_text()
    assert "| dense | 40 | 128 | 4 | ✗ |" in table and "| topk | 40 | 128 | 4 | ✓ k=16 |" in table
    assert (out / "entropy.png").read_bytes()[:4] == b"\x89PNG" and (out / "site" / "index.html").is_file()
    site = [p.stat().st_size for p in (out / "site").rglob("*") if p.is_file()]  # the browser's page weight
    assert sum(site) < 20_000_000 and max(p.stat().st_size for p in (out / "site" / "neurons").iterdir()) < 200_000
    steering = list((out / "stats" / "topk" / "steering").glob("*.json"))
    assert len(steering) == 1
    result = json.loads(steering[0].read_text())
    assert [r["offset"] for r in result["offsets"]][0] == 0 and len(result["offsets"]) == 4 and result["topic"]
    assert f"![trace](trace/trace-{steering[0].stem.split('_')[1]}-" in report
    assert "$ topk-ds analyze stats" in first.stdout and "$ deepspeed --num_gpus 2" in first.stdout

    again = run_cli("demo", "--out", out, *ARGS)
    assert again.stdout.count(": reusing ") == 16 and "$ " not in again.stdout
    assert (out / "report.md").read_text().count("| reused |") == 16

    refused = run_cli("demo", "--out", out, *ARGS[:-2], "--samples", 3, check=False)
    assert_clean_failure(refused, "other settings", "samples=2 (now 3)")
