"""Error types of jlora: one base class, one subclass per kind of problem.

Every message names the file, module or adapter at fault and says what to do. A failed
operation leaves its inputs as they were. Imports nothing from jlora.
"""

from __future__ import annotations


class LoRAError(ValueError):
    """Base class of every error jlora raises on bad input (a ``ValueError``)."""


class LoRAConfigError(LoRAError):
    """A ``LoRAConfig`` or ``LoRARequest`` field is out of range."""


class AdapterConfigError(LoRAError):
    """``adapter_config.json`` is missing, unreadable, or asks for something jlora cannot serve."""


class AdapterWeightsError(LoRAError):
    """The adapter's tensors are missing, corrupt, inconsistent or non-finite."""


class UnsafeFormatError(AdapterWeightsError):
    """A pickle-based file (``.bin``, ``.pt``): jlora never unpickles."""


class MappingError(LoRAError):
    """A token/sequence -> slot mapping holds an out-of-range or inconsistent index."""


class AdapterMismatchError(LoRAError):
    """An adapter does not fit the model it is applied to (modules, dims, rank)."""


class CapacityError(LoRAError):
    """No slot or cache room left (every slot pinned, batch needs more than max_loras)."""


class UnknownAdapterError(LoRAError, KeyError):
    """An adapter id or name that the manager does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class EngineBusyError(LoRAError):
    """An ``Engine`` was asked to change its adapters or to generate while one of its
    ``generate`` calls was running (from an ``on_token`` callback or another thread); do it
    between ``generate`` calls."""


class CheckpointError(LoRAError):
    """A model or adapter checkpoint is missing or has mismatched tensors."""


class DonatedStateError(LoRAError):
    """A manager state whose device banks were donated to a later state was used again; keep
    using the newest state, or pass ``donate=False`` to keep old states usable."""
