"""Datasets: window arithmetic, item keys per training type, GRPO rows, loading errors, batching."""

import pytest
import torch
from torch.utils.data import DataLoader

from astrai.dataset import (
    DatasetFactory,
    DPODataset,
    GRPODataset,
    ResumableDistributedSampler,
    SEQDataset,
    SFTDataset,
    collate,
    save_h5,
    save_jsonl,
    save_mmap,
)


def test_seq_windows_with_stride(tmp_path):
    save_mmap(tmp_path, {"sequence": [torch.arange(100, 120)]})
    ds = DatasetFactory.load("seq", tmp_path, window_size=8, stride=5)
    assert isinstance(ds, SEQDataset) and len(ds) == 3  # windows [0,8) [5,13) [10,18), labels one further
    for i, begin in enumerate([0, 5, 10]):
        item = ds[i]
        assert item["input_ids"].tolist() == list(range(100 + begin, 108 + begin))
        assert item["target_ids"].tolist() == list(range(101 + begin, 109 + begin))
        assert item["input_ids"].dtype == item["target_ids"].dtype == torch.int64
    assert torch.equal(ds[-1]["input_ids"], ds[2]["input_ids"])
    for bad in (3, -4):
        with pytest.raises(IndexError, match=f"index {bad} out of range"):
            ds[bad]
    assert len(list(ds)) == 3  # plain iteration stops


def test_stride_defaults_to_window_and_ids_widen_to_int64(tmp_path):
    save_mmap(tmp_path, {"sequence": [torch.arange(20, dtype=torch.int32)]})
    ds = DatasetFactory.load("seq", tmp_path, window_size=8)
    assert ds.stride == 8 and len(ds) == 2  # 19 usable inputs: [0,8) and [8,16)
    assert ds[1]["input_ids"].dtype == torch.int64 and ds[1]["target_ids"].tolist() == list(range(9, 17))


def test_factory_create_takes_the_documented_arguments(tmp_path):
    save_mmap(tmp_path, {"sequence": [torch.arange(30)], "loss_mask": [torch.ones(30, dtype=torch.bool)]})
    ds = DatasetFactory.create(train_type="sft", window_size=8, stride=4)
    assert isinstance(ds, SFTDataset) and (ds.window_size, ds.stride, ds.storage) == (8, 4, None)
    assert len(ds.load(tmp_path)) == 6 and ds[5]["input_ids"].tolist() == list(range(20, 28))
    assert DatasetFactory.create("seq", 8).stride == 8  # stride defaults to the window
    with pytest.raises(ValueError, match="unknown dataset 'lm'"):
        DatasetFactory.create(train_type="lm", window_size=8)


def test_sft_loss_mask_is_aligned_with_target_ids(tmp_path):
    sequence = torch.arange(10)
    mask = torch.tensor([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=torch.uint8)
    save_h5(tmp_path, {"sequence": [sequence[:4], sequence[4:]], "loss_mask": [mask[:4], mask[4:]]})
    ds = DatasetFactory.load("sft", tmp_path, window_size=4, stride=3)
    assert isinstance(ds, SFTDataset) and len(ds) == 2
    item = ds[1]  # rows [3, 7) plus the next token
    assert item["input_ids"].tolist() == [3, 4, 5, 6]
    assert item["target_ids"].tolist() == [4, 5, 6, 7]
    assert item["loss_mask"].tolist() == [True, False, False, True]  # mask of each label token


def test_dpo_windows_need_no_extra_token(tmp_path):
    n = 18
    data = {
        "chosen": [torch.arange(n)],
        "rejected": [torch.arange(n) + 100],
        "chosen_mask": [torch.arange(n) % 2 == 0],
        "rejected_mask": [torch.arange(n) % 3 == 0],
    }
    save_mmap(tmp_path, data)
    ds = DatasetFactory.load("dpo", tmp_path, window_size=8, stride=5)
    assert isinstance(ds, DPODataset) and len(ds) == 3  # [10, 18) fits: no label shift
    item = ds[2]
    assert set(item) == {"chosen", "rejected", "chosen_mask", "rejected_mask"}
    assert item["chosen"].tolist() == list(range(10, 18))
    assert item["rejected"].tolist() == list(range(110, 118))
    assert item["chosen_mask"].dtype == torch.bool and item["chosen_mask"].tolist() == [True, False] * 4
    assert item["rejected_mask"].tolist() == [(10 + i) % 3 == 0 for i in range(8)]


def grpo_rows(n=5, p=3, g=2, r=4, prompt_masks=False):
    rows = {
        "prompts": [torch.arange(n * p).view(n, p)],
        "responses": [torch.arange(n * g * r).view(n, g, r) + 1000],
        "masks": [torch.arange(n * g * r).view(n, g, r) % 4 != 3],
        "rewards": [torch.arange(n * g, dtype=torch.float64).view(n, g) / 10],
    }
    if prompt_masks:
        rows["prompt_masks"] = [torch.arange(n * p).view(n, p) % p != 0]
    return rows


@pytest.mark.parametrize("prompt_masks", [False, True])
def test_grpo_items_are_rows_shaped_for_the_strategy(tmp_path, prompt_masks):
    save_mmap(tmp_path, grpo_rows(prompt_masks=prompt_masks))
    ds = DatasetFactory.load("grpo", tmp_path, window_size=7)
    assert isinstance(ds, GRPODataset) and len(ds) == 5
    item = ds[1]
    assert item["prompt_ids"].tolist() == [3, 4, 5]
    assert item["prompt_mask"].tolist() == ([False, True, True] if prompt_masks else [True] * 3)
    assert item["response_ids"].tolist() == [[1008, 1009, 1010, 1011], [1012, 1013, 1014, 1015]]
    assert item["response_mask"].tolist() == [[True, True, True, False]] * 2
    assert item["rewards"].dtype == torch.float32 and item["rewards"].tolist() == pytest.approx([0.2, 0.3])
    batch = collate([ds[0], ds[4]])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "prompt_ids": (2, 3),
        "prompt_mask": (2, 3),
        "response_ids": (2, 2, 4),
        "response_mask": (2, 2, 4),
        "rewards": (2, 2),
    }
    with pytest.raises(IndexError):
        ds[5]


def test_grpo_rejects_bad_shapes_windows_and_stride(tmp_path):
    save_mmap(tmp_path / "ok", grpo_rows())
    with pytest.raises(ValueError, match=r"prompt \(3\) \+ response \(4\) tokens exceed window_size=6"):
        DatasetFactory.load("grpo", tmp_path / "ok", window_size=6)
    with pytest.raises(ValueError, match="GRPODataset.stride=2"):
        DatasetFactory.load("grpo", tmp_path / "ok", window_size=8, stride=2)
    bad = grpo_rows()
    bad["rewards"] = [torch.zeros(5, 3)]  # three rewards for two responses
    save_mmap(tmp_path / "bad", bad)
    with pytest.raises(ValueError, match="GRPO row shapes disagree"):
        DatasetFactory.load("grpo", tmp_path / "bad", window_size=8)


def test_text_jsonl_loads_through_the_factory_with_a_tokenizer(tmp_path):
    class ByteTokenizer:
        def encode(self, text):
            return list(text.encode("utf-8"))

    save_jsonl(tmp_path / "corpus.jsonl", [{"sequence": "abcdef"}, {"sequence": "ghij"}])
    ds = DatasetFactory.load("seq", tmp_path, window_size=4, tokenizer=ByteTokenizer())
    assert len(ds) == 2 and ds[1]["input_ids"].tolist() == list(b"efgh")


def test_load_errors_name_the_path(tmp_path):
    save_mmap(tmp_path / "seq", {"sequence": [torch.arange(8)]})
    with pytest.raises(ValueError, match=r"seq' lacks key\(s\) \['loss_mask'\] needed by SFTDataset"):
        DatasetFactory.load("sft", tmp_path / "seq", window_size=4)
    with pytest.raises(ValueError, match="holds 8 rows, too few for one window of 8"):
        DatasetFactory.load("seq", tmp_path / "seq", window_size=8)
    save_mmap(tmp_path / "rows", {"sequence": [torch.zeros(8, 2, dtype=torch.long)]})
    with pytest.raises(ValueError, match=r"key 'sequence' must be a token stream, got rows of shape \(2,\)"):
        DatasetFactory.load("seq", tmp_path / "rows", window_size=4)
    with pytest.raises(RuntimeError, match="call load"):
        len(SEQDataset(4))
    with pytest.raises(ValueError, match="window_size=0"):
        DatasetFactory.create("seq", 0, None)
    with pytest.raises(ValueError, match="unknown dataset 'pretrain'"):
        DatasetFactory.create("pretrain", 4, 4)


def test_dataloader_with_resumable_sampler_batches_every_window_once(tmp_path):
    save_mmap(tmp_path, {"sequence": [torch.arange(41)]})
    ds = DatasetFactory.load("seq", tmp_path, window_size=4)
    sampler = ResumableDistributedSampler(ds, seed=1)
    loader = DataLoader(ds, batch_size=3, sampler=sampler, collate_fn=collate)
    batches = list(loader)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(3, 4)] * 3 + [(1, 4)]
    starts = sorted(torch.cat([b["input_ids"][:, 0] for b in batches]).tolist())
    assert starts == list(range(0, 40, 4))
