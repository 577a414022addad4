"""ESI data under DDP/FSDP2: ranks get equal shards whose padding copies weigh 0, so S is the mean
over the unique prompts and the mask records the global count (the 2-process run against a single
process is tests/test_sharded.py::test_esi_mask_is_the_same_single_ddp_and_fsdp2, with 25 prompts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lit_safety.data.esi import HarmfulPromptsDataModule
from lit_safety.esi.scoring import weighted_values
from lit_safety.parallel import PreShardedSampler, pad_shard_indices


@pytest.mark.parametrize("n, world", [(25, 2), (24, 2), (7, 3), (2, 4), (5, 1)])
def test_pad_shard_indices_count_every_item_once(n, world):
    shards = [pad_shard_indices(n, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) == -(-n // world)  # ranks stay in step
    real = sorted(i for s in shards for i, padding in s if not padding)
    assert real == list(range(n))  # every item exactly once unmarked
    assert all(0 <= i < n for s in shards for i, _ in s)
    assert shards[0] == [(i, False) for i in range(0, n, world)]  # the DistributedSampler order, unpadded
    with pytest.raises(ValueError, match="rank"):
        pad_shard_indices(n, world, world)


def test_datamodule_shards_with_zero_weight_padding():
    from lit_safety.data.esi import encode_examples
    from lit_safety.organism.corpus import harmful_examples
    from lit_safety.organism.tokenizer import train_tokenizer

    examples = harmful_examples(25)
    prompts, refusals = [e.prompt for e in examples], [e.refusal for e in examples]
    tokenizer = train_tokenizer((prompts + refusals) * 5, vocab_size=300)
    data = HarmfulPromptsDataModule(num_samples=25, batch_size=4)
    data.examples = encode_examples(tokenizer, prompts, refusals, "refusal", max_length=256)  # what setup() makes
    data.pad_id = tokenizer.pad_token_id
    prompts = [e["prompt"] for e in data.examples]
    assert len(prompts) == 25
    counted, n_batches = [], set()
    for rank in range(2):
        data.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = data.train_dataloader()
        assert isinstance(loader.sampler, PreShardedSampler)  # Lightning adds no DistributedSampler
        batches = list(loader)
        n_batches.add(len(batches))
        for batch in batches:
            assert batch["weight"].shape == (len(batch["prompts"]),)
            counted += [p for p, w in zip(batch["prompts"], batch["weight"].tolist()) if w == 1.0]
            assert set(batch["weight"].tolist()) <= {0.0, 1.0}
    assert n_batches == {4}  # 13 examples per rank (rank 1: 12 + 1 padding copy)
    assert sorted(counted) == sorted(prompts)  # each prompt counted exactly once over the ranks
    data.trainer = SimpleNamespace(world_size=1, global_rank=0)
    single = list(data.train_dataloader())
    assert sum(len(b["prompts"]) for b in single) == 25 and "weight" not in single[0]


def test_weighted_values():
    values = torch.tensor([1.0, 2.0, 3.0])
    weighted, count = weighted_values(values, {"weight": torch.tensor([1.0, 0.0, 1.0])})
    assert torch.equal(weighted, torch.tensor([1.0, 0.0, 3.0])) and float(count) == 2.0
    same, count = weighted_values(values, {"prompts": ["a", "b", "c"]})
    assert same is values and count == 3.0
    with pytest.raises(ValueError, match="weight"):
        weighted_values(values, {"weight": torch.ones(2)})
