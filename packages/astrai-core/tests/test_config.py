import dataclasses
import json
from typing import Literal

import pytest

from astrai.config import (
    AutoRegressiveLMConfig,
    BaseConfig,
    BaseModelConfig,
    ConfigFactory,
    EncoderConfig,
    LoRAConfig,
    TrainConfig,
    coerce,
    live_field,
)
from astrai.factory import BaseFactory

TINY = dict(vocab_size=100, dim=64, n_layers=2, n_heads=4, dim_ffn=128, max_len=256)


@dataclasses.dataclass
class Sample(BaseConfig):
    count: int = 1
    ratio: float = 0.5
    flag: bool = False
    name: str = "x"
    maybe: int | None = None
    sizes: list[int] = dataclasses.field(default_factory=list)
    pair: tuple[int, float] = (1, 2.0)
    table: dict[str, int] = dataclasses.field(default_factory=dict)
    mode: Literal["a", "b"] = "a"
    thing: object = live_field(default=None)


# --- coercion ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,raw,expected",
    [
        ("count", "64", 64),
        ("count", 3.0, 3),
        ("ratio", "0.25", 0.25),
        ("ratio", 2, 2.0),
        ("flag", "true", True),
        ("flag", "off", False),
        ("maybe", None, None),
        ("maybe", "7", 7),
        ("sizes", ["1", 2.0], [1, 2]),
        ("pair", ["3", "4.5"], (3, 4.5)),
        ("table", {"a": "1"}, {"a": 1}),
        ("mode", "b", "b"),
    ],
)
def test_from_dict_coerces(field, raw, expected):
    value = getattr(Sample.from_dict({field: raw}), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "field,raw",
    [
        ("count", "sixty"),
        ("count", 2.5),
        ("count", True),
        ("ratio", "nan"),
        ("ratio", False),
        ("flag", 1),
        ("flag", "maybe"),
        ("name", 5),
        ("sizes", "1,2"),
        ("sizes", [1, "x"]),
        ("pair", [1]),
        ("table", [1]),
        ("mode", "c"),
    ],
)
def test_from_dict_rejects_uncoercible(field, raw):
    with pytest.raises(ValueError, match=f"Sample.{field}"):
        Sample.from_dict({field: raw})


def test_constructor_also_coerces_and_validates():
    assert Sample(count="5").count == 5
    with pytest.raises(ValueError, match="Sample.count"):
        Sample(count="five")


def test_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['cuont'\]"):
        Sample.from_dict({"cuont": 1})
    with pytest.raises(ValueError, match="expects a dict"):
        Sample.from_dict([("count", 1)])


def test_to_dict_round_trip_skips_live_fields():
    s = Sample(count=2, sizes=[1, 2], pair=(3, 4.0), thing=object())
    d = s.to_dict()
    assert "thing" not in d and d["pair"] == [3, 4.0]
    json.dumps(d)
    assert Sample.from_dict(d) == dataclasses.replace(s, thing=None)


def test_live_field_keeps_object_untouched():
    marker = object()
    assert Sample(thing=marker).thing is marker


def test_replace_validates():
    s = Sample()
    assert s.replace(count="9").count == 9
    with pytest.raises(ValueError):
        s.replace(count="nine")


def test_coerce_unchecked_annotation_keeps_value():
    marker = object()
    assert coerce(marker, "SomeForwardRef", "x") is marker


def test_coerce_union_reports_each_option():
    with pytest.raises(ValueError, match="matches none of"):
        coerce("x", int | float, "field")


# --- model configs ----------------------------------------------------------------------------------------


def test_lm_defaults_and_derived_fields():
    cfg = AutoRegressiveLMConfig(**TINY)
    assert cfg.model_type == "autoregressive_lm"
    assert cfg.n_kv_heads == 4 and cfg.head_dim == 16 and cfg.rope_dim == 16
    assert cfg.attn_type == "gqa" and cfg.ffn_type == "mlp" and cfg.tie_weight is False


def test_lm_every_architecture_field_exists():
    names = {f.name for f in dataclasses.fields(AutoRegressiveLMConfig)}
    required = {
        "vocab_size",
        "dim",
        "n_layers",
        "norm_eps",
        "dim_ffn",
        "tie_weight",
        "rope_scaling",
        "max_len",
        "rope_theta",
        "attn_type",
        "n_heads",
        "n_kv_heads",
        "use_qk_norm",
        "use_gated_attention",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "ffn_type",
        "n_routed_experts",
        "n_shared_experts",
        "n_activated_experts",
        "topk_method",
        "q_lora_rank",
        "v_head_dim",
        "attn_bias",
        "norm_topk_prob",
        "routed_scaling_factor",
        "dim_ffn_expert",
        "n_dense_layers",
        "n_group",
        "topk_group",
        "aux_loss_coef",
    }
    assert required <= names
    enc = {f.name for f in dataclasses.fields(EncoderConfig)}
    assert {"pooling_type", "normalize_embeddings", "rope_scaling", "use_qk_norm", "n_kv_heads"} <= enc


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(dim=65), "dim"),
        (dict(n_kv_heads=3), "n_kv_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(max_len=None), "max_len"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(head_dim=15), "head_dim"),
        (dict(attn_type="flash"), "attn_type"),
        (dict(ffn_type="glu"), "ffn_type"),
        (dict(rope_scaling={"rope_type": "weird", "factor": 2.0}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "linear"}), "rope_scaling"),
        (dict(rope_scaling={"type": "linear", "factor": -1}), "rope_scaling"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 4.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 64,
                }
            ),
            "rope_scaling",
        ),
        (dict(dim="sixty-four"), "dim"),
    ],
)
def test_lm_invalid_shapes_name_field_and_value(changes, field):
    with pytest.raises(ValueError, match=rf"AutoRegressiveLMConfig\.{field}"):
        AutoRegressiveLMConfig(**{**TINY, **changes})


@pytest.mark.parametrize(
    "scaling",
    [
        {"rope_type": "linear", "factor": 2.0},
        {"type": "dynamic", "factor": 2},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "default"},
    ],
)
def test_lm_rope_scaling_kinds_accepted(scaling):
    assert AutoRegressiveLMConfig(**TINY, rope_scaling=scaling).rope_scaling == scaling


def test_explicit_head_dim_allows_indivisible_dim():
    cfg = AutoRegressiveLMConfig(**{**TINY, "dim": 60, "head_dim": 32})
    assert cfg.head_dim == 32


MLA = dict(attn_type="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8)


def test_mla_config():
    cfg = AutoRegressiveLMConfig(**TINY, **MLA, q_lora_rank=24)
    assert cfg.v_head_dim == 16 and cfg.rope_dim == 8


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(kv_lora_rank=None), "kv_lora_rank"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
        (dict(q_lora_rank=0), "q_lora_rank"),
        (dict(v_head_dim=-2), "v_head_dim"),
        (dict(attn_bias=True), "attn_bias"),
    ],
)
def test_mla_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"\.{field}"):
        AutoRegressiveLMConfig(**TINY, **{**MLA, **changes})


MOE = dict(ffn_type="moe", n_routed_experts=8, n_activated_experts=2, n_shared_experts=1)


def test_moe_config():
    cfg = AutoRegressiveLMConfig(**TINY, **MOE, topk_method="noaux_tc", n_group=4, topk_group=2, n_dense_layers=1)
    assert cfg.topk_method == "noaux_tc" and cfg.dim_ffn_expert is None


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(n_routed_experts=None), "n_routed_experts"),
        (dict(n_activated_experts=9), "n_activated_experts"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(topk_method="random"), "topk_method"),
        (dict(topk_method="noaux_tc"), "n_group"),
        (dict(topk_method="group_limited_greedy", n_group=3, topk_group=1), "n_group"),
        (dict(topk_method="noaux_tc", n_group=4, topk_group=5), "topk_group"),
        (
            dict(topk_method="group_limited_greedy", n_group=4, topk_group=1, n_activated_experts=3),
            "n_activated_experts",
        ),
        (dict(topk_method="noaux_tc", n_group=8, topk_group=2), "n_group"),
        (dict(n_dense_layers=3), "n_dense_layers"),
        (dict(dim_ffn_expert=0), "dim_ffn_expert"),
        (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
        (dict(aux_loss_coef=-0.1), "aux_loss_coef"),
    ],
)
def test_moe_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"\.{field}"):
        AutoRegressiveLMConfig(**TINY, **{**MOE, **changes})


@pytest.fixture
def isolated_kinds(monkeypatch):
    """Factories declared inside a test must not replace real ones for other tests."""
    from astrai.factory import factory as factory_module

    monkeypatch.setattr(factory_module, "_FACTORIES_BY_KIND", dict(factory_module._FACTORIES_BY_KIND))


def test_user_registered_attention_is_accepted(isolated_kinds):
    class MyAttnFactory(BaseFactory[object]):
        kind = "attention"

    MyAttnFactory.register("linear_attn")(object)
    assert AutoRegressiveLMConfig(**TINY, attn_type="linear_attn").attn_type == "linear_attn"


def test_encoder_config():
    cfg = EncoderConfig(**TINY, pooling_type="cls", normalize_embeddings=True)
    assert cfg.model_type == "embedding" and cfg.pooling_type == "cls"
    with pytest.raises(ValueError, match=r"EncoderConfig\.pooling_type='max'"):
        EncoderConfig(**TINY, pooling_type="max")
    with pytest.raises(ValueError, match=r"EncoderConfig\.head_dim"):
        EncoderConfig(**{**TINY, "head_dim": 9})


def test_to_file_from_file_round_trip_writes_model_type(tmp_path):
    for cfg in (AutoRegressiveLMConfig(**TINY, **MLA), EncoderConfig(**TINY)):
        path = tmp_path / "config.json"
        cfg.to_file(path)
        raw = json.loads(path.read_text())
        assert raw["model_type"] == cfg.model_type
        assert None not in raw.values()
        assert type(cfg).from_file(path) == cfg
        assert ConfigFactory.load(raw) == cfg


def test_from_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        AutoRegressiveLMConfig.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        AutoRegressiveLMConfig.from_file(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        AutoRegressiveLMConfig.from_file(bad)
    bad.write_text(json.dumps({**TINY, "dim": 63}))
    with pytest.raises(ValueError, match=r"bad.json: AutoRegressiveLMConfig\.dim"):
        AutoRegressiveLMConfig.from_file(bad)


def test_config_factory_dispatch():
    assert isinstance(ConfigFactory.load(dict(TINY)), AutoRegressiveLMConfig)
    assert isinstance(ConfigFactory.load({**TINY, "model_type": None}), AutoRegressiveLMConfig)
    assert isinstance(ConfigFactory.load({**TINY, "model_type": "embedding"}), EncoderConfig)
    assert ConfigFactory.list_registered() == ["autoregressive_lm", "embedding"]
    with pytest.raises(ValueError, match="unknown model config 'llama'"):
        ConfigFactory.load({**TINY, "model_type": "llama"})
    with pytest.raises(ValueError, match="must be a dict"):
        ConfigFactory.load("autoregressive_lm")


def test_base_model_config_plain():
    cfg = BaseModelConfig()
    assert cfg.model_type is None and cfg.to_dict() == {"model_type": None}


# --- training config --------------------------------------------------------------------------------------


def _train(**changes):
    base = dict(model=object(), strategy="sft", dataset=[1, 2], optimizer_fn=lambda m: None)
    return TrainConfig(**{**base, **changes})


def test_train_config_defaults():
    cfg = _train()
    assert cfg.n_epoch == 1 and cfg.batch_per_device == 4 and cfg.metrics == ["loss", "lr"]
    assert cfg.scheduler_fn is None and cfg.lora is None and cfg.master_port is None
    assert cfg.keep_checkpoints is None and _train(keep_checkpoints=1).keep_checkpoints == 1


def test_train_config_every_architecture_field_exists():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    expected = {
        "model",
        "strategy",
        "dataset",
        "optimizer_fn",
        "scheduler_fn",
        "n_epoch",
        "batch_per_device",
        "grad_accum_steps",
        "max_grad_norm",
        "gradient_checkpointing_modules",
        "start_epoch",
        "start_batch",
        "ckpt_dir",
        "ckpt_interval",
        "log_dir",
        "log_interval",
        "metrics",
        "lora",
        "random_seed",
        "num_workers",
        "prefetch_factor",
        "pin_memory",
        "nprocs",
        "backend",
        "master_addr",
        "master_port",
        "start_method",
        "device_type",
        "val_dataset",
        "val_step",
        "parallel_mode",
        "executor_kwargs",
        "extra_kwargs",
    }
    assert expected <= names


@pytest.mark.parametrize("field", ["model", "strategy", "dataset", "optimizer_fn"])
def test_train_config_required(field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}=None: is required"):
        _train(**{field: None})


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(n_epoch=0), "n_epoch"),
        (dict(batch_per_device=0), "batch_per_device"),
        (dict(grad_accum_steps=0), "grad_accum_steps"),
        (dict(nprocs=0), "nprocs"),
        (dict(log_interval=0), "log_interval"),
        (dict(start_epoch=-1), "start_epoch"),
        (dict(start_batch=-1), "start_batch"),
        (dict(num_workers=-1), "num_workers"),
        (dict(prefetch_factor=2), "prefetch_factor"),
        (dict(prefetch_factor=0, num_workers=2), "prefetch_factor"),
        (dict(master_port="http"), "master_port"),
        (dict(master_port=70000), "master_port"),
        (dict(strategy="ppo"), "strategy"),
        (dict(parallel_mode="zero3"), "parallel_mode"),
        (dict(backend="mpi"), "backend"),
        (dict(device_type="tpu"), "device_type"),
        (dict(start_method="thread"), "start_method"),
        (dict(mixed_precision="fp8"), "mixed_precision"),
        (dict(metrics=["loss", "accuracy"]), "metrics"),
        (dict(optimizer_fn="adam"), "optimizer_fn"),
        (dict(scheduler_fn=3), "scheduler_fn"),
        (dict(nprocs=2), "parallel_mode"),
        (dict(batch_per_device="four"), "batch_per_device"),
        (dict(keep_checkpoints=0), "keep_checkpoints"),
        (dict(keep_checkpoints=2.5), "keep_checkpoints"),
        (dict(report_to=["tensorbord"]), "report_to"),
        (dict(report_to="comet"), "report_to"),
        (dict(report_to=["wandb", "wandb"]), "report_to"),
        (dict(report_to=["none", "wandb"]), "report_to"),
        (dict(report_to=[3]), "report_to"),
        (dict(run_name=" "), "run_name"),
    ],
)
def test_train_config_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        _train(**changes)


def test_train_config_report_to():
    assert _train().report_to == [] and _train().run_name is None
    assert _train(report_to="wandb").report_to == ["wandb"]  # one name, as a run file may write it
    assert _train(report_to="none").report_to == [] and _train(report_to=["none"]).report_to == []
    cfg = _train(report_to=["tensorboard", "wandb", "mlflow"], run_name="sft-1")
    assert TrainConfig.from_dict({**cfg.to_dict(), "model": 1, "dataset": [1], "optimizer_fn": len}).report_to == [
        "tensorboard",
        "wandb",
        "mlflow",
    ]
    with pytest.raises(
        ValueError, match=r"TrainConfig\.report_to='mlflw': allowed: \['tensorboard', 'wandb', 'mlflow'\]"
    ):
        _train(report_to=["mlflw"])


def test_train_config_port_int_becomes_str():
    assert _train(master_port=29501).master_port == "29501"


def test_train_config_to_dict_keeps_only_plain_values():
    cfg = _train(lora={"rank": 4}, extra_kwargs={"beta": 0.1})
    d = cfg.to_dict()
    for live in ("model", "dataset", "optimizer_fn", "scheduler_fn", "val_dataset", "gradient_checkpointing_modules"):
        assert live not in d
    assert d["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    json.dumps(d)
    rebuilt = TrainConfig.from_dict({**d, "model": cfg.model, "dataset": cfg.dataset, "optimizer_fn": cfg.optimizer_fn})
    assert rebuilt.lora == LoRAConfig(rank=4) and rebuilt.extra_kwargs == {"beta": 0.1}


def test_train_config_user_registered_strategy(isolated_kinds):
    class MyStrategyFactory(BaseFactory[object]):
        kind = "strategy"

    MyStrategyFactory.register("ppo")(object)
    assert _train(strategy="ppo").strategy == "ppo"


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(rank=0), "rank"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(target_modules=[]), "target_modules"),
    ],
)
def test_lora_config_invalid(changes, field):
    with pytest.raises(ValueError, match=rf"LoRAConfig\.{field}"):
        LoRAConfig(**changes)
