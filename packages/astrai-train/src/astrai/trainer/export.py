"""Export a finished run as a servable model folder: weights (LoRA adapters merged), config and tokenizer.

The run file's `output: DIR` names the folder; `astrai train` writes it after training from the run's latest
checkpoint, so it works whatever the executor was (the weights of a multi-process run live only in its
checkpoints). The folder is what `AutoModel.from_pretrained`, `astrai generate` and `astrai serve` read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from astrai.model import AutoModel
from astrai.serialization import ADAPTER_CONFIG_FILE
from astrai.trainer.lora import load_lora, merge_lora
from astrai.trainer.run_file import build_model, run_path


def export_model(run: dict[str, Any], base_dir: str | Path, checkpoint: str | Path) -> Path:
    """Write the model of `checkpoint` (plus the run's tokenizer) to the run's `output` folder."""
    base_dir, checkpoint = Path(base_dir), Path(checkpoint)
    output = run_path(base_dir, run["output"], "output")
    if (checkpoint / ADAPTER_CONFIG_FILE).exists():
        if "pretrained" not in (run.get("model") or {}):
            raise ValueError("output: exporting LoRA adapters needs the base weights in model.pretrained")
        model = build_model(run["model"], base_dir)
        load_lora(model, checkpoint)
        merge_lora(model)
    else:
        model = AutoModel.from_pretrained(checkpoint)
    tokenizer = None
    if run.get("tokenizer") is not None:
        from astrai.tokenize import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(run_path(base_dir, run["tokenizer"], "tokenizer"))
    # with the tokenizer, save_pretrained writes its files and its special-token ids (generation_config.json)
    model.save_pretrained(output, tokenizer=tokenizer)
    return output
