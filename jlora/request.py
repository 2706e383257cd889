"""LoRARequest: which adapter a request wants, and where its files are. Imports jlora.errors and
jlora.config."""

from __future__ import annotations

import dataclasses
import os

from jlora.config import is_int
from jlora.errors import LoRAConfigError


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRARequest:
    """A request for one adapter, validated at construction.

    Two requests are the same adapter when their ``lora_int_id`` is the same (as in vLLM).

    >>> LoRARequest(lora_name="sql", lora_int_id=1, lora_path="/adapters/sql").adapter_id
    1
    """

    lora_name: str
    lora_int_id: int
    lora_path: str | os.PathLike
    base_model_name: str | None = None

    def __post_init__(self):
        problems = []
        if not isinstance(self.lora_name, str) or not self.lora_name:
            problems.append(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not is_int(self.lora_int_id) or self.lora_int_id < 1:
            problems.append(
                f"lora_int_id must be an int >= 1 (0 is reserved for the base model), "
                f"got {self.lora_int_id!r}"
            )
        # os.fspath may give bytes (a PathLike over bytes); the loaders and messages want str.
        path = os.fspath(self.lora_path) if isinstance(self.lora_path, str | os.PathLike) else None
        if not isinstance(path, str) or not path:
            problems.append(
                f"lora_path must be a non-empty path to a PEFT adapter directory, "
                f"got {self.lora_path!r}"
            )
        if self.base_model_name is not None and not isinstance(self.base_model_name, str):
            problems.append(
                f"base_model_name must be a string or None, got {self.base_model_name!r}"
            )
        if problems:
            raise LoRAConfigError(f"Invalid LoRARequest {self.lora_name!r}: " + "; ".join(problems))
        object.__setattr__(self, "lora_path", path)
        # A Python int, whatever int was given (a NumPy one hashes and prints differently).
        object.__setattr__(self, "lora_int_id", int(self.lora_int_id))

    def __eq__(self, other) -> bool:
        return isinstance(other, LoRARequest) and self.lora_int_id == other.lora_int_id

    def __hash__(self) -> int:
        return hash(self.lora_int_id)

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
