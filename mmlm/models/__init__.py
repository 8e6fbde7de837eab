"""LightningModules: the shared base and one module per family."""

from mmlm.models.base import ModuleSettings, MultimodalModule, NonFiniteLossError
from mmlm.models.blip2 import Blip2
from mmlm.models.blip2_stage1 import Blip2Stage1, Stage1Output
from mmlm.models.dino import Dino
from mmlm.models.documents import DocumentModule
from mmlm.models.donut import Donut
from mmlm.models.exported import LoadExportedWeights
from mmlm.models.frozen import Frozen
from mmlm.models.kosmos import Kosmos1
from mmlm.models.metalm import MetaLM, MetaLMPretraining
from mmlm.models.palme import PaLME
from mmlm.models.text_lm import CausalLMPretraining
from mmlm.models.vlmo import VLMOModule, VLMOPooler, VLMOStage1, VLMOStage2
from mmlm.models.vlmo_stage3 import Stage3Output, VLMOStage3
from mmlm.models.vlmo_tasks import VLMONLVR2, VLMOVQA

__all__ = [
    "Blip2",
    "Blip2Stage1",
    "CausalLMPretraining",
    "Dino",
    "DocumentModule",
    "Donut",
    "Frozen",
    "Kosmos1",
    "LoadExportedWeights",
    "MetaLM",
    "MetaLMPretraining",
    "ModuleSettings",
    "MultimodalModule",
    "NonFiniteLossError",
    "PaLME",
    "Stage1Output",
    "Stage3Output",
    "VLMOModule",
    "VLMONLVR2",
    "VLMOPooler",
    "VLMOStage1",
    "VLMOStage2",
    "VLMOStage3",
    "VLMOVQA",
]
