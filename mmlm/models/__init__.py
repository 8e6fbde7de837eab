"""LightningModules: the shared base and one module per family."""

from mmlm.models.base import MultimodalModule
from mmlm.models.frozen import Frozen
from mmlm.models.text_lm import CausalLMPretraining

__all__ = ["MultimodalModule", "Frozen", "CausalLMPretraining"]
