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

from jlora.config import LoRAConfig, is_int
from jlora.errors import AdapterConfigError

CONFIG_NAME = "adapter_config.json"
# PEFT LoRA options that change what the adapter computes at inference in ways a slot of A, B and
# a scale cannot hold; an adapter that sets one is refused rather than served wrong.
UNSUPPORTED = {
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies only after its invocation tokens",
    "layer_replication": "layer_replication builds a deeper model than the base",
    "target_parameters": "target_parameters adapts nn.Parameters (e.g. MoE experts), not layers",
    "trainable_token_indices": "trainable_token_indices retrains embedding rows",
    "use_qalora": "QALoRA pools its input features",
    "arrow_config": "Arrow routes between several adapters per token",
    "kasa_config": "KaSA truncates the base weight's singular values and scales between A and B",
    "monteclora_config": "MonteCLoRA samples its LoRA factors",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
}
# init_lora_weights values after which the adapter needs a base model PEFT rewrote (PiSSA and
# OLoRA subtract the initial B A, LoftQ quantizes, CorDA and LoRA-GA decompose): on the original
# base they are wrong. PEFT saves a converted one (path_initial_model_for_weight_conversion) with
# init_lora_weights=True. The others only seed A and B (MiCA from the base's SVD, with A = 0, so
# the base stays as it was; its forward is plain LoRA, PEFT 0.21's MiCALinearVariant).
_BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
_PLAIN_INITS = ("gaussian", "eva", "orthogonal", "mica")


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
    exclude_modules: tuple[str, ...] | str | None = None
    lora_bias: bool = False
    init_lora_weights: bool | str = True
    unsupported: Mapping[str, Any] = dataclasses.field(default_factory=dict)
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
        if isinstance(targets, list | tuple) and all(isinstance(t, str) for t in targets):
            targets = tuple(targets)
        elif not isinstance(targets, str):
            raise AdapterConfigError(
                f"{source}: target_modules must be a list of names or a regex string, "
                f"got {targets!r}"
            )

        def layers(v):  # PEFT writes a lone layer index unwrapped; 0 is a layer
            if v is None or v == []:
                return None
            v = [v] if is_int(v) else v
            if not isinstance(v, list | tuple) or not all(is_int(i) for i in v):
                raise TypeError("must be a layer index or a list of them")
            return tuple(int(i) for i in v)

        def patterns(v):  # ... and a lone layers_pattern string
            v = names(v)
            return ((v,) if v else None) if isinstance(v, str) else v or None

        def names(v):  # a list of names or a regex string
            if v is None or isinstance(v, str):
                return v
            if isinstance(v, list | tuple) and all(isinstance(t, str) for t in v):
                return tuple(v)
            raise TypeError("must be a list of names or a regex string")

        def init(v):  # true, false, or the name of an init method
            if v is None:
                return True
            if isinstance(v, bool | str):
                return v
            raise TypeError("must be true, false or the name of an init method")

        def flag(v):  # a JSON boolean; bool("false") would be True
            if v is None or isinstance(v, bool):
                return bool(v)
            raise TypeError("must be true or false (a JSON boolean)")

        # Field by field, so that a mistyped one is named in the error.
        parsers = {
            "bias": lambda v: v or "none",
            "modules_to_save": lambda v: (v,) if isinstance(v, str) else tuple(v or ()),
            "use_rslora": flag,
            "use_dora": flag,
            "rank_pattern": lambda v: dict(v or {}),
            "alpha_pattern": lambda v: dict(v or {}),
            "layers_to_transform": layers,
            "layers_pattern": patterns,
            "fan_in_fan_out": flag,
            "exclude_modules": lambda v: names(v) or None,
            "lora_bias": flag,
            "init_lora_weights": init,
            "peft_type": lambda v: str(v or "LORA"),
        }
        fields = {}
        for key, parse in parsers.items():
            try:
                fields[key] = parse(raw.get(key))
            except (TypeError, ValueError) as e:
                raise AdapterConfigError(
                    f"{source}: field {key!r} is malformed ({raw.get(key)!r}: {e})"
                ) from None
        try:
            return cls(
                r=raw["r"],
                lora_alpha=raw["lora_alpha"],
                target_modules=targets,
                unsupported={k: raw[k] for k in UNSUPPORTED if raw.get(k)},
                base_model_name_or_path=raw.get("base_model_name_or_path"),
                source=source,
                **fields,
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
        # ValueError: also an int past Python's digit limit, which is not a JSONDecodeError.
        except (ValueError, RecursionError) as e:
            raise AdapterConfigError(f"{file}: invalid JSON ({e}); re-save the adapter") from None
        return cls.from_dict(raw, source=file)

    # PEFT's rules, per module --------------------------------------------------------------

    def targets(self, module_name: str) -> bool:
        """Whether PEFT would wrap ``module_name`` (suffix list or full-match regex, with
        ``layers_to_transform``)."""
        return matches_target(
            module_name,
            self.target_modules,
            self.layers_to_transform,
            self.layers_pattern,
            self.exclude_modules,
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
            if not is_int(r) or r <= 0:
                problems.append(f"{name} must be a positive int, got {r!r}")
        for name, a in [
            ("lora_alpha", self.lora_alpha),
            *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items()),
        ]:
            if not _is_positive_finite(a):
                huge = isinstance(a, int) and not isinstance(a, bool) and abs(a) > 10**20
                shown = f"an int of {len(str(abs(a)))} digits" if huge else repr(a)
                problems.append(f"{name} must be a positive finite number, got {shown}")
        for field_name, patterns in (
            ("rank_pattern", self.rank_pattern),
            ("alpha_pattern", self.alpha_pattern),
        ):
            for key in patterns:
                try:
                    re.compile(_pattern_regex(key))
                except (re.error, TypeError) as e:
                    problems.append(f"{field_name} key {key!r} is not a valid regex: {e}")
        for key, value in self.unsupported.items():
            problems.append(f"{key}={value!r}: {UNSUPPORTED[key]}, which jlora does not serve")
        if self.modules_to_save:
            problems.append(
                f"modules_to_save={list(self.modules_to_save)} holds fully trained modules, which "
                "multi-LoRA serving cannot swap per request; merge them into the base model"
            )
        init = self.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            problems.append(
                f"init_lora_weights={init!r} trains against a base model PEFT rewrote at init, "
                "so on the original base it is wrong; convert it with PEFT "
                "(save_pretrained(path_initial_model_for_weight_conversion=...)), or, when "
                "serving that rewritten base model, set init_lora_weights to true"
            )
        elif isinstance(init, str) and init.lower() not in _PLAIN_INITS:
            problems.append(
                f"init_lora_weights={init!r} is not an init method jlora knows "
                f"({', '.join(_PLAIN_INITS)} only seed A and B; "
                f"{', '.join(_BASE_REWRITING_INITS)} rewrite the base); if it left the base "
                "weights untouched, set init_lora_weights to true"
            )
        if self.use_dora:
            problems.append(
                "use_dora=True (DoRA) is not supported; merge it with PEFT's merge_and_unload"
            )
        # bias='all' / 'lora_only' retrain the base model's own biases: the loader refuses the
        # tensors if the file holds any (a model without biases, like Llama, saves none).
        if self.bias not in ("none", "all", "lora_only"):
            problems.append(f"bias={self.bias!r} is not one of 'none', 'all', 'lora_only'")
        if self.lora_bias and (config is None or not config.bias_enabled):
            problems.append(
                "lora_bias=True: lora_B carries a bias, which multi-LoRA slots do not serve; "
                "load it with LoRAConfig(bias_enabled=True) to merge it (jlora.merge_adapter)"
            )
        if isinstance(self.exclude_modules, str):
            try:
                re.compile(self.exclude_modules)
            except re.error as e:
                problems.append(f"exclude_modules regex {self.exclude_modules!r} is invalid: {e}")
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
    exclude_modules: tuple[str, ...] | str | None = None,
) -> bool:
    """PEFT's ``check_target_module_exists``: a regex string must match the whole name; a list
    matches a name equal to an entry (whatever its layer) or ending in ``.<entry>``, optionally
    restricted to layer indices; ``exclude_modules`` (same two forms) wins over both."""
    if _listed(module_name, exclude_modules):
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module_name) is not None
    if module_name in target_modules:
        return True
    found = any(module_name.endswith(f".{t}") for t in target_modules)
    if not found or not layers_to_transform:
        return found
    match = None
    if not layers_pattern:  # as PEFT 0.21: none, [] or "" means any ([""] matches nothing)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
    else:
        for pattern in layers_pattern:
            # As PEFT 0.21: the pattern starts the name or follows a dot.
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
            if match:
                break
    return match is not None and int(match.group("idx")) in layers_to_transform


def _is_positive_finite(a) -> bool:
    if isinstance(a, bool) or not isinstance(a, int | float):
        return False
    try:
        return 0 < float(a) < math.inf  # an int beyond a float's range cannot scale
    except OverflowError:
        return False


def _listed(module_name: str, names: tuple[str, ...] | str | None) -> bool:
    if not names:
        return False
    if isinstance(names, str):
        return re.fullmatch(names, module_name) is not None
    return module_name in names or any(module_name.endswith(f".{n}") for n in names)


def _pattern_regex(key: str) -> str:
    # PEFT's get_pattern_key: a key matches a dotted suffix of the module name.
    return rf"(.*\.)?({key})$"


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default):
    # The first key that matches wins, as in PEFT.
    for key, value in patterns.items():
        if re.match(_pattern_regex(key), module_name):
            return value
    return default
