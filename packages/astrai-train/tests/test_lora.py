"""LoRA: adapters on named projections, training only them, saving them apart, and merging them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from astrai.config import LoRAConfig
from astrai.serialization import Checkpoint, latest_checkpoint
from astrai.trainer import (
    Trainer,
    adapters_disabled,
    apply_lora,
    has_lora,
    load_lora,
    lora_state_dict,
    merge_lora,
    save_lora,
)

LORA = LoRAConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "down"])


def test_apply_lora_freezes_everything_but_the_adapters(make_lm) -> None:
    model = make_lm()
    base_names = set(model.state_dict())
    adapted = apply_lora(model, LORA)
    assert adapted == [
        f"layers.{i}.{m}" for i in range(2) for m in ("attention.q_proj", "attention.v_proj", "mlp.down")
    ]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.{p}" for m in adapted for p in ("lora_A", "lora_B")}
    assert base_names <= set(model.state_dict())  # base weights keep their names
    ids = torch.randint(0, 64, (2, 5))
    torch.testing.assert_close(model(ids)["logits"], make_lm()(ids)["logits"])  # B = 0: starts at the base
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LORA)


def test_unknown_target_is_an_error(make_lm) -> None:
    with pytest.raises(ValueError, match=r"\['wq'\] match no linear layer"):
        apply_lora(make_lm(), LoRAConfig(target_modules=["q_proj", "wq"]))


def test_training_changes_only_adapters_and_merge_matches(tmp_path: Path, make_lm, make_config, sft_dataset) -> None:
    model = make_lm()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = make_config(tmp_path, model, sft_dataset, lora=LORA, batch_per_device=4, n_epoch=2)
    Trainer(cfg).train()
    assert has_lora(model)
    for name, value in model.state_dict().items():
        if "lora_" in name:
            if name.endswith("lora_B"):
                assert torch.count_nonzero(value) > 0  # the adapters learned
        else:
            assert torch.equal(value, initial[name]), name  # the base did not move

    # Saved apart from the base weights.
    path = latest_checkpoint(tmp_path / "ckpt")
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in path.iterdir()}
    assert not (path / "model.safetensors").exists()
    ckpt = Checkpoint.load(path)
    assert ckpt.adapter_config == LORA.to_dict()
    assert ckpt.state_dict.keys() == lora_state_dict(model).keys()

    ids = torch.randint(0, 64, (2, 7))
    model.eval()
    with torch.no_grad():
        adapted = model(ids)["logits"]
        with adapters_disabled(model):
            torch.testing.assert_close(model(ids)["logits"], make_lm()(ids)["logits"])
        merge_lora(model)
        merged = model(ids)["logits"]
    assert not has_lora(model) and set(model.state_dict()) == set(initial)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, make_lm()(ids)["logits"])


def test_save_and_load_adapters(tmp_path: Path, make_lm) -> None:
    model = make_lm()
    apply_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    save_lora(model, tmp_path / "adapter", LORA)
    fresh = make_lm()
    assert load_lora(fresh, tmp_path / "adapter") == LORA
    ids = torch.randint(0, 64, (1, 6))
    torch.testing.assert_close(fresh(ids)["logits"], model(ids)["logits"])
    with pytest.raises(ValueError, match="no LoRA adapters"):
        Checkpoint({"w": torch.zeros(1)}).save(tmp_path / "plain")
        load_lora(make_lm(), tmp_path / "plain")


def test_adapter_dropout_only_in_training(make_lm) -> None:
    model = make_lm()
    apply_lora(model, LoRAConfig(rank=2, dropout=0.5, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    ids = torch.randint(0, 64, (1, 6))
    model.eval()
    torch.testing.assert_close(model(ids)["logits"], model(ids)["logits"])
    model.train()
    assert not torch.allclose(model(ids)["logits"], model(ids)["logits"])
