"""jlora: multi-LoRA serving for JAX.

One base model, many LoRA adapters (HF PEFT format), one jitted step that serves a batch in which
every sequence may use a different adapter.
"""

from jlora.apply import apply, find_targets
from jlora.checkpoint import restore_adapter, save_adapter
from jlora.config import LoRAConfig
from jlora.context import lora_context, padded_batch_mapping
from jlora.engine import Engine, RequestOutput
from jlora.errors import (
    AdapterConfigError,
    AdapterMismatchError,
    AdapterWeightsError,
    CapacityError,
    CheckpointError,
    DonatedStateError,
    EngineBusyError,
    LoRAConfigError,
    LoRAError,
    MappingError,
    UnknownAdapterError,
    UnsafeFormatError,
)
from jlora.loader import load_adapter
from jlora.manager import (
    AdapterInfo,
    AdapterManagerState,
    activate_adapter,
    add_adapter,
    add_adapters,
    deactivate_adapter,
    init_state,
    list_adapters,
    pin_adapter,
    prepare_batch,
    remove_adapter,
    split_batch,
    unpin_adapter,
)
from jlora.mapping import LoRAMapping
from jlora.merge import merge_adapter
from jlora.ops import OpsConfig, add_lora, add_lora_embedding
from jlora.peft import PEFTConfig
from jlora.request import LoRARequest
from jlora.sampling import SamplingParams
from jlora.targets import TargetModule
from jlora.weights import LoRABank, LoRALayerWeights, LoRAModel, PackedLoRALayerWeights

__version__ = "0.1.0"

__all__ = [
    "AdapterConfigError",
    "AdapterInfo",
    "AdapterManagerState",
    "AdapterMismatchError",
    "AdapterWeightsError",
    "CapacityError",
    "CheckpointError",
    "DonatedStateError",
    "Engine",
    "EngineBusyError",
    "LoRABank",
    "LoRAConfig",
    "LoRAConfigError",
    "LoRAError",
    "LoRALayerWeights",
    "LoRAMapping",
    "LoRAModel",
    "LoRARequest",
    "MappingError",
    "OpsConfig",
    "PEFTConfig",
    "PackedLoRALayerWeights",
    "RequestOutput",
    "SamplingParams",
    "TargetModule",
    "UnknownAdapterError",
    "UnsafeFormatError",
    "activate_adapter",
    "add_adapter",
    "add_adapters",
    "add_lora",
    "add_lora_embedding",
    "apply",
    "deactivate_adapter",
    "find_targets",
    "init_state",
    "list_adapters",
    "load_adapter",
    "lora_context",
    "merge_adapter",
    "padded_batch_mapping",
    "pin_adapter",
    "prepare_batch",
    "remove_adapter",
    "restore_adapter",
    "save_adapter",
    "split_batch",
    "unpin_adapter",
]
