
import pytest
import torch

from lit_safety.models.loading import ModelLoadError, load_model, load_tokenizer, resolve_model_path


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ModelLoadError, match=str(missing)):
        load_model(str(missing))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(str(tmp_path))


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        resolve_model_path(str(tmp_path))


def test_file_instead_of_directory(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="is a file"):
        load_model(str(f))


def test_unknown_organism_lists_builtins():
    with pytest.raises(ValueError, match="organism-dense-aligned"):
        load_model("organism-dense-nonsense")
    with pytest.raises(ValueError, match="unknown organism preset"):
        load_model("organism-dense-aligned:huge")


def test_bad_dtype():
    with pytest.raises(ModelLoadError, match="dtype"):
        load_model("organism-dense-aligned:tiny", dtype="float7")


def test_missing_tokenizer_is_named(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config.hidden_size == 16  # model alone loads
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        load_tokenizer(str(tmp_path))


def test_trust_remote_code_off_by_default(tmp_path, monkeypatch):
    seen = {}
    import transformers

    def fake(source, **kwargs):
        seen.update(kwargs)
        raise OSError("offline")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(ModelLoadError, match="hub id 'someorg/somemodel'"):
        load_model("someorg/somemodel")
    assert seen["trust_remote_code"] is False


def test_hub_id_passes_through():
    assert resolve_model_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("./models/llama")


def test_organism_round_trip(tiny_dense_aligned):
    """A built organism is a plain HF directory: AutoModel/AutoTokenizer load it, outputs match."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_safety.organism.build import read_build_info

    info = read_build_info(tiny_dense_aligned)
    assert info["variant"] == "aligned" and info["spec"]["preset"] == "tiny"
    model = AutoModelForCausalLM.from_pretrained(tiny_dense_aligned)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dense_aligned)
    ours = load_model("organism-dense-aligned:tiny")
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, ours(**ids).logits)
    assert tokenizer.eos_token == "<|end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_moe_organism_generates_batched(tiny_moe_aligned):
    from lit_safety.generation import generate_responses
    from lit_safety.models.loading import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(tiny_moe_aligned))
    assert model.config.output_router_logits is False
    assert model.model.layers[0].mlp.experts.gate_up_proj.dim() == 3
    out = generate_responses(model, tokenizer, ["hi", "How do I make a cake for my friend?"], max_new_tokens=5)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_organism_build_is_deterministic(tmp_path, monkeypatch):
    from lit_safety.organism import organism_path

    weights = []
    for run in range(2):
        monkeypatch.setenv("LIT_SAFETY_CACHE", str(tmp_path / f"c{run}"))
        path = organism_path("organism-dense-unaligned:tiny")
        from safetensors.torch import load_file

        weights.append(load_file(path / "model.safetensors"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_organisms_build_in_float32_without_autocast(tiny_dense_aligned, monkeypatch):
    """float32 is the one build precision (bf16 autocast is ~12x slower than float32 on CPUs without
    bf16 units): it is in the spec, the cache key and organism.json, and training never autocasts."""
    from lit_safety.organism import build
    from lit_safety.organism.specs import PRESETS, OrganismSpec

    spec = PRESETS["tiny"]["dense"]
    assert spec.precision == "float32" and PRESETS["default"]["moe"].precision == "float32"
    assert "-float32-" in build.family_root(spec).name
    assert build.family_root(spec) != build.family_root(spec.replace(precision="bf16-mixed"))
    assert build.read_build_info(tiny_dense_aligned)["spec"]["precision"] == "float32"
    with pytest.raises(ValueError, match="precision must be one of"):
        OrganismSpec(precision="bf16")

    def no_autocast(*args, **kwargs):
        raise AssertionError("a float32 build must not autocast")

    monkeypatch.setattr(torch, "autocast", no_autocast)
    model = build.new_model(spec, load_tokenizer(str(tiny_dense_aligned)))
    data = [{"input_ids": [1, 5, 6, 7, 2], "attention_mask": [1] * 5, "labels": [-100, -100, 6, 7, 2]}] * 4
    stats = build.train_causal_lm(model, data, spec.replace(batch_size=2), steps=2, seed=0, pad_id=0, progress=False)
    assert stats["steps"] == 2 and next(model.parameters()).dtype == torch.float32
    with pytest.raises(AssertionError, match="must not autocast"):  # the opt-in does autocast
        build.train_causal_lm(model, data, spec.replace(batch_size=2, precision="bf16-mixed"), steps=1, seed=0,
                              pad_id=0, progress=False)
