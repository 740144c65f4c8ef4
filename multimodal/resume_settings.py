"""Which settings a resumed run may change, and which it must keep.

A resume (`salamandra-vl fit --ckpt_path ...`) restores the weights, the optimizer and schedule
state, the step and the data position. Settings that only say where to write, how often, or how
fast (export directory, logger, max_steps, checkpoint cadence, gradient checkpointing, compiling,
the attention kernel) are taken from the resumed run's own flags. Settings the restored state
depends on are fixed by the checkpoint: the architecture and tokenizer (the weights' shapes and
meaning), the trained modules and optimizer settings (the optimizer state's groups; the schedule
restores its base learning rates and would silently ignore new ones), and the data layout the
saved position points into. A resumed run that asks to change one of those is refused with
`ResumeMismatch`, naming each setting, instead of quietly running with either value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from multimodal.data.resume import ResumeMismatch

# VLMModule's hyperparameters (model spec, stage, export_dir) that a resumed run may set anew.
MAY_CHANGE = {"export_dir", "model.init_from", "model.decoder_options.attention",
              "stage.gradient_checkpointing", "stage.compile", "stage.frozen_dtype"}
# DataConfig fields that do not move the data position (how bad samples are budgeted, whether to
# resume the data at all, how far rows are padded).
DATA_MAY_CHANGE = {"resume", "max_skip_fraction", "skip_budget_min_samples", "trim_rows"}


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and other values stay whole."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def normalized(value: Any) -> Any:
    """Tuples and lists compare alike (YAML gives lists, dataclasses may hold tuples)."""
    if isinstance(value, (list, tuple)):
        return [normalized(v) for v in value]
    if isinstance(value, Mapping):
        return {k: normalized(v) for k, v in value.items()}
    return value


def changed(given: Mapping[str, Any], saved: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Every flattened setting whose value differs: name -> (saved, given)."""
    flat_given, flat_saved = flatten(given), flatten(saved)
    return {name: (flat_saved.get(name), flat_given.get(name))
            for name in sorted(set(flat_given) | set(flat_saved))
            if normalized(flat_given.get(name)) != normalized(flat_saved.get(name))}


def mismatch_message(what: str, differences: Mapping[str, tuple[Any, Any]], remedy: str) -> str:
    lines = [f"  {name}: the checkpoint has {saved!r}, this run asks for {given!r}"
             for name, (saved, given) in differences.items()]
    return (f"cannot resume with other {what} than the checkpoint's:\n" + "\n".join(lines) + f"\n{remedy}")


def check_model_settings(given: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """ResumeMismatch when a resumed run asks for another value of a model setting outside
    MAY_CHANGE. When it does not, the given settings are the checkpoint's but for those that may
    change: the resumed run uses them as given."""
    fixed = {name: values for name, values in changed(given, saved).items()
             if not any(name == key or name.startswith(key + ".") for key in MAY_CHANGE)}
    if fixed:
        raise ResumeMismatch(mismatch_message(
            "model settings", fixed,
            "These are fixed by the checkpoint's weights and optimizer state. Resume with the settings it was "
            "saved with, or start a new run from its weights (model.model.init_from) instead of --ckpt_path."))


def check_data_layout(given: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """ResumeMismatch when the training data's settings differ from those the saved data position
    was taken with (DATA_MAY_CHANGE aside)."""
    differences = {name: values for name, values in changed(given, saved).items()
                   if name.split(".")[0] not in DATA_MAY_CHANGE}
    if differences:
        raise ResumeMismatch(mismatch_message(
            "training data settings", differences,
            "The checkpoint's data position (shards, offsets, shuffle and packing buffers) is only valid for "
            "the data it was taken on. Resume with the same data settings, or set data.train.resume: false to "
            "start the epoch's data afresh with the new ones (what the epoch already saw will be seen again)."))
