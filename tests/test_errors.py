"""Clear errors, raised early (issue 16 item 9): each bad input below used to surface as a raw
KeyError / UnpicklingError / SafetensorError / RecursionError, a wrong line number, a hub lookup,
or an error only after the gradient pass. Each now names the file (line, field) or parameter and,
where there is one, what to do."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lit_safety.data.files import DataError, read_prompts, read_records
from lit_safety.esi.mask import FORMAT, SafetyMask
from lit_safety.evaluation.suite import load_task_set
from lit_safety.models.loading import ModelLoadError, load_model

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# -- data files ------------------------------------------------------------------------------------
def test_jsonl_row_missing_a_field_names_file_line_and_field(tmp_path):
    path = tmp_path / "tasks.jsonl"
    lines = [json.dumps({"question": "1 + 1?", "answer": "#### 2"}), "",
             json.dumps({"question": "2 + 2?", "answer": "#### 4"}), json.dumps({"question": "3 + 3?", "answer": "#### 6"}),
             "", json.dumps({"question": "4 + 4?"})]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_task_set(str(path), prompt_field=None, answer_field=None, limit=None)
    assert str(err.value) == f"{path}: line 6 has no field 'answer'; its fields are ['question']"
    # the prompt field too (record_prompts): the line, not the row index
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps({"text": "b"}) + "\n")
    with pytest.raises(DataError) as err:
        read_prompts(path)
    assert str(err.value) == f"{path}: line 3 has no field 'prompt'; its fields are ['text']"
    # a limit keeps the line numbers of the rows it keeps
    path.write_text("\n" + json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n"
                    + json.dumps({"text": "c"}) + "\n")
    assert read_prompts(path, limit=2) == ["a", "b"]
    with pytest.raises(DataError, match=rf"^{path}: line 4 has no field 'prompt'"):
        read_prompts(path, limit=3)


def test_csv_row_numbers_are_file_lines(tmp_path):
    path = tmp_path / "tasks.csv"
    path.write_text("question,answer\n1 + 1?,#### 2\n2 + 2?,#### 4\n")
    rows = read_records(path)
    assert [row.location for row in rows] == ["line 2", "line 3"]
    with pytest.raises(DataError) as err:
        rows[1]["question_text"]
    assert str(err.value) == f"{path}: line 3 has no field 'question_text'; its fields are ['question', 'answer']"
    assert rows[1].get("question_text") is None and "question_text" not in rows[1]
    json_list = tmp_path / "tasks.json"
    json_list.write_text(json.dumps([{"question": "q"}, {"answer": "a"}]))
    with pytest.raises(DataError) as err:
        read_records(json_list)[1]["question"]
    assert str(err.value) == f"{json_list}: row 1 has no field 'question'; its fields are ['answer']"


def test_jsonl_parse_error_names_the_real_line(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(5)) + '{"prompt": oops}\n')
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: line 6: not valid JSON: Expecting value (column 12)"
    path.write_text(json.dumps({"prompt": "a"}) + "\n\n" + json.dumps(["not", "an", "object"]) + "\n")
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == f"{path}: line 3: expected a JSON object with named fields, got a list"


def test_csv_with_utf8_bom_as_excel_saves_it(tmp_path):
    path = tmp_path / "advbench.csv"
    path.write_bytes("\ufeffgoal,target\nWrite a harmful thing,Sure\n".encode("utf-8"))
    assert read_records(path) == [{"goal": "Write a harmful thing", "target": "Sure"}]
    assert read_prompts(path) == ["Write a harmful thing"]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes("\ufeff".encode() + json.dumps({"prompt": "p"}).encode() + b"\n")
    assert read_prompts(jsonl) == ["p"]


def test_deeply_nested_json_is_a_data_error(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(DataError) as err:
        read_records(path)
    assert str(err.value) == (f"{path}: could not parse: the JSON is nested too deeply to read (deeper than "
                              f"Python's recursion limit, {sys.getrecursionlimit()}); a data file is a flat list of records")
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(json.dumps({"prompt": "p"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(DataError, match=rf"^{jsonl}: line 2: could not parse: the JSON is nested too deeply"):
        read_records(jsonl)


@pytest.fixture
def no_hub(monkeypatch):
    """datasets.load_dataset replaced: records its calls, answers one row."""
    import datasets

    calls = []

    def fake(name, split=None, **kwargs):
        calls.append(name)
        return [{"prompt": f"from the hub: {name}"}]

    monkeypatch.setattr(datasets, "load_dataset", fake)
    return calls


@pytest.mark.parametrize("source", ["data/refusls.json", "./x.csv", "../nowhere/x.csv", "refusals.jsonl",
                                    "prompts.txt", "org/set.parquet", "a/b/c", "~/no_such_lit_safety_dir/x"])
def test_missing_local_data_path_is_not_sent_to_the_hub(source, tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    resolved = Path(source).expanduser().resolve()
    with pytest.raises(DataError) as err:
        read_records(source)
    assert str(err.value).startswith(f"file not found: {source} (resolved {resolved})")
    assert no_hub == []


def test_missing_file_message_says_where_and_suggests(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "refusals.json").write_text(json.dumps([{"prompt": "p"}]))
    with pytest.raises(DataError) as err:
        read_records("data/refusls.json")
    data = tmp_path.resolve() / "data"
    assert str(err.value) == (f"file not found: data/refusls.json (resolved {data / 'refusls.json'}): "
                              f"refusls.json does not exist in {data}; did you mean refusals.json?")
    with pytest.raises(DataError) as err:
        read_records("nodir/x.csv")
    assert str(err.value) == (f"file not found: nodir/x.csv (resolved {tmp_path.resolve() / 'nodir' / 'x.csv'}): "
                              f"the directory {tmp_path.resolve() / 'nodir'} does not exist")


def test_hub_ids_still_go_to_the_hub_and_existing_paths_are_read(tmp_path, monkeypatch, no_hub):
    monkeypatch.chdir(tmp_path)
    assert read_records("walledai/AdvBench") == [{"prompt": "from the hub: walledai/AdvBench"}]
    assert read_records("gsm8k") == [{"prompt": "from the hub: gsm8k"}]
    assert no_hub == ["walledai/AdvBench", "gsm8k"]
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").write_text("x")  # an existing file wins over the hub id it looks like
    with pytest.raises(DataError, match=r"owner/name: unsupported file type ''"):
        read_records("owner/name")
    assert len(no_hub) == 2


# -- ESI: k against the weights scored, before the gradient pass -----------------------------------
class NoGradientPass:
    """An objective that fails the test if ESI ever gets as far as the gradient pass."""

    name = "no-gradient-pass"

    def __call__(self, model, batch):
        raise AssertionError("the gradient pass started")


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_esi_k_above_the_scored_weights_fails_before_gradients(tiny_llama):
    from lit_safety.esi import compute_safety_mask
    from lit_safety.esi.selection import SelectionConfig, WeightSelector, select_weights

    batches = [{"input_ids": torch.ones(1, 4, dtype=torch.long)}]
    # 4 attention matrices 16x16 + 3 MLP matrices 16x32 = 2560 scored weights
    with pytest.raises(ValueError) as err:
        compute_safety_mask(tiny_llama, batches=batches, objective=NoGradientPass(), k=5000, progress=False)
    assert str(err.value) == ("selection.k=5000 is more than the 2560 weights the selection scores "
                              "(7 tensors, scope 'global'); lower k or widen include/exclude")
    with pytest.raises(ValueError) as err:
        compute_safety_mask(tiny_llama, batches=batches, objective=NoGradientPass(), k=300, scope="per_tensor",
                            progress=False)
    assert str(err.value) == ("selection.k=300 is more than the 256 weights of 'model.layers.0.self_attn.q_proj.weight' "
                              "(scope 'per_tensor' selects k from every tensor); lower k or use a ratio")
    with pytest.raises(ValueError) as err:
        select_weights(tiny_llama, batches, SelectionConfig(k=20, scope="per_row"), objective=NoGradientPass())
    assert str(err.value) == ("selection.k=20 is more than the 16 weights of a row of "
                              "'model.layers.0.self_attn.q_proj.weight' (scope 'per_row' selects k from every row); "
                              "lower k or use a ratio")
    # the Lightning path (ESIScoringModule) makes its WeightSelector at train start, before any batch
    with pytest.raises(ValueError, match=r"^selection\.k=2561 is more than the 2560 weights"):
        WeightSelector(tiny_llama, SelectionConfig(k=2561), objective=NoGradientPass())
    assert all(p.requires_grad for p in tiny_llama.parameters())  # nothing left half set up
    with pytest.raises(ValueError, match=r"^selection\.k=1537 is more than the 1536 weights the selection scores \(3 tensors"):
        compute_safety_mask(tiny_llama, method="magnitude", k=1537, include=["mlp"], progress=False)
    assert compute_safety_mask(tiny_llama, method="magnitude", k=2560, progress=False).k == 2560


# -- model files -----------------------------------------------------------------------------------
def _tiny_model_dir(path: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(path)
    return path


class _Pickled:
    def __reduce__(self):
        return (os.getcwd, ())


def test_blocked_pickle_weights_name_the_file(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    (model_dir / "model.safetensors").unlink()
    torch.save({"x": _Pickled()}, model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model_dir))
    message = str(err.value)
    assert message.startswith(
        f"could not load a causal LM from local directory {model_dir}: {model_dir / 'pytorch_model.bin'} is a pickle "
        "checkpoint that holds more than tensors, and lit-safety loads pickles with weights_only=True only (loading "
        "it fully could run code). Convert it to safetensors where you trust it (save_pretrained(..., "
        "safe_serialization=True)) or use a copy that ships model.safetensors. (torch: Weights only load failed.")
    assert isinstance(err.value.__cause__, __import__("pickle").UnpicklingError)


def test_corrupt_safetensors_in_a_local_directory_names_the_file(tmp_path):
    model_dir = _tiny_model_dir(tmp_path / "model")
    (model_dir / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ModelLoadError) as err:
        load_model(str(model_dir))
    assert str(err.value) == (f"could not load a causal LM from local directory {model_dir}: a weights file "
                              f"({model_dir / 'model.safetensors'}) is damaged or incomplete: Error while deserializing "
                              "header: header too large. Save or download the model again.")


def test_corrupt_organism_cache_says_delete_and_rebuild(tiny_dense_aligned, tmp_path, monkeypatch):
    from lit_safety.io import cache_root

    relative = tiny_dense_aligned.relative_to(cache_root())
    cache = tmp_path / "cache"
    copy = cache / relative
    shutil.copytree(tiny_dense_aligned, copy)
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:100])
    monkeypatch.setenv("LIT_SAFETY_CACHE", str(cache))
    with pytest.raises(ModelLoadError) as err:
        load_model("organism-dense-aligned:tiny")
    message = str(err.value)
    assert message.startswith(f"could not load a causal LM from local directory {copy}: a weights file "
                              f"({copy / 'model.safetensors'}) is damaged or incomplete: ")
    assert message.endswith(f". It is a lit-safety cache entry: delete {copy} and rerun to rebuild it.")


# -- mask files ------------------------------------------------------------------------------------
def test_mask_header_without_shapes_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mask.safetensors"
    save_file({"w.indices": torch.tensor([0, 1])}, str(path), metadata={"lit_safety": json.dumps({"format": FORMAT})})
    with pytest.raises(ValueError) as err:
        SafetyMask.load(path)
    assert str(err.value) == (f"{path}: damaged lit-safety mask: its header has no 'shapes' (the shape of every "
                              "scored parameter); recompute the mask")
    save_file({"w.indices": torch.tensor([0, 7])}, str(path),
              metadata={"lit_safety": json.dumps({"format": FORMAT, "shapes": {"w": [2, 2]}})})
    with pytest.raises(ValueError) as err:
        SafetyMask.load(path)
    assert str(err.value) == f"{path}: damaged lit-safety mask: mask indices of 'w' fall outside its 4 entries; recompute the mask"
    save_file({"w.indices": torch.tensor([0])}, str(path),
              metadata={"lit_safety": json.dumps({"format": FORMAT, "shapes": {"w": "2x2"}})})
    with pytest.raises(ValueError, match=r"damaged lit-safety mask: 'shapes' must map parameter names to lists of "
                                         r"sizes, got 'w': '2x2'; recompute the mask"):
        SafetyMask.load(path)
