"""PEFTConfig: ``adapter_config.json`` of a HF PEFT LoRA adapter, parsed and validated, with the
per-module rank/alpha/scaling rules PEFT applies (vLLM calls this PEFTHelper).

Module names are PEFT's, relative to the base model (``model.layers.0.self_attn.q_proj``).
Matching follows peft.tuners.tuners_utils.check_target_module_exists and
peft.utils.other.get_pattern_key, so a module targeted in PyTorch is targeted here.
Imports jlora.errors and jlora.config only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

from jlora.config import LoRAConfig
from jlora.errors import AdapterConfigError

CONFIG_NAME = "adapter_config.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class PEFTConfig:
    """The LoRA fields of a PEFT ``adapter_config.json``; unknown keys are ignored.

    >>> cfg = PEFTConfig.from_dict({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
    2.0
    """

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: Mapping[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = dataclasses.field(default_factory=dict)
    layers_to_transform: tuple[int, ...] | None = None
    layers_pattern: tuple[str, ...] | None = None
    fan_in_fan_out: bool = False
    peft_type: str = "LORA"
    base_model_name_or_path: str | None = None
    source: str = "<dict>"  # where the config came from, for error messages

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, source: str = "<dict>") -> PEFTConfig:
        """Parses a config dict; every missing or mistyped field is reported in one error."""
        if not isinstance(raw, Mapping):
            raise AdapterConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
        problems = [
            f"missing required field {k!r}"
            for k in ("r", "lora_alpha", "target_modules")
            if raw.get(k) is None
        ]
        if problems:
            raise AdapterConfigError(
                f"{source}: " + "; ".join(problems) + " (is this a PEFT LoRA adapter_config.json?)"
            )
        targets = raw["target_modules"]
        if isinstance(targets, list | tuple):
            targets = tuple(str(t) for t in targets)
        elif not isinstance(targets, str):
            raise AdapterConfigError(
                f"{source}: target_modules must be a list of names or a regex string, "
                f"got {targets!r}"
            )
        layers = raw.get("layers_to_transform")
        if isinstance(layers, int):
            layers = (layers,)
        pattern = raw.get("layers_pattern")
        if isinstance(pattern, str):
            pattern = (pattern,)
        try:
            return cls(
                r=raw["r"],
                lora_alpha=raw["lora_alpha"],
                target_modules=targets,
                bias=raw.get("bias") or "none",
                modules_to_save=tuple(raw.get("modules_to_save") or ()),
                use_rslora=bool(raw.get("use_rslora", False)),
                use_dora=bool(raw.get("use_dora", False)),
                rank_pattern=dict(raw.get("rank_pattern") or {}),
                alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                layers_to_transform=tuple(layers) if layers else None,
                layers_pattern=tuple(pattern) if pattern else None,
                fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
                peft_type=str(raw.get("peft_type") or "LORA"),
                base_model_name_or_path=raw.get("base_model_name_or_path"),
                source=source,
            )
        except (TypeError, ValueError) as e:
            raise AdapterConfigError(f"{source}: malformed field: {e}") from None

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PEFTConfig:
        """Reads ``<path>/adapter_config.json``."""
        file = os.path.join(os.fspath(path), CONFIG_NAME)
        if not os.path.isfile(file):
            raise AdapterConfigError(
                f"{file}: not found; a PEFT adapter directory holds adapter_config.json and "
                "adapter_model.safetensors (write them with PeftModel.save_pretrained)"
            )
        try:
            with open(file, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterConfigError(f"{file}: invalid JSON ({e}); re-save the adapter") from None
        return cls.from_dict(raw, source=file)

    # PEFT's rules, per module --------------------------------------------------------------

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would wrap ``module_name`` (suffix list or full-match regex, with
        ``layers_to_transform``)."""
        return matches_target(
            module_name, self.target_modules, self.layers_to_transform, self.layers_pattern
        )

    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        """``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA, after rank/alpha pattern overrides."""
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    @property
    def max_rank(self) -> int:
        return max([self.r, *self.rank_pattern.values()])

    def validate_legal(self, config: LoRAConfig | None = None) -> None:
        """Raises one ``AdapterConfigError`` listing every problem that stops jlora serving this
        adapter under ``config``."""
        problems = []
        if self.peft_type.upper() != "LORA":
            problems.append(f"peft_type is {self.peft_type!r}; only LORA adapters are served")
        for name, r in [
            ("r", self.r),
            *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items()),
        ]:
            if not _is_int(r) or r <= 0:
                problems.append(f"{name} must be a positive int, got {r!r}")
            elif config is not None and r > config.max_lora_rank:
                problems.append(
                    f"{name}={r} exceeds max_lora_rank={config.max_lora_rank}; "
                    "raise LoRAConfig.max_lora_rank"
                )
        for name, a in [
            ("lora_alpha", self.lora_alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if isinstance(a, bool) or not isinstance(a, int | float) or not a > 0:
                problems.append(f"{name} must be a positive number, got {a!r}")
        if self.modules_to_save:
            problems.append(
                f"modules_to_save={list(self.modules_to_save)} holds fully trained modules, which "
                "multi-LoRA serving cannot swap per request; merge them into the base model"
            )
        if self.use_dora:
            problems.append("use_dora=True (DoRA) is not supported; merge the adapter instead")
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r} is not one of 'none', 'all', 'lora_only'")
        elif self.bias != "none" and (config is None or not config.bias_enabled):
            problems.append(
                f"bias={self.bias!r} needs LoRAConfig(bias_enabled=True): the adapter trained "
                "a bias"
            )
        if isinstance(self.target_modules, str):
            try:
                re.compile(self.target_modules)
            except re.error as e:
                problems.append(f"target_modules regex {self.target_modules!r} is invalid: {e}")
        elif not self.target_modules:
            problems.append("target_modules is empty")
        if problems:
            raise AdapterConfigError(
                f"{self.source}: adapter cannot be served: " + "; ".join(problems)
            )


def matches_target(
    module_name: str,
    target_modules: tuple[str, ...] | str,
    layers_to_transform: tuple[int, ...] | None = None,
    layers_pattern: tuple[str, ...] | None = None,
) -> bool:
    """PEFT's ``check_target_module_exists``: a regex string must match the whole name; a list
    matches a name equal to an entry or ending in ``.<entry>``, optionally restricted to layer
    indices."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    found = module_name in target_modules or any(
        module_name.endswith(f".{t}") for t in target_modules
    )
    if not found or not layers_to_transform:
        return found
    match = None
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match:
                break
    return match is not None and int(match.group("idx")) in layers_to_transform


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default):
    # PEFT's get_pattern_key: the first key that matches a dotted suffix of the name wins.
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
