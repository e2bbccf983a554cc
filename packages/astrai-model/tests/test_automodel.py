"""`AutoModel` save/load of our own folders: bit-exact round trips, no random init on load, precise errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from astrai.model import AutoModel, AutoRegressiveLM, EmbeddingEncoder


def assert_bit_exact(a, b, ids):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)
    with torch.no_grad():
        assert torch.equal(a(ids)["logits"], b(ids)["logits"])


@pytest.mark.parametrize(
    "flags",
    [dict(), dict(tie_weight=True, use_qk_norm=True, attn_bias=True, use_gated_attention=True)],
    ids=["plain", "all-flags"],
)
def test_native_round_trip_is_bit_exact(tmp_path, lm_config, tokens, flags):
    torch.manual_seed(0)
    model = AutoRegressiveLM(lm_config(**flags)).eval()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "autoregressive_lm"
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in stored) is not flags.get("tie_weight", False)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is AutoRegressiveLM and not loaded.training
    assert_bit_exact(model, loaded, tokens(2, 9))
    if flags.get("tie_weight"):
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
        assert len(list(loaded.parameters())) == len(loaded.state_dict())  # the tie is one Parameter


def test_sharded_round_trip(tmp_path, lm_config, tokens):
    model = AutoRegressiveLM(lm_config()).eval()
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(model.state_dict())
    assert_bit_exact(model, AutoModel.from_pretrained(tmp_path), tokens(2, 9))


def test_loading_does_not_run_random_init(tmp_path, lm_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    state = torch.random.get_rng_state()
    AutoModel.from_pretrained(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # no random number drawn


def test_dtype_and_subclass_loading(tmp_path, lm_config, encoder_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path / "lm")
    model = AutoRegressiveLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    EmbeddingEncoder(encoder_config(pooling_type="cls")).save_pretrained(tmp_path / "enc")
    encoder = AutoModel.from_pretrained(tmp_path / "enc")
    assert type(encoder) is EmbeddingEncoder and encoder.pooling_type == "cls"
    with pytest.raises(ValueError, match="builds a EmbeddingEncoder, not a AutoRegressiveLM"):
        AutoRegressiveLM.from_pretrained(tmp_path / "enc")


def _rewrite_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_missing_unexpected_and_misshaped_tensors_are_errors(tmp_path, lm_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    weights = str(tmp_path / "model.safetensors")

    _rewrite_weights(tmp_path, lambda t: t.pop("layers.1.mlp.up.weight"))
    with pytest.raises(ValueError, match=rf"{weights}.*missing tensors \['layers.1.mlp.up.weight'\]"):
        AutoModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing tensors"):  # never silently uninitialised, strict or not
        AutoModel.from_pretrained(tmp_path, strict=False)

    _rewrite_weights(
        tmp_path, lambda t: t.update({"layers.1.mlp.up.weight": torch.zeros(96, 64), "extra.weight": torch.zeros(2)})
    )
    with pytest.raises(ValueError, match=r"unexpected tensors \['extra.weight'\]"):
        AutoModel.from_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path, strict=False) is not None  # strict=False ignores extras

    _rewrite_weights(tmp_path, lambda t: t.update({"norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"wrong shapes \[norm.weight: file \(65,\) vs model \(64,\)\]"):
        AutoModel.from_pretrained(tmp_path, strict=False)


def test_folder_errors(tmp_path, lm_config):
    with pytest.raises(ValueError, match=r"config.json does not exist"):
        AutoModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AutoModel.from_pretrained(tmp_path)
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights found.*model.safetensors"):
        AutoModel.from_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"n_heads": 5}))
    with pytest.raises(ValueError, match=r"config.json: .*n_kv_heads=2: must divide n_heads=5"):
        AutoModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gpt_neox"}))
    with pytest.raises(ValueError, match="unknown model_type 'gpt_neox'.*llama"):
        AutoModel.from_pretrained(tmp_path)


def test_missing_shard_is_an_error(tmp_path, lm_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path, max_shard_bytes=30_000)
    shard = sorted(tmp_path.glob("model-00002-of-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(ValueError, match=f"shard {shard.name} .* does not exist"):
        AutoModel.from_pretrained(tmp_path)


def test_from_config_and_registry(lm_config, encoder_config):
    assert type(AutoModel.from_config(lm_config())) is AutoRegressiveLM
    assert type(AutoModel.from_config(encoder_config())) is EmbeddingEncoder
    assert AutoModel.list_registered() == ["autoregressive_lm", "embedding"]
