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
    assert experiments == {"perturbation", "set", "spa"}
    assert {r["method"] for r in summary["set_best"]} == {"esi", "random", "bottom", "full"}
    for row in summary["aggregate"]:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (row, key)
    assert summary["location"]["dense"]["by_component"]
    assert len(summary["claims"]) == 3
    table = (out / "RESULTS.md").read_text()
    for heading in ("1. Perturbation", "2. Where the ESI top-1% lives", "3. SET", "4. SPA", "Claims"):
        assert heading in table
    assert "nan" not in table.lower()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(0.0 <= r["asr"] <= 1.0 for r in runs if r.get("asr") is not None)
