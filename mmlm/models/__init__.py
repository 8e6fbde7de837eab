"""LightningModules: the shared base and one module per family."""

from mmlm.models.base import MultimodalModule
from mmlm.models.blip2 import Blip2
from mmlm.models.blip2_stage1 import Blip2Stage1
from mmlm.models.donut import Donut
from mmlm.models.frozen import Frozen
from mmlm.models.kosmos import Kosmos1
from mmlm.models.metalm import MetaLM, MetaLMPretraining
from mmlm.models.palme import PaLME
from mmlm.models.text_lm import CausalLMPretraining

__all__ = ["MultimodalModule", "Blip2", "Blip2Stage1", "Donut", "Frozen", "Kosmos1", "CausalLMPretraining", "MetaLM", "MetaLMPretraining", "PaLME"]
