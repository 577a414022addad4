"""The reproduce driver's --quick path end to end (on the seconds-size organisms): every output file,
the table's structure, and every number finite."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lit_safety.esi.mask import SafetyMask

REPO = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "scripts" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_options_change_only_what_they_name():
    """No option keeps the full run's and --quick's settings (the numbers of a run depend on them);
    each option sets its field, the method lists and sweeps included."""
    driver = _driver()
    assert driver.parse_settings([])[1] == driver.Settings()
    assert driver.parse_settings(["--quick"])[1] == driver.Settings.quick()
    _, s = driver.parse_settings([
        "--quick", "--seeds", "3", "4", "--set-lrs", "magnitude=0.01,0.02", "esi=0.05", "--set-methods", "magnitude",
        "esi", "--set-benign-ratios", "0.5", "--set-data", "refusals.json", "--spa-methods", "esi", "random",
        "--spa-lr", "3e-4", "--spa-ratio", "0.01", "--spa-harmful-ratio", "0.02", "--spa-response-prefix", "Sure. ",
        "--spa-weight-decay", "0", "--scope", "per_tensor", "--objective", "compliance", "--all-parameters",
        "--organisms", "dense", "--models", "aligned=my/model"])
    want = driver.Settings.quick()
    want.seeds, want.set_benign_ratios, want.set_data = [3, 4], [0.5], "refusals.json"
    want.set_lrs = {"magnitude": [0.01, 0.02], "esi": [0.05]}  # in --set-methods' order
    want.spa_methods = want.spa_methods_moe = ["esi", "random"]
    want.spa_lr, want.spa_ratio, want.spa_weight_decay = 3e-4, 0.01, 0.0
    want.spa_harmful_ratio, want.spa_response_prefix = 0.02, "Sure. "
    want.scope, want.objective, want.all_parameters = "per_tensor", "compliance", True
    want.models = {"aligned": "my/model"}
    assert s == want
    assert driver.model_name(s, "dense", "aligned", "tiny") == "my/model"
    assert driver.model_name(s, "dense", "unaligned", "tiny") == "organism-dense-unaligned:tiny"


@pytest.mark.parametrize("argv, message", [
    (["--set-methods", "magnitude"], "give their learning rates with --set-lrs"),
    (["--set-lrs", "esi=fast"], "learning rates must be numbers"),
    (["--set-lrs", "sgd=0.1"], "unknown method 'sgd'"),
    (["--models", "aligned=x"], "give one --organisms kind"),
    (["--organisms", "dense", "--models", "base=x"], "the variants are aligned"),
])
def test_bad_options_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        _driver().parse_settings(argv)
    assert message in capsys.readouterr().err


def test_set_setting_is_chosen_within_both_over_refusal_limits():
    choose = _driver().choose_set_setting
    sweep = [dict(setting="a", keyword_asr=0.05, over_refusal=0.02, borderline_over_refusal=0.40),  # borderline lost
             dict(setting="b", keyword_asr=0.20, over_refusal=0.04, borderline_over_refusal=0.08),
             dict(setting="c", keyword_asr=0.10, over_refusal=0.06, borderline_over_refusal=0.10),
             dict(setting="d", keyword_asr=0.30, over_refusal=0.00, borderline_over_refusal=0.06)]
    limits = {"over_refusal": 0.05, "borderline_over_refusal": 0.10}
    # brute force: qualifying settings, lowest keyword ASR
    ok = [r for r in sweep if all(r[k] <= v for k, v in limits.items())]
    assert [r["setting"] for r in ok] == ["b", "d"]
    assert choose(sweep, limits, "keyword_asr")["setting"] == "b"
    # harmless over-refusal alone (the organisms' validation has no borderline prompts): "a" wins
    assert choose(sweep, {"over_refusal": 0.05}, "keyword_asr")["setting"] == "a"
    # none qualifies: the one over its limits least (c: 1 point over), not the lowest ASR (a: 30 over)
    assert choose(sweep[:1] + sweep[2:3], limits, "keyword_asr")["setting"] == "c"


def test_set_claims_compare_with_random_only_when_random_ran():
    """"Beats random-1%" is claimed only from a random-1% result; a run without one states the cut
    alone and says so (never "holds" for a comparison that was not made)."""
    driver = _driver()
    s = driver.Settings(organisms=["m"])
    before = dict(experiment="set", organism="m", method="before", asr=0.40, keyword_asr=0.90)
    esi = dict(organism="m", method="esi", asr=0.10, keyword_asr=0.50)
    alone = driver.claims({"aggregate": [before], "set_best": [esi]}, s)
    assert alone == {
        "SET ESI-1% cuts ASR >= 50% (m; random-1% not run)":
            {"holds": True, "detail": "ASR 40.0 -> 10.0 (75% relative)"},
        "SET ESI-1% cuts keyword ASR >= 50% (m; random-1% not run)":
            {"holds": False, "detail": "keyword ASR 90.0 -> 50.0 (44% relative)"}}
    # a random-1% ASR of 0 is a result (it beats ESI), not a missing value
    random = dict(organism="m", method="random", asr=0.0, keyword_asr=0.60)
    both = driver.claims({"aggregate": [before], "set_best": [esi, random]}, s)
    assert both == {
        "SET ESI-1% cuts ASR >= 50% and beats random-1% (m)":
            {"holds": False, "detail": "ASR 40.0 -> 10.0 (75% relative); random 0.0"},
        "SET ESI-1% cuts keyword ASR >= 50% and beats random-1% (m)":
            {"holds": False, "detail": "keyword ASR 90.0 -> 50.0 (44% relative); random 60.0"}}


def test_set_sweeps_on_the_first_seed_and_validates_the_choice_on_every_seed(tmp_path, monkeypatch):
    """SET's sweep trains every setting on the first seed only; the setting chosen there is trained on
    every other seed, and each of those runs is measured on the validation prompts as well as the test
    prompts (fakes stand in for the model, the training and the meters)."""
    driver = _driver()
    trained = []

    class Module:
        def __init__(self, lr, seed):
            self.model, self.tokenizer, self.trainable_weights = (lr, seed), None, 7

    def train(name, intervention, method, ratio, lr, steps, seed, data, workdir, s):
        trained.append((method, lr, data.benign_ratio, seed))
        return Module(lr, seed), 1.0, 2.0

    def meter(model, tokenizer, kinds=(), *, name):  # before: (0, 0); the lower lr refuses too much
        lr, seed = model if isinstance(model, tuple) else (0.0, 0)
        return {"asr": 0.5 - 100 * lr + seed / 100, "keyword_asr": 0.9 - 100 * lr + seed / 100,
                "over_refusal": 0.2 if lr == 1e-3 else 0.01, "borderline_over_refusal": 0.0}

    monkeypatch.setattr(driver, "load_model_and_tokenizer", lambda name: ((0.0, 0), None))
    monkeypatch.setattr(driver, "RefusalDataModule", lambda **kw: type("Data", (), kw))
    monkeypatch.setattr(driver, "train", train)
    s = driver.Settings.quick()
    s.seeds, s.set_lrs, s.set_benign_ratios = [3, 4, 5], {"esi": [1e-3, 2e-3, 3e-3]}, [0.9]
    runs = driver.set_runs("dense", s, meter, meter, "tiny", tmp_path, lambda message: None)
    # 1e-3 over-refuses; of the two within budget, 3e-3 has the lower validation ASR
    assert trained == [("esi", 1e-3, 0.9, 3), ("esi", 2e-3, 0.9, 3), ("esi", 3e-3, 0.9, 3), ("esi", 3e-3, 0.9, 4),
                       ("esi", 3e-3, 0.9, 5)]
    assert [(r["experiment"], r["setting"], r["seed"]) for r in runs if r["method"] == "esi"] == [
        ("set_validation", "lr=0.001, benign=0.9", 3), ("set_validation", "lr=0.002, benign=0.9", 3),
        ("set_validation", "lr=0.003, benign=0.9", 3), ("set", "lr=0.003, benign=0.9", 3),
        ("set_validation", "lr=0.003, benign=0.9", 4), ("set", "lr=0.003, benign=0.9", 4),
        ("set_validation", "lr=0.003, benign=0.9", 5), ("set", "lr=0.003, benign=0.9", 5)]
    assert [r["asr"] for r in runs if r["experiment"] == "set_validation" and r["seed"] in (4, 5)] == \
        pytest.approx([0.2 + 0.04, 0.2 + 0.05])


def test_reproduce_quick_writes_a_complete_finite_table(tmp_path, tiny_dense_aligned):
    out = tmp_path / "reproduce"
    result = subprocess.run(
        [sys.executable, "scripts/reproduce.py", "--quick", "--organism-preset", "tiny", "--n-eval", "6",
         "--set-steps", "3", "--spa-steps", "3", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("results.json", "results.csv", "summary.json", "RESULTS.md", "perturbation.png", "set.png", "set-tradeoff.png",
                 "spa.png"):
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
    perturbation = [r for r in runs if r["experiment"] == "perturbation"]
    assert all(math.isfinite(r["benign_nll"]) and r["benign_nll"] > 0 for r in perturbation)
    for heading in ("1. Perturbation", "1b. Broken or jailbroken", "2. Where the ESI top-1% lives", "3. SET", "3a. SET sweep on the validation",
                    "4. SPA", "Claims"):
        assert heading in table
    assert "nan" not in table.lower()
    assert all(0.0 <= r["asr"] <= 1.0 for r in runs if r.get("asr") is not None)


def test_smollm2_validation_splits_are_disjoint_from_training_and_reported_data(tmp_path, synthetic_shared_data,
                                                                                monkeypatch):
    """--model smollm2 chooses SET settings on held-out circuit-breakers pairs and harmless-train
    instructions that neither SET, nor its ESI mask, nor the self answers, nor the test prompts use."""
    driver = _driver()
    refusals = [{"instruction": f"harm {i}", "input": "", "output": f"No {i}."} for i in range(2000)]
    synthetic_shared_data.write("refusals/circuit_breakers_train.json", refusals)
    synthetic_shared_data.write("instructions/harmless_instructions_train.json",
                                [{"instruction": f"help {i}", "category": "x"} for i in range(700)])
    answers = tmp_path / "samples.jsonl"
    monkeypatch.setattr(driver, "SHARED", synthetic_shared_data.root)
    monkeypatch.setattr(driver, "SMOLLM2_SELF_ANSWERS", answers)
    with pytest.raises(SystemExit, match="make them first with  lit-safety test --config configs/eval.yaml"):
        driver.parse_settings(["--model", "smollm2", "--out", str(tmp_path / "r")])
    answers.write_text("".join(json.dumps({"prompt": f"help {i}", "response": "ok"}) + "\n" for i in range(600)))
    _, s = driver.parse_settings(["--model", "smollm2", "--out", str(tmp_path / "r")])
    read = lambda path: json.loads(Path(path).read_text())
    trained = read(s.set_data)
    assert s.esi_data == s.set_data and s.set_benign_data == str(answers)
    assert trained == [r for i, r in enumerate(refusals) if i % 25]
    assert read(s.validation_suite["harmful_data"]) == [refusals[i] for i in range(0, 25 * 64, 25)]
    assert [r["instruction"] for r in read(s.validation_suite["benign_data"])] == [f"help {i}" for i in range(600, 664)]
    assert s.test_suite["harmful_data"].endswith("advbench/harmful_behaviors.csv")
    # borderline prompts: chosen on the shipped validation set, reported on the shipped test set (the
    # self answers SET trains on come from the third, builtin-train; the three share no prompt)
    assert (s.validation_suite["borderline_data"], s.test_suite["borderline_data"]) == ("builtin-val", "builtin")
    assert s.models == {"unaligned": "smollm2-135m-instruct", "aligned": "smollm2-135m-instruct-aligned"}
    assert s.set_selection_metric == "keyword_asr"
    # SPA trains on GSM8K train and is measured on GSM8K test
    assert s.spa_data.endswith("gsm8k/train.jsonl") and s.test_suite["task_data"].endswith("gsm8k/test.jsonl")
    with pytest.raises(SystemExit):
        driver.parse_settings(["--model", "smollm2", "--organisms", "dense", "--out", str(tmp_path / "r")])


def test_trained_models_are_saved_by_the_modules_export(tmp_path, tiny_dense_aligned):
    """The driver saves a trained model through SafetyInterventionModule.export (one published unit:
    model/, mask, hparams, summary with the setting), and the saved model reloads with its weights."""
    driver = _driver()
    s = driver.Settings.quick()
    data = driver.RefusalDataModule(tokenizer=str(tiny_dense_aligned), batch_size=4, max_length=64, num_samples=16)
    module, _, _ = driver.train(str(tiny_dense_aligned), "set", "esi", 0.01, 1e-3, 2, 0, data, tmp_path / "work", s)
    out = tmp_path / "models" / "set-dense-esi-seed0"
    driver.save_model(module, out, "lr=0.001, benign=0")
    assert json.loads((out / "summary.json").read_text())["setting"] == "lr=0.001, benign=0"
    manifest = json.loads((out / ".result" / "manifest.json").read_text())
    assert {name.split("/")[0] for name in manifest["files"]} == {"model", "mask.safetensors", "hparams.yaml",
                                                                  "summary.json"}
    model, _ = driver.load_model_and_tokenizer(str(out / "model"))
    saved = model.state_dict()
    assert all(torch.equal(saved[name], value) for name, value in module.model.state_dict().items())
    assert SafetyMask.load(out / "mask.safetensors").k == module.mask.k


def _set_runs(seed: int, asr: float, setting: str = "lr=0.002, benign=0.9", before_asr: float = 0.4,
              method: str = "esi") -> list[dict]:
    """One SET run's results.json rows (one method, one seed) as the driver writes them."""
    def row(experiment, method, setting_, seed_, value):
        return dict(experiment=experiment, organism="dense", method=method, setting=setting_, seed=seed_, asr=value,
                    keyword_asr=value + 0.3, over_refusal=0.02 * seed_, borderline_over_refusal=0.05,
                    seconds=10.0 + seed_)
    return [row("set", "before", "-", 0, before_asr), row("set_validation", "before", "-", 0, before_asr - 0.1),
            {**row("set_validation", method, setting, seed, asr - 0.05), "lr": 0.002, "benign": 0.9},
            row("set", method, setting, seed, asr)]


def _write_results(out: Path, runs: list[dict], seconds: float, command: str) -> Path:
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"runs": runs}))
    (out / "summary.json").write_text(json.dumps({"seconds": seconds, "location": {}}))
    (out / "RESULTS.md").write_text(f"# Results\n\nRegenerate: `{command}` (1 min on this machine)\n\ntable\n")
    return out


def test_add_seeds_merges_runs_of_other_seeds_into_one_table(tmp_path):
    """Seeds run separately (--seeds 1 --out ...) merge into one table: the per-seed rows added, the
    seed-independent 'before' rows kept once, mean and std over all seeds; bad merges are named."""
    driver = _driver()
    a = _write_results(tmp_path / "s0", _set_runs(0, 0.20), 60.0, "python scripts/reproduce.py --seeds 0")
    b = _write_results(tmp_path / "s1", _set_runs(1, 0.10), 120.0, "python scripts/reproduce.py --seeds 1")
    c = _write_results(tmp_path / "s2", _set_runs(2, 0.30), 180.0, "python scripts/reproduce.py --seeds 2")
    driver.main(["--only", "set", "--organisms", "dense", "--from-results", "--out", str(a), "--add-seeds", str(b),
                 str(c)])
    runs = json.loads((a / "results.json").read_text())["runs"]
    assert sorted((r["experiment"], r["method"], r["seed"]) for r in runs) == sorted(
        [("set", "before", 0), ("set_validation", "before", 0)]
        + [(e, "esi", seed) for e in ("set", "set_validation") for seed in (0, 1, 2)])
    summary = json.loads((a / "summary.json").read_text())
    esi = next(r for r in summary["set_best"] if r["method"] == "esi")
    assert esi["seeds"] == 3
    assert esi["asr"] == pytest.approx(0.20)  # (0.2 + 0.1 + 0.3) / 3
    assert esi["asr_std"] == pytest.approx(math.sqrt(((0.0) ** 2 + 0.1 ** 2 + 0.1 ** 2) / 3))
    assert esi["over_refusal"] == pytest.approx(0.02)  # (0 + 0.02 + 0.04) / 3
    assert summary["seconds"] == 360.0
    assert summary["validation_seeds"] == [0, 1, 2]
    table = (a / "RESULTS.md").read_text()
    assert "Seeds: 3 (mean ± std over seeds)" in table
    assert "| dense | esi | lr=0.002, benign=0.9 | 20.0 ± 8.2 | 50.0 ± 8.2 |" in table
    assert "3a. SET sweep on the validation prompts (seeds 0, 1, 2:" in table
    for seed in (0, 1, 2):  # the commands that ran stay with the merged table
        assert f"`python scripts/reproduce.py --seeds {seed}`" in table
    # the same seed twice would be averaged twice: refused, and the directory is left as it was
    before = (a / "results.json").read_text()
    with pytest.raises(SystemExit, match=re.escape(f"--add-seeds {b}: set_validation dense esi: seed 1 is already in "
                                                   "the results")):
        driver.main(["--only", "set", "--organisms", "dense", "--from-results", "--out", str(a), "--add-seeds", str(b)])
    assert (a / "results.json").read_text() == before
    with pytest.raises(ValueError, match="chose 'lr=0.003, benign=0.9', the other runs 'lr=0.002, benign=0.9'"):
        driver.add_seeds(_set_runs(0, 0.2), _set_runs(1, 0.1, setting="lr=0.003, benign=0.9"), "x")
    with pytest.raises(ValueError, match="x: set dense before: the 'before' measurement differs in asr, keyword_asr"):
        driver.add_seeds(_set_runs(0, 0.2), _set_runs(1, 0.1, before_asr=0.5), "x")
    with pytest.raises(SystemExit):
        driver.parse_settings(["--add-seeds", str(b)])  # without --from-results


def test_combine_adds_the_methods_of_a_later_run_and_replaces_its_own(tmp_path):
    """A later run of other methods (--set-methods random after an ESI-only run) adds them to the table;
    its runs of a method --out has replace them; a kept method measured against another 'before' is refused."""
    esi = _write_results(tmp_path / "esi", _set_runs(0, 0.20), 60.0, "python scripts/reproduce.py --set-methods esi")
    rand = _write_results(tmp_path / "random", _set_runs(0, 0.30, method="random"), 30.0,
                          "python scripts/reproduce.py --set-methods random")
    again = _write_results(tmp_path / "esi-again", _set_runs(0, 0.10, setting="lr=0.003, benign=0.9"), 45.0,
                           "python scripts/reproduce.py --set-methods esi --set-lrs esi=3e-3")
    other = _write_results(tmp_path / "other-model", _set_runs(0, 0.30, before_asr=0.5, method="random"), 30.0,
                           "python scripts/reproduce.py --set-methods random --models unaligned=x")

    driver = _driver()

    def combine(*later: Path) -> None:
        driver.main(["--only", "set", "--organisms", "dense", "--from-results", "--out", str(esi), "--combine",
                     *map(str, later)])

    with pytest.raises(SystemExit, match=re.escape(f"--combine {other}: set dense before: the 'before' measurement "
                                                   "differs in asr, keyword_asr")):
        combine(other)
    combine(rand, again)
    runs = json.loads((esi / "results.json").read_text())["runs"]
    assert sorted((r["experiment"], r["method"], r["setting"], r["asr"]) for r in runs) == sorted([
        ("set", "before", "-", 0.4), ("set_validation", "before", "-", 0.4 - 0.1),
        ("set", "esi", "lr=0.003, benign=0.9", 0.10), ("set_validation", "esi", "lr=0.003, benign=0.9", 0.10 - 0.05),
        ("set", "random", "lr=0.002, benign=0.9", 0.30),
        ("set_validation", "random", "lr=0.002, benign=0.9", 0.30 - 0.05)])
    summary = json.loads((esi / "summary.json").read_text())
    assert [(r["method"], r["asr"]) for r in summary["set_best"]] == [("esi", 0.10), ("random", 0.30)]
    assert summary["seconds"] == 135.0
    table = (esi / "RESULTS.md").read_text()
    assert "| dense | esi | lr=0.003, benign=0.9 | 10.0 |" in table
    assert "| dense | random | lr=0.002, benign=0.9 | 30.0 |" in table
    for command in ("--set-methods esi`", "--set-methods random`", "--set-lrs esi=3e-3`"):
        assert command in table
