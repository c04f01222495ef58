"""DataModules of sfplus (installed as ``sfplus.datamodules``)."""

from sfplus.datamodules.prompts import PromptDataModule, read_prompts
from sfplus.datamodules.shards import LatentShardDataModule
from sfplus.datamodules.toy import ToyDataModule

__all__ = ["LatentShardDataModule", "PromptDataModule", "ToyDataModule", "read_prompts"]
