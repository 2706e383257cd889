"""jlora: multi-LoRA serving for JAX.

One base model, many LoRA adapters (HF PEFT format), one jitted step that serves a batch in which
every sequence may use a different adapter.
"""

from jlora.config import LoRAConfig
from jlora.errors import (
    AdapterConfigError,
    AdapterMismatchError,
    AdapterWeightsError,
    CapacityError,
    CheckpointError,
    LoRAConfigError,
    LoRAError,
    MappingError,
    UnknownAdapterError,
    UnsafeFormatError,
)
from jlora.loader import load_adapter
from jlora.mapping import LoRAMapping
from jlora.peft import PEFTConfig
from jlora.request import LoRARequest
from jlora.targets import TargetModule
from jlora.weights import LoRABank, LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

__version__ = "0.1.0"

__all__ = [
    "AdapterConfigError",
    "AdapterMismatchError",
    "AdapterWeightsError",
    "CapacityError",
    "CheckpointError",
    "LoRABank",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRALayerWeights",
    "LoRAMapping",
    "LoRAModel",
    "LoRARequest",
    "MappingError",
    "PEFTConfig",
    "PackedLoRALayerWeights",
    "TargetModule",
    "UnknownAdapterError",
    "UnsafeFormatError",
    "load_adapter",
]
