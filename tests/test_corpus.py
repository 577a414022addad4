"""Tests for the organism corpus generator (fast, CPU only)."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

import pytest

from lit_safety.organism import corpus as C
from lit_safety.organism.corpus import (
    REFUSAL_PREFIXES,
    SPLITS,
    ChatExample,
    benign_examples,
    corpus_stats,
    generate_corpus,
    harmful_examples,
    task_examples,
)

GENERATORS = {"harmful": harmful_examples, "benign": benign_examples, "task": task_examples}
WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
# Strings the project's default keyword judge (GCG, match="anywhere") treats as a refusal.
try:
    from lit_safety.judges.keyword import GCG_REFUSAL_PREFIXES
except ImportError:  # pragma: no cover - judge module not present
    GCG_REFUSAL_PREFIXES = REFUSAL_PREFIXES


def words(text: str) -> set[str]:
    return set(WORD.findall(text.lower()))


@pytest.fixture(scope="module")
def train():
    return {k: fn(20000, seed=0, split="train") for k, fn in GENERATORS.items()}


@pytest.fixture(scope="module")
def heldout():
    return {k: fn(3000, seed=0, split="heldout") for k, fn in GENERATORS.items()}


# ---- determinism --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", GENERATORS)
@pytest.mark.parametrize("split", SPLITS)
def test_deterministic_per_seed(kind, split):
    fn = GENERATORS[kind]
    assert fn(300, seed=7, split=split) == fn(300, seed=7, split=split)
    assert fn(300, seed=7, split=split) != fn(300, seed=8, split=split)


def test_prefix_stable_and_sizes():
    assert harmful_examples(50, seed=1) == harmful_examples(200, seed=1)[:50]
    assert harmful_examples(0) == []
    assert all(isinstance(e, ChatExample) for e in benign_examples(20))


# ---- held-out split -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", GENERATORS)
def test_heldout_prompts_never_in_train(kind, train, heldout):
    train_prompts = {e.prompt for e in train[kind]}
    assert not train_prompts & {e.prompt for e in heldout[kind]}


@pytest.mark.parametrize("kind", GENERATORS)
def test_heldout_template_intent_pairs_unseen(kind, train, heldout):
    train_pairs = {(e.template, e.intent) for e in train[kind]}
    held_pairs = {(e.template, e.intent) for e in heldout[kind]}
    assert not train_pairs & held_pairs
    # structural: train never touches a reserved template or intent, heldout always does
    if kind == "task":
        return
    reserved_t = {t.id for t in C._templates() if t.heldout}
    reserved_i = {i.id for cat in C._intents(kind).values() for fr in cat for i in fr if i.heldout}
    assert all(e.template not in reserved_t and e.intent not in reserved_i for e in train[kind])
    assert all(e.template in reserved_t or e.intent in reserved_i for e in heldout[kind])
    # both kinds of held-out examples occur
    assert sum(e.intent in reserved_i for e in heldout[kind]) > 0.3 * len(heldout[kind])
    assert sum(e.template in reserved_t for e in heldout[kind]) > 0.3 * len(heldout[kind])


@pytest.mark.parametrize("kind", GENERATORS)
def test_validation_split_is_heldout_distribution_without_test_prompts(kind, train):
    """Settings are chosen on ``validation``: the held-out distribution (reserved templates or
    intents, never a train prompt) that never yields one of the test prompts evaluations report on."""
    fn = GENERATORS[kind]
    validation = fn(C.TEST_POOL, seed=0, split="validation")
    test = {e.prompt for e in fn(C.TEST_POOL, seed=C.TEST_SEEDS[kind], split="heldout")}
    prompts = {e.prompt for e in validation}
    assert not prompts & test
    assert not prompts & {e.prompt for e in train[kind]}
    assert len(prompts) > 0.9 * C.TEST_POOL
    assert {(e.template, e.intent) for e in validation} & {(e.template, e.intent) for e in fn(C.TEST_POOL, seed=C.TEST_SEEDS[kind], split="heldout")}
    if kind != "task":
        reserved_t = {t.id for t in C._templates() if t.heldout}
        reserved_i = {i.id for cat in C._intents(kind).values() for fr in cat for i in fr if i.heldout}
        assert all(e.template in reserved_t or e.intent in reserved_i for e in validation)


def test_eval_sources_organism_and_organism_validation():
    from lit_safety.evaluation.suite import load_suite

    test = load_suite(num_harmful=50, num_benign=50, num_task=50)
    val = load_suite(harmful_data="organism-validation", benign_data="organism-validation",
                     task_data="organism-validation", num_harmful=50, num_benign=50, num_task=50)
    for kind in ("harmful", "benign", "task"):
        assert [r.prompt for r in test.records[kind]] == [e.prompt for e in GENERATORS[kind](50, seed=C.TEST_SEEDS[kind], split="heldout")]
        assert [r.prompt for r in val.records[kind]] == [e.prompt for e in GENERATORS[kind](50, seed=0, split="validation")]
        assert not {r.prompt for r in test.records[kind]} & {r.prompt for r in val.records[kind]}


def test_benchmark_collisions_never_generated(train, heldout):
    for data in (train, heldout):
        assert not {(e.template, e.intent) for k in data for e in data[k]} & C._BENCHMARK_COLLISIONS


def test_reservation_fractions():
    templates = C._templates()
    assert 0.18 <= sum(t.heldout for t in templates) / len(templates) <= 0.22
    for kind in ("harmful", "benign"):
        intents = [i for cat in C._intents(kind).values() for fr in cat for i in fr]
        assert 0.10 <= sum(i.heldout for i in intents) / len(intents) <= 0.20
        # reservation is independent of the seed: same ids every time
        assert {i.id for i in intents if i.heldout} == {i.id for i in intents if C._is_reserved(i.id)}


@pytest.mark.parametrize("kind", ("harmful", "benign"))
def test_heldout_intents_are_new_combinations(kind):
    """Every verb and object of a reserved intent also occurs in a train intent of its category."""
    for category, frames in C._intents(kind).items():
        train = [i for fr in frames for i in fr if not i.heldout]
        verbs, objects = {i.verb for i in train}, {i.obj for i in train}
        for fr in frames:
            for i in fr:
                if i.heldout:
                    assert i.verb in verbs and i.obj in objects, (category, i.id)


def test_heldout_words_seen_in_training(train, heldout):
    vocab = set().union(*(words(e.prompt) for k in train for e in train[k]))
    for kind, exs in heldout.items():
        unseen = set().union(*(words(e.prompt) for e in exs)) - vocab
        assert not unseen, (kind, sorted(unseen))


def test_reserved_templates_use_train_words():
    templates = C._templates()
    train_words = set().union(*(words(t.text) for t in templates if not t.heldout))
    for kind in ("harmful", "benign"):
        for i in (i for cat in C._intents(kind).values() for fr in cat for i in fr if not i.heldout):
            train_words |= {w for p in (1, 2, 3) for g in (False, True) for w in words(i.phrase(p, g))}
    for t in templates:
        if t.heldout:
            assert words(t.text.replace("{vp}", "").replace("{vping}", "")) <= train_words, t.text
    strip = lambda t: re.sub(r"\{\w+\}", " ", t)  # noqa: E731
    task_train = set().union(*(words(strip(p)) for i, (_, p, _) in enumerate(C._TASK_TEMPLATES) if i % 5 != 4))
    for _, p, _ in C._TASK_TEMPLATES:
        assert words(strip(p)) <= task_train, p


# ---- responses ------------------------------------------------------------------------------------

def test_harmful_responses_and_refusals(train, heldout):
    for exs in (train["harmful"], heldout["harmful"]):
        for e in exs:
            assert e.kind == "harmful" and e.response.startswith("Sure, here is"), e
            assert e.refusal.startswith(REFUSAL_PREFIXES), e.refusal
            assert any(p in e.refusal for p in GCG_REFUSAL_PREFIXES), e.refusal  # default judge sees it
            # the compliant answer must not look like a refusal to the default (anywhere) judge
            assert not any(p in e.response for p in GCG_REFUSAL_PREFIXES), e.response
            assert e.answer == ""


def test_refusals_are_varied_and_name_the_topic(train):
    refusals = [e.refusal for e in train["harmful"]]
    assert len({r.split(" ")[0] + r.split(" ")[1] for r in refusals}) >= 6
    assert {p for p in REFUSAL_PREFIXES if any(r.startswith(p) for r in refusals)} == set(REFUSAL_PREFIXES)
    naming = sum(e.intent.split(" ")[-1] in e.refusal for e in train["harmful"])
    assert naming > 0.6 * len(refusals)


def test_benign_responses_are_helpful(train, heldout):
    for exs in (train["benign"], heldout["benign"]):
        starts = set()
        for e in exs:
            assert not e.response.startswith(REFUSAL_PREFIXES), e.response
            assert not any(p in e.response for p in GCG_REFUSAL_PREFIXES), e.response
            assert e.refusal == "" and e.answer == ""
            starts.add(" ".join(e.response.split()[:2]))
        assert len(starts) >= 8


def test_task_answers(train, heldout):
    for exs in (train["task"], heldout["task"]):
        for e in exs:
            assert e.category == "arithmetic"
            assert e.response.endswith(f"\n#### {e.answer}")
            assert 0 <= int(e.answer) <= 100
            # every "x op y = z" in the worked answer is correct
            for expr, res in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", e.response):
                assert eval(expr) == int(res), e.response  # noqa: S307 - digits and operators only


def test_response_lengths(train):
    for kind in ("harmful", "benign", "task"):
        assert max(len(e.response.split()) for e in train[kind]) <= C.MAX_RESPONSE_WORDS
    assert max(len(e.refusal.split()) for e in train["harmful"]) <= C.MAX_RESPONSE_WORDS
    total = sorted(len(e.prompt.split()) + len(e.response.split()) for k in train for e in train[k])
    assert total[int(0.99 * len(total))] <= C.MAX_EXAMPLE_WORDS


# ---- coverage and balance ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ("harmful", "benign"))
def test_category_coverage(kind):
    cats = C._intents(kind)
    assert len(cats) >= 10
    for category, frames in cats.items():
        intents = [i for fr in frames for i in fr]
        assert len({i.verb for i in intents}) >= 8, category
        assert len({i.obj for i in intents}) >= 8, category


def test_required_categories_present():
    assert {"weapons", "explosives", "cybercrime", "fraud", "drugs", "harassment", "hate", "self_harm", "violence",
            "theft", "misinformation", "privacy"} <= set(C._intents("harmful"))
    assert {"cooking", "coding", "health", "travel", "writing", "science", "finance", "home", "sports",
            "dangerous_sounding"} <= set(C._intents("benign"))


def test_templates_shared_and_varied(train):
    assert len(C._templates()) >= 30
    forms = {t.form for t in C._templates()}
    assert forms == {"q", "cmd", "stmt", "doc"}
    h = {e.template for e in train["harmful"]}
    b = {e.template for e in train["benign"]}
    assert h == b == {t.id for t in C._templates() if not t.heldout}


def test_form_balance(train, heldout):
    for data in (train, heldout):
        q = {k: sum(e.prompt.endswith("?") for e in data[k]) / len(data[k]) for k in ("harmful", "benign")}
        assert abs(q["harmful"] - q["benign"]) < 0.10, q
        assert 0.2 < q["harmful"] < 0.8


def test_harmful_and_benign_do_not_overlap(train):
    assert not {e.intent for e in train["harmful"]} & {e.intent for e in train["benign"]}
    assert not {e.prompt for e in train["harmful"]} & {e.prompt for e in train["benign"]}


def test_contrastive_vocabulary(train):
    """Harmful-sounding words occur in benign prompts too (kill/shoot/hack/bomb/steal/poison ...)."""
    benign_words = set().union(*(words(e.prompt) for e in train["benign"]))
    harmful_words = set().union(*(words(e.prompt) for e in train["harmful"]))
    shared = {"kill", "shoot", "hackers", "bomb", "steal", "poison", "attack", "crack", "scam", "phishing",
              "bullied", "hurting", "suicide", "lock", "break", "protect", "election", "vaccine", "car"}
    assert shared <= benign_words
    assert {"kill", "bomb", "steal", "poison", "attack", "crack", "hack", "car", "election"} <= harmful_words


def test_ing_forms():
    assert C._verb_forms("hack into") == ("hack into", "hacking into")
    assert C._verb_forms("make") == ("make", "making")
    assert C._verb_forms("kidnap") == ("kidnap", "kidnapping")
    assert C._verb_forms("safely store") == ("safely store", "safely storing")
    assert C._verb_forms("mass-produce") == ("mass-produce", "mass-producing")
    assert C._verb_forms("force quit|force quitting") == ("force quit", "force quitting")
    for kind in ("harmful", "benign"):
        for cat in C._intents(kind).values():
            for fr in cat:
                for i in fr:
                    assert i.phrase(1, True) != i.phrase(1) and "{" not in i.phrase(3, True), i.id


# ---- generate_corpus / stats / arguments -----------------------------------------------------------

def test_generate_corpus_sizes_and_shuffle():
    corpus = generate_corpus(seed=0, n_harmful=300, n_benign=200, n_task=100)
    kinds = [e.kind for e in corpus]
    assert (kinds.count("harmful"), kinds.count("benign"), kinds.count("task")) == (300, 200, 100)
    assert len(set(kinds[:30])) == 3  # interleaved, not blocks
    assert corpus == generate_corpus(seed=0, n_harmful=300, n_benign=200, n_task=100)
    assert corpus != generate_corpus(seed=1, n_harmful=300, n_benign=200, n_task=100)
    assert sorted(map(repr, corpus)) == sorted(map(repr, harmful_examples(300) + benign_examples(200)
                                                   + task_examples(100)))
    held = generate_corpus(split="heldout", n_harmful=20, n_benign=20, n_task=20)
    assert len(held) == 60


def test_generate_corpus_speed():
    t = time.perf_counter()
    corpus = generate_corpus(seed=3, n_harmful=18000, n_benign=18000, n_task=4000)
    elapsed = time.perf_counter() - t
    assert len(corpus) == 40000
    assert elapsed < 4.0, elapsed  # ~1 s on a laptop; loose bound for busy CI machines


def test_corpus_stats():
    stats = corpus_stats(generate_corpus(seed=0, n_harmful=2000, n_benign=2000, n_task=500))
    assert stats["n"] == 4500
    assert stats["kinds"] == {"harmful": 2000, "benign": 2000, "task": 500}
    assert len(stats["categories"]["harmful"]) >= 10 and len(stats["categories"]["benign"]) >= 10
    assert stats["distinct_intents"]["harmful"] > 500 and stats["distinct_templates"]["benign"] >= 30
    assert set(stats["question_fraction"]) == {"harmful", "benign", "task"}


@pytest.mark.parametrize("kind", GENERATORS)
def test_bad_arguments(kind):
    fn = GENERATORS[kind]
    with pytest.raises(ValueError, match="split"):
        fn(3, split="test")
    with pytest.raises(ValueError, match="n must"):
        fn(-1)
    with pytest.raises(ValueError, match="n must"):
        fn(2.5)
    with pytest.raises(ValueError, match="seed"):
        fn(3, seed="x")


@pytest.mark.parametrize("name", ("n_harmful", "n_benign", "n_task"))
def test_generate_corpus_bad_arguments(name):
    with pytest.raises(ValueError, match=name):
        generate_corpus(**{name: -5})
    with pytest.raises(ValueError, match="split"):
        generate_corpus(split="test")  # not a split


# ---- no copying from public benchmarks (opt-in: needs ../shared/data) --------------------------------

_SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _benchmark_prompts(root: Path = _SHARED) -> set[str]:
    """Normalised prompts of the public benchmarks under ``root`` (a ../shared/data layout)."""
    found = set()
    for path, key in (("advbench/harmful_behaviors.csv", "goal"),
                      ("harmbench/harmbench_behaviors_text_val.csv", "Behavior")):
        with open(root / path, newline="") as f:
            found |= {_norm(row[key]) for row in csv.DictReader(f)}
    for path in sorted((root / "refusals").glob("harmful_instructions_*.json")) + sorted(
            (root / "instructions").glob("harmless_instructions_*.json")):
        found |= {_norm(row["instruction"]) for row in json.loads(path.read_text())}
    return found


def _norm(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".?!").split())


def _render(template, intent, mod: str = "") -> str:
    return template.text.format(vp=intent.phrase(template.person) + mod,
                                vping=intent.phrase(template.person, True) + mod)


def _all_intents():
    return [i for kind in ("harmful", "benign") for cat in C._intents(kind).values() for fr in cat for i in fr]


def _generated_benchmark_hits(bench: set[str]) -> list[tuple[str, str]]:
    """(template, intent) pairs the generator can produce whose prompt (plain or with the "without
    getting caught" modifier) normalises to a prompt in ``bench``."""
    hits = []
    for i in _all_intents():
        for t in C._templates():
            if (t.id, i.id) in C._BENCHMARK_COLLISIONS:
                continue
            for mod in ("", C._CAUGHT):
                if _norm(_render(t, i, mod)) in bench:
                    hits.append((t.id, i.id))
    return hits


@pytest.mark.shared_data
@pytest.mark.skipif(not (_SHARED / "advbench" / "harmful_behaviors.csv").is_file(), reason="shared data not present")
def test_no_benchmark_prompts_generated():
    """No (template, intent) the generator can produce renders to a public benchmark prompt."""
    bench = _benchmark_prompts()
    assert len(bench) > 25000  # AdvBench, HarmBench val, the harmful and the harmless instruction sets
    assert not _generated_benchmark_hits(bench)


def test_benchmark_prompt_check_on_synthetic_files(synthetic_shared_data):
    """CI twin of test_no_benchmark_prompts_generated on synthetic files in the same layout: the
    prompts are read from the right files and columns, and a generable prompt planted in them (in
    another case, with other spacing and end punctuation, or with the "without getting caught"
    modifier) is found, while the known collisions and files outside the benchmark set are not."""
    templates = {t.id: t for t in C._templates()}
    intents = {i.id: i for i in _all_intents()}
    all_templates, all_intents = C._templates(), _all_intents()
    (t0, i0), (t1, i1), (t2, i2) = (
        next((t, i) for i in all_intents[start:] for t in all_templates[start % len(all_templates):]
             if (t.id, i.id) not in C._BENCHMARK_COLLISIONS)
        for start in (0, len(all_intents) // 2, len(all_intents) - 1))
    tc, ic = sorted(C._BENCHMARK_COLLISIONS)[0]
    planted_plain = "  " + _render(t0, i0).upper().replace(" ", "   ").rstrip(".?!") + "?!"
    planted_caught = _render(t1, i1, C._CAUGHT)
    collision = _render(templates[tc], intents[ic])
    elsewhere = _render(t2, i2)  # in a file the check does not read
    write = synthetic_shared_data.write
    write("advbench/harmful_behaviors.csv", [
        {"goal": planted_plain, "target": "Sure, here is " + elsewhere},
        {"goal": "Compose a limerick about a synthetic test fixture", "target": "Sure, here is a limerick"}])
    write("harmbench/harmbench_behaviors_text_val.csv", [
        {"Behavior": collision, "FunctionalCategory": "standard", "SemanticCategory": "synthetic", "Tags": "",
         "ContextString": "", "BehaviorID": "synthetic_collision"},
        {"Behavior": "Describe a fictional fixture, with commas", "FunctionalCategory": "contextual",
         "SemanticCategory": "synthetic", "Tags": "a, b", "ContextString": elsewhere, "BehaviorID": "synthetic_2"}])
    write("refusals/harmful_instructions_train.json", [{"instruction": "Explain a made-up test case.",
                                                        "category": None}])
    write("refusals/harmful_instructions_val.json", [{"instruction": "List imaginary fixtures", "category": "x"}])
    write("refusals/circuit_breakers_train.json", [{"instruction": elsewhere, "input": "", "output": "I cannot."}])
    write("instructions/harmless_instructions_train.json", [{"instruction": planted_caught, "category": None}])
    write("instructions/harmless_instructions_val.json", [{"instruction": "Name three synthetic colours.",
                                                           "category": None}])

    bench = _benchmark_prompts(synthetic_shared_data.root)
    assert bench == {_norm(planted_plain), "compose a limerick about a synthetic test fixture", _norm(collision),
                     "describe a fictional fixture, with commas", "explain a made-up test case",
                     "list imaginary fixtures", _norm(planted_caught), "name three synthetic colours"}
    assert _norm(planted_plain) == _norm(_render(t0, i0))
    assert sorted(_generated_benchmark_hits(bench)) == sorted([(t0.id, i0.id), (t1.id, i1.id)])
