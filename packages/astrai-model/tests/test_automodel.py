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


@pytest.mark.parametrize("escape", ["../outside.safetensors", "ABSOLUTE", "link.safetensors"])
def test_an_index_naming_shards_outside_the_folder_is_refused(tmp_path, lm_config, escape):
    folder = tmp_path / "model"
    AutoRegressiveLM(lm_config()).save_pretrained(folder, max_shard_bytes=30_000)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = sorted(folder.glob("model-00002-of-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    victim.rename(outside)  # a readable safetensors file, just not in the folder
    if escape == "ABSOLUTE":
        escape = str(outside)
    elif escape == "link.safetensors":
        (folder / escape).symlink_to(outside)
    index["weight_map"] = {n: escape if f == victim.name else f for n, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="is outside the model folder; shards must be files inside it"):
        AutoModel.from_pretrained(folder)


def test_a_device_the_machine_lacks_is_a_value_error(tmp_path, lm_config):
    AutoRegressiveLM(lm_config()).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device 'gpu0' is not a torch device"):
        AutoModel.from_pretrained(tmp_path, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': CUDA is not available on this machine"):
            AutoModel.from_pretrained(tmp_path, device="cuda")


def test_from_config_and_registry(lm_config, encoder_config):
    assert type(AutoModel.from_config(lm_config())) is AutoRegressiveLM
    assert type(AutoModel.from_config(encoder_config())) is EmbeddingEncoder
    assert AutoModel.list_registered() == ["autoregressive_lm", "embedding"]


def test_register_and_get_component_class_take_model_type(lm_config):
    """Architecture document: `AutoModel.register(model_type)`, `AutoModel.get_component_class(model_type)`."""
    assert AutoModel.get_component_class(model_type="autoregressive_lm") is AutoRegressiveLM

    class Toy(AutoModel):
        pass

    decorator = Toy.register(model_type="toy_lm", category="test", priority=1)
    assert decorator(AutoRegressiveLM) is AutoRegressiveLM
    assert Toy.get_component_class(model_type="toy_lm") is AutoRegressiveLM
    assert Toy.list_by_category("test") == ["toy_lm"] and not AutoModel.is_registered("toy_lm")


def test_from_pretrained_disable_random_init(tmp_path, lm_config, tokens, caplog):
    """`from_pretrained(path, disable_random_init, strict)`: with random init disabled (the default) every weight
    comes from the file; enabled, a non-strict load keeps the random init of the tensors the file lacks."""
    torch.manual_seed(0)
    model = AutoRegressiveLM(lm_config()).eval()
    model.save_pretrained(tmp_path)
    assert_bit_exact(model, AutoModel.from_pretrained(tmp_path, False, True), tokens(2, 9))  # positional, as documented
    assert_bit_exact(model, AutoModel.from_pretrained(tmp_path, disable_random_init=True, strict=True), tokens(2, 9))

    _rewrite_weights(tmp_path, lambda t: t.pop("layers.1.mlp.up.weight"))
    for disable_random_init, strict in [(True, True), (True, False), (False, True)]:
        with pytest.raises(ValueError, match=r"missing tensors \['layers.1.mlp.up.weight'\]"):
            AutoModel.from_pretrained(tmp_path, disable_random_init=disable_random_init, strict=strict)
    torch.manual_seed(1)
    with caplog.at_level("WARNING", logger="astrai.model.automodel"):
        loaded = AutoModel.from_pretrained(tmp_path, disable_random_init=False, strict=False, dtype=torch.bfloat16)
    assert "1 tensor(s) not in the checkpoint keep their random init: ['layers.1.mlp.up.weight']" in caplog.text
    up = loaded.layers[1].mlp.up.weight
    assert up.dtype == torch.bfloat16 and not torch.equal(up.float(), model.layers[1].mlp.up.weight.bfloat16().float())
    assert abs(up.float().std().item() - 0.02) < 0.005  # Linear's own N(0, 0.02) init
    assert torch.equal(loaded.layers[1].mlp.down.weight, model.layers[1].mlp.down.weight.bfloat16())


def test_untied_model_loads_a_tied_checkpoint(tmp_path, lm_config, tokens, caplog):
    """original-behaviour.md 3.9: an untied model loading a tied state dict starts its LM head as a copy of the
    embedding (a clone: the two stay separate Parameters)."""
    torch.manual_seed(0)
    tied = AutoRegressiveLM(lm_config(tie_weight=True)).eval()
    untied = AutoRegressiveLM(lm_config()).eval()
    with caplog.at_level("WARNING", logger="astrai.model.transformer"):
        untied.load_state_dict(tied.state_dict())
    assert "no lm_head.weight (a tied checkpoint)" in caplog.text
    assert torch.equal(untied.lm_head.weight, tied.embed_tokens.weight)
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(untied(tokens(2, 9))["logits"], tied(tokens(2, 9))["logits"])

    # the same through from_pretrained: a tied checkpoint whose config.json was edited to untie the head
    tied.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"tie_weight": False}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="astrai.model.transformer"):
        loaded = AutoModel.from_pretrained(tmp_path)
    assert f"{tmp_path / 'model.safetensors'}: no lm_head.weight" in caplog.text
    assert loaded.lm_head.weight is not loaded.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, tied.embed_tokens.weight)
    assert len(list(loaded.parameters())) == len(loaded.state_dict())
