"""DataModules of sfplus (installed as ``sfplus.datamodules``)."""

from sfplus.datamodules.images import ImagePromptDataModule
from sfplus.datamodules.prompts import PromptDataModule, read_prompts
from sfplus.datamodules.shards import LatentShardDataModule
from sfplus.datamodules.toy import ToyDataModule

__all__ = ["ImagePromptDataModule", "LatentShardDataModule", "PromptDataModule", "ToyDataModule", "read_prompts"]
