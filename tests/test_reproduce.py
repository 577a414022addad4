"""The reproduce driver's --quick path end to end (on the seconds-size organisms): every output file,
the table's structure, and every number finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_reproduce_quick_writes_a_complete_finite_table(tmp_path, tiny_dense_aligned):
    out = tmp_path / "reproduce"
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--quick", "--organism-preset", "tiny", "--n-eval", "6",
         "--set-steps", "3", "--spa-steps", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("results.json", "results.csv", "summary.json", "RESULTS.md", "perturbation.png", "set.png", "spa.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    experiments = {r["experiment"] for r in summary["aggregate"]}
    assert experiments == {"perturbation", "set", "set_validation", "spa"}
    assert {r["method"] for r in summary["set_best"]} == {"esi", "random", "bottom", "full"}
    # SET settings are chosen on the validation prompts: the one reported per method is the sweep's
    # lowest validation ASR among the settings whose validation over-refusal is within budget.
    runs = json.loads((out / "results.json").read_text())["runs"]
    sweep = [r for r in runs if r["experiment"] == "set_validation"]
    limit = next(r for r in sweep if r["method"] == "before")["over_refusal"] + summary["settings"]["set_over_refusal_budget"]
    for row in summary["set_best"]:
        cands = [r for r in sweep if r["method"] == row["method"]]
        ok = [r for r in cands if r["over_refusal"] <= limit]
        want = min(ok, key=lambda r: (r["asr"], r["over_refusal"])) if ok else \
            min(cands, key=lambda r: (r["over_refusal"], r["asr"]))  # none within budget: helpfulness first
        assert row["setting"] == want["setting"]
        assert {r["setting"] for r in runs if r["experiment"] == "set" and r["method"] == row["method"]} == {row["setting"]}
    for row in summary["aggregate"]:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (row, key)
    assert summary["location"]["dense"]["by_component"]
    assert len(summary["claims"]) == 3
    table = (out / "RESULTS.md").read_text()
    for heading in ("1. Perturbation", "2. Where the ESI top-1% lives", "3. SET", "3a. SET sweep on the validation",
                    "4. SPA", "Claims"):
        assert heading in table
    assert "nan" not in table.lower()
    assert all(0.0 <= r["asr"] <= 1.0 for r in runs if r.get("asr") is not None)
