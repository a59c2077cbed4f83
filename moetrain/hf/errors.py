"""The user-facing error of the Hugging Face bridge: one line naming what is wrong."""

from __future__ import annotations

from moetrain.config import ConfigError


class HFError(ConfigError):
    """Bad Hugging Face input: an unsupported architecture, a config field moetrain cannot
    express, missing / extra / misshapen tensors or a tokenizer that does not fit the model.
    The message names the field, tensor or file (a ``ConfigError``, so the CLI exits 2)."""
