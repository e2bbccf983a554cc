"""`AutoModel`: the model registry by `model_type`, and loading/saving model folders.

A model folder is `config.json` (always with `model_type`) plus safetensors weights (`model.safetensors`,
or shards with `model.safetensors.index.json`). `AutoModel.from_pretrained` also reads a Hugging Face
checkpoint folder when its `model_type` has a converter in `astrai.model.hf` (llama, mistral, qwen2, qwen3,
...): the config and the tensor names are converted on load. `generation_config.json` (the special-token
ids, see `generation_config.py`) is kept as `model.generation_config` and written back by `save_pretrained`,
which also writes the tokenizer it is given: a folder it writes is complete for us and for transformers.

Loading never runs random init and never leaves a weight uninitialised: the model is built on the meta
device (`disable_random_init=True`, the default: the architecture document's "no random init on load"), every
tensor is checked against the model's own names and shapes (ValueError naming the tensors and the file
otherwise), and the loaded tensors are assigned in place of the meta parameters. Only a model built with its
random init (`disable_random_init=False`) and loaded with `strict=False` may lack tensors in the checkpoint:
those keep their random initialisation, and a warning names them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from astrai.config import BaseModelConfig, ConfigFactory, read_json_object
from astrai.factory import BaseFactory
from astrai.model import hf
from astrai.model.generation_config import (
    TOKEN_ID_KEYS,
    SpecialTokenSource,
    generation_config_with,
    read_generation_config,
    write_generation_config,
)
from astrai.model.weight_files import load_weight_files, save_weight_files, weights_source

logger = logging.getLogger(__name__)


class AutoModel(nn.Module, BaseFactory[nn.Module]):
    """Base of every model class; `AutoModel.register("model_type")` makes a class loadable by name."""

    kind = "model"

    def __init__(self, config: BaseModelConfig) -> None:
        nn.Module.__init__(self)
        self.config = config
        # generation_config.json of the folder it came from (token ids, sampling defaults); {} when built
        self.generation_config: dict[str, Any] = {}

    @classmethod
    def register(
        cls, model_type: str, category: str | None = None, priority: int = 0
    ) -> Callable[[type[AutoModel]], type[AutoModel]]:
        """Class decorator: `AutoModel.from_pretrained` builds the class for folders whose config has `model_type`."""
        return super().register(model_type, category, priority)

    @classmethod
    def get_component_class(cls, model_type: str) -> type[AutoModel]:
        """The model class registered for `model_type`; ValueError listing the registered ones otherwise."""
        return super().get_component_class(model_type)

    @classmethod
    def from_config(cls, config: BaseModelConfig) -> AutoModel:
        """A randomly initialised model of the class registered for `config.model_type`."""
        return cls._model_class(config)(config)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        disable_random_init: bool = True,
        strict: bool = True,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> AutoModel:
        """Load a model folder (ours or Hugging Face's) in eval mode.

        disable_random_init: build the model without running its random init (on the meta device); every
            weight then comes from the checkpoint. False builds it randomly initialised (on CPU) first.
        strict: when False, tensors the model does not have are ignored, and with `disable_random_init=False`
            tensors the checkpoint lacks keep their random init (logged); missing ones are an error otherwise.
        dtype: cast floating-point weights to it (default: keep the stored dtype).
        device: where the weights are loaded (default CPU).
        """
        folder = Path(path)
        raw = read_json_object(folder / "config.json")
        model_type = raw.get("model_type")
        if model_type is None or cls.is_registered(model_type):
            config = _with_path(folder, lambda: ConfigFactory.load(raw))
            generation = read_generation_config(folder)
            tensors = load_weight_files(folder, device)
        elif hf.HFConverterFactory.is_registered(model_type):
            converter = hf.HFConverterFactory.create(model_type)
            config = _with_path(folder, lambda: converter.config_from_hf(raw))
            generation = read_generation_config(folder, hf_config=raw)
            tensors = converter.state_dict_from_hf(load_weight_files(folder, device), config)
        else:
            raise ValueError(
                f"{folder / 'config.json'}: unknown model_type {model_type!r}; astrai models: "
                f"{cls.list_registered()}, Hugging Face families: {hf.HFConverterFactory.list_registered()}"
            )
        with torch.device("meta" if disable_random_init else "cpu"):
            model = cls._model_class(config)(config)
        model.load_weights(tensors, source=weights_source(folder), dtype=dtype, strict=strict)
        model.generation_config = generation
        return model.eval()

    @classmethod
    def _model_class(cls, config: BaseModelConfig) -> type[AutoModel]:
        model_cls = cls.get_component_class(config.model_type)
        if not issubclass(model_cls, cls):
            raise ValueError(f"model_type {config.model_type!r} builds a {model_cls.__name__}, not a {cls.__name__}")
        return model_cls

    def load_weights(
        self,
        tensors: dict[str, Tensor],
        source: str | Path = "state dict",
        dtype: torch.dtype | None = None,
        strict: bool = True,
    ) -> None:
        """Check `tensors` against this model's names and shapes, then assign them (works on a meta model).

        Without `strict`, tensors the model lacks are ignored, and tensors `tensors` lacks keep this model's
        own values, which must exist (not meta): a warning names them."""
        tensors = self._complete_state_dict(tensors, source)
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        wrong_shape = [
            f"{name}: file {tuple(t.shape)} vs model {tuple(own[name].shape)}"
            for name, t in tensors.items()
            if name in own and t.shape != own[name].shape
        ]
        problems = []
        if missing and (strict or any(own[name].is_meta for name in missing)):
            problems.append(f"missing tensors {missing}")
        if unexpected and strict:
            problems.append(f"unexpected tensors {unexpected}")
        if wrong_shape:
            problems.append(f"wrong shapes [{'; '.join(wrong_shape)}]")
        if problems:
            raise ValueError(f"{source}: cannot load into {type(self).__name__}: {', '.join(problems)}")
        state = {
            name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
            for name, t in tensors.items()
            if name in own
        }
        if missing:
            logger.warning(
                "%s: %d tensor(s) not in the checkpoint keep their random init: %s", source, len(missing), missing
            )
            device = next(iter(state.values())).device if state else None
            for name in missing:  # the model's own values, moved and cast like the loaded ones
                t = own[name]
                state[name] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
        self.load_state_dict(state, strict=True, assign=True)
        left_on_meta = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        assert not left_on_meta, f"tensors not covered by the state dict stayed on meta: {left_on_meta}"

    def _complete_state_dict(self, tensors: dict[str, Tensor], source: str | Path = "state dict") -> dict[str, Tensor]:
        """`tensors` with what this model can derive from them added (a model class overrides it; default: as is)."""
        return tensors

    def save_pretrained(
        self,
        save_directory: str | Path,
        format: Literal["astrai", "hf"] = "astrai",
        max_shard_bytes: int | None = None,
        *,
        tokenizer: SpecialTokenSource | None = None,
    ) -> None:
        """Write `config.json`, safetensors weights and `generation_config.json`; `format="hf"` writes a
        transformers checkpoint instead.

        tokenizer: written to the folder too (tokenizer.json, tokenizer_config.json, special_tokens_map.json),
            and its bos / eos / pad ids go into generation_config.json (eos: all its stop ids) and, for
            `format="hf"`, config.json. Without it the ids the model was loaded with are written, if any.
        """
        folder = Path(save_directory)
        generation = generation_config_with(self.generation_config, tokenizer, getattr(self.config, "vocab_size", None))
        if format == "hf":
            config_dict, tensors = hf.export_hf(self.config, self.state_dict())
            # Unknown ids are written as null: transformers' family defaults (Llama: bos 1, eos 2) would be wrong.
            config_dict.update({key: generation.get(key) for key in TOKEN_ID_KEYS})
            if tokenizer is None:
                logger.warning("save_pretrained(format='hf') without tokenizer=: the folder has no tokenizer files")
        elif format == "astrai":
            config_dict, tensors = None, self.state_dict()
        else:
            raise ValueError(f"save_pretrained format={format!r}: allowed 'astrai' or 'hf'")
        folder.mkdir(parents=True, exist_ok=True)
        if config_dict is None:
            self.config.to_file(folder / "config.json")
        else:
            (folder / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
        save_weight_files(tensors, folder, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        write_generation_config(folder, generation)


def _with_path(folder: Path, build: Callable[[], BaseModelConfig]) -> BaseModelConfig:
    """Run a config builder, prefixing its ValueError with the config file's path."""
    try:
        return build()
    except ValueError as exc:
        raise ValueError(f"{folder / 'config.json'}: {exc}") from None
