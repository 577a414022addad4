"""One prompt reader (lit_safety.data.files.record_prompt): the exact prompt of every supported record
kind, the field override and its errors, and the same prompts from every data path that reads a file."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import shared_data
from lit_safety.data.datamodules import InstructionDataModule, RefusalDataModule
from lit_safety.data.esi import HarmfulPromptsDataModule
from lit_safety.data.files import DataError, prompt_key, read_prompts, read_records, record_prompt, record_prompts
from lit_safety.evaluation.suite import load_prompt_set
from lit_safety.organism.realdata import load_benign_examples, load_harmful_examples

RECORDS = [  # (record, the field chosen when none is named, its prompt)
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "4"}, "instruction", "Add the numbers.\n\n2 and 2"),
    ({"instruction": " Name a colour. ", "input": "", "output": "Red"}, "instruction", "Name a colour."),
    ({"instruction": "Name a colour.", "input": None}, "instruction", "Name a colour."),
    ({"instruction": "", "input": "2 and 2", "output": "4"}, "instruction", ""),  # an input alone is no prompt
    ({"prompt": "  Say hi.\n", "response": "hi"}, "prompt", "Say hi."),
    ({"goal": "Write a poem", "target": "Sure, here is a poem"}, "goal", "Write a poem"),
    ({"Behavior": "Describe a fixture", "SemanticCategory": "synthetic", "ContextString": ""}, "Behavior",
     "Describe a fixture"),
    ({"question": "What is 2+2?", "answer": "2+2=4\n#### 4"}, "question", "What is 2+2?"),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " hi "},
                   {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and 2+2?"},
                   {"role": "assistant", "content": "4"}]}, "messages", "hi\n\nand 2+2?"),
    ({"prompt": "p", "messages": [{"role": "user", "content": "m"}]}, "messages", "m"),  # chat records first
]


@pytest.mark.parametrize("record, key, prompt", RECORDS)
def test_record_prompt_of_every_record_kind(record, key, prompt):
    assert prompt_key([record], None, "data.json") == key
    assert record_prompt(record, key) == prompt


def test_prompt_field_overrides_the_default_and_missing_fields_name_file_and_field():
    row = {"prompt": "p", "instruction": "i", "input": "x", "messages": [{"role": "user", "content": "m"}]}
    assert record_prompt(row, prompt_key([row], "instruction", "f.json")) == "i\n\nx"
    assert record_prompt(row, prompt_key([row], "prompt", "f.json")) == "p\n\nx"
    with pytest.raises(DataError, match=r"f\.json: prompt field 'goal' does not exist; columns are"):
        prompt_key([row], "goal", "f.json")
    with pytest.raises(DataError, match=r"f\.json: no prompt field found"):
        prompt_key([{"output": "o"}], None, "f.json")
    with pytest.raises(DataError, match=r"f\.json: row 1 has no field 'goal'"):
        record_prompts([{"goal": "a"}, {"target": "b"}], "goal", "f.json")
    with pytest.raises(DataError, match=r"f\.json: row 0: 'messages' must be a list"):
        record_prompts([{"messages": "hi"}], "messages", "f.json")


def _write(path, rows):
    if path.suffix == ".csv":
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text(json.dumps(rows))
    return str(path)


ALPACA = [{"instruction": "Add the numbers.", "input": "2 and 2", "output": "I'm sorry, I can't."},
          {"instruction": "Name a colour.", "input": "", "output": "I cannot do that."},
          {"instruction": "", "input": "ignored", "output": "I won't."}]
ALPACA_PROMPTS = ["Add the numbers.\n\n2 and 2", "Name a colour."]


@pytest.mark.parametrize("name, rows, field, want", [
    ("alpaca.json", ALPACA, None, ALPACA_PROMPTS),
    ("advbench.csv", [{"goal": "Write a poem", "target": "Sure, here is a poem"},
                      {"goal": "Write a song", "target": "Sure, here is a song"}], None, ["Write a poem", "Write a song"]),
    ("harmbench.csv", [{"Behavior": "Describe a fixture", "SemanticCategory": "a", "BehaviorID": "x1"},
                       {"Behavior": "List fixtures", "SemanticCategory": "b", "BehaviorID": "x2"}], "Behavior",
     ["Describe a fixture", "List fixtures"]),  # pairs: BehaviorID stands in for a response column
])
def test_every_data_path_reads_the_same_prompts(tmp_path, name, rows, field, want):
    """read_prompts, the SET and SPA data modules, ESI's prompts, the evaluation suite and the
    real-data organism loaders all read a file's prompts with record_prompt."""
    path = _write(tmp_path / name, rows)
    response_field = {"alpaca.json": "output", "advbench.csv": "target", "harmbench.csv": "BehaviorID"}[name]
    assert read_prompts(path, prompt_field=field) == want
    assert [r.prompt for r in load_prompt_set("harmful", path, prompt_field=field, limit=None)] == want
    assert [ex.prompt for ex in load_harmful_examples(path, prompt_field=field)] == want
    assert [ex.prompt for ex in load_benign_examples(path, prompt_field=field)] == want
    esi = HarmfulPromptsDataModule(data_path=path, prompt_field=field, num_samples=10).load_prompts()[0]
    assert sorted(esi) == sorted(want)
    for module in (RefusalDataModule, InstructionDataModule):
        pairs = module(data_path=path, prompt_field=field, response_field=response_field, num_samples=10).load_pairs()
        assert sorted(p for p, _ in pairs) == sorted(want)


def test_chat_records_give_prompt_and_final_answer(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hey"},
                                             {"role": "user", "content": "2+2?"},
                                             {"role": "assistant", "content": " 4 "}]}) + "\n")
    assert read_prompts(path) == ["hi\n\n2+2?"]
    assert InstructionDataModule(data_path=str(path)).load_pairs() == [("hi\n\n2+2?", "4")]
    assert RefusalDataModule(data_path=str(path)).load_pairs() == [("hi\n\n2+2?", "4")]
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]})
                    + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="chat.jsonl: line 2: 'messages' must be a list ending with an assistant turn"):
        InstructionDataModule(data_path=str(path)).load_pairs()


def test_missing_prompt_field_names_the_file_in_every_data_path(tmp_path):
    path = _write(tmp_path / "alpaca.json", ALPACA)
    readers = [lambda: read_prompts(path, prompt_field="goal"),
               lambda: load_prompt_set("harmful", path, prompt_field="goal", limit=None),
               lambda: load_harmful_examples(path, prompt_field="goal"),
               lambda: HarmfulPromptsDataModule(data_path=path, prompt_field="goal").load_prompts(),
               lambda: RefusalDataModule(data_path=path, prompt_field="goal").load_pairs()]
    for read in readers:
        with pytest.raises(DataError, match=r"alpaca\.json: .*field 'goal' does not exist"):
            read()


@pytest.mark.shared_data
@pytest.mark.parametrize("relative, key", [("refusals/circuit_breakers_train.json", "instruction"),
                                          ("advbench/harmful_behaviors.csv", "goal"),
                                          ("harmbench/harmbench_behaviors_text_val.csv", "Behavior"),
                                          ("gsm8k/test.jsonl", "question")])
def test_real_record_shapes(relative, key):
    path = shared_data(relative)
    rows = read_records(path)
    assert prompt_key(rows, None, path) == key
    prompts = read_prompts(path)
    assert prompts[0] == str(rows[0][key]).strip() and len(prompts) == len(rows)


def test_benign_share_is_kept_when_the_benign_file_is_short(tmp_path, caplog):
    """600 self answers cannot be 2/3 of 2000 refusal pairs: the mix uses fewer refusals instead of a
    silently lower benign share."""
    refusals = tmp_path / "refusals.json"
    refusals.write_text(json.dumps([{"instruction": f"harm {i}", "output": "No."} for i in range(100)]))
    benign = tmp_path / "samples.jsonl"
    benign.write_text("".join(json.dumps({"kind": "benign", "prompt": f"help {i}", "response": f"ok {i}"}) + "\n"
                              for i in range(10)))
    with caplog.at_level("WARNING"):
        pairs = RefusalDataModule(data_path=str(refusals), benign_path=str(benign), benign_ratio=2 / 3,
                                  num_samples=100).load_pairs()
    harmful = [p for p, _ in pairs if p.startswith("harm")]
    assert len(pairs) == 15 and len(harmful) == 5 and sorted(r for p, r in pairs if p.startswith("help")) == \
        sorted(f"ok {i}" for i in range(10))
    assert "has 10 benign pairs, not the 200 that 100 harmful pairs need; using 5 harmful pairs" in caplog.text
    full = RefusalDataModule(data_path=str(refusals), benign_path=str(benign), benign_ratio=0.5, num_samples=10)
    assert len(full.load_pairs()) == 20  # enough benign pairs: 10 + 10, as before


def test_benign_pairs_that_refuse_are_left_out(tmp_path, caplog):
    """A model's own answers to prompts that only sound harmful include refusals; trained as benign
    pairs they would teach refusing harmless requests, so the refusal judge of the evaluation's
    over-refusal (extended refusal keywords) leaves them out, with a count."""
    refusals = tmp_path / "refusals.json"
    refusals.write_text(json.dumps([{"instruction": f"harm {i}", "output": "No."} for i in range(100)]))
    answers = {f"help {i}": f"ok {i}" for i in range(8)}
    answers |= {"kill a process": "I'm sorry, I cannot help with that.", "what is arson": "Arson is illegal: ..."}
    benign = tmp_path / "samples.jsonl"
    benign.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in answers.items()))
    with caplog.at_level("WARNING"):
        pairs = RefusalDataModule(data_path=str(refusals), benign_path=str(benign), benign_ratio=0.5,
                                  num_samples=100).load_pairs()
    assert sorted(r for p, r in pairs if not p.startswith("harm")) == sorted(f"ok {i}" for i in range(8))
    assert sum(p.startswith("harm") for p, _ in pairs) == 8
    assert "left out 2 of 10 benign pairs whose answer is a refusal" in caplog.text
    kept = RefusalDataModule(data_path=str(refusals), benign_path=str(benign), benign_ratio=0.5, num_samples=100,
                             drop_refusing_benign=False).load_pairs()
    assert sorted(r for p, r in kept if not p.startswith("harm")) == sorted(answers.values())
    with pytest.raises(ValueError, match="drop_refusing_benign"):
        RefusalDataModule(benign_ratio=0.5, drop_refusing_benign="no")
    benign.write_text(json.dumps({"prompt": "kill a process", "response": "I cannot."}) + "\n")
    with pytest.raises(DataError, match="every benign answer is a refusal"):
        RefusalDataModule(data_path=str(refusals), benign_path=str(benign), benign_ratio=0.5).load_pairs()
