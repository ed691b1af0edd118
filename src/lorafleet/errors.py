"""The exceptions lorafleet raises for problems the user can fix.

Every message says what was wrong, where (file:line, field, adapter name) and what to do; the
CLI prints it without a traceback.
"""

from __future__ import annotations


class LorafleetError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in lorafleet."""


class ConfigError(LorafleetError):
    """A fleet spec (YAML or CLI) names an unknown field or holds an invalid value."""


class ModelLoadError(LorafleetError):
    """A model directory is missing, is not a model, or holds an unsupported architecture."""


class DataError(LorafleetError):
    """A training record is malformed or points at a file that cannot be read."""


class TrainingError(LorafleetError):
    """Training cannot go on sensibly (a loss that is no longer a number); nothing bad is saved."""


class AdapterError(LorafleetError):
    """An adapter targets modules the base lacks, or an adapter directory cannot be used."""


class AuditError(LorafleetError):
    """The audit log fails verification (names the first bad entry), or a signature does not check out."""


class RegistryError(LorafleetError):
    """The lineage registry does not know an adapter, or its records cannot be read."""
