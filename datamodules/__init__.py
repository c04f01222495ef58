"""DataModules of sfplus (installed as ``sfplus.datamodules``)."""

from sfplus.datamodules.prompts import PromptDataModule, read_prompts
from sfplus.datamodules.toy import ToyDataModule

__all__ = ["PromptDataModule", "ToyDataModule", "read_prompts"]
