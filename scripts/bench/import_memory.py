"""Peak host memory of importing a BLIP-2 checkpoint: ``mmlm.models.Blip2.from_hf`` vs transformers'
``Blip2ForConditionalGeneration.from_pretrained``, each in a fresh process.

The checkpoint is random, written once with ``save_pretrained`` in float16: a small ViT and Q-Former and an
OPT-350m-shaped language model (24 layers × 1,024, FFN 4,096, vocabulary 50,272: 331M parameters, 0.66 GB of
weights; toy scale: 2 × 64). Both sides load it in float16 (``lm_dtype``/``vision_dtype`` float16; transformers:
``dtype=float16``). Measured: the process's peak resident memory (``ru_maxrss``) minus its resident memory after the
imports, i.e. what the import itself added at its highest. The transformers side builds on the meta device and reads
the weights in (its default), so a ratio near 1 means no random copy of the LM is allocated first. (mmlm's model
holds the vision norm twice, as the Q-Former's ``vision_norm`` and the ViT's unused ``post_layernorm``: a few
thousand parameters more.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import Scale, row

ROOT = Path(__file__).resolve().parents[2]

#: Run in a fresh process: imports, the resident memory after them, the import, the peak (KiB on Linux).
PROBE = """
import json, resource, sys
sys.path.insert(0, {root!r})
import torch
from transformers import Blip2ForConditionalGeneration
from mmlm.models import Blip2
def rss_kib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
before = rss_kib()
if {side!r} == "mmlm":
    model = Blip2.from_hf({path!r}, vision_dtype="float16", lm_dtype="float16")
else:
    model = Blip2ForConditionalGeneration.from_pretrained({path!r}, dtype=torch.float16)
print(json.dumps({{"added_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                   "params": sum(p.numel() for p in model.parameters())}}))
"""


def write_checkpoint(directory: Path, scale: Scale) -> float:
    """The random float16 checkpoint (see the module docstring) with a tokenizer; returns its weights' MiB."""
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, GPT2TokenizerFast

    toy = scale.name == "toy"
    width, layers, ffn, vocab = (64, 2, 128, 1000) if toy else (1024, 24, 4096, 50272)
    opt = {"model_type": "opt", "hidden_size": width, "num_hidden_layers": layers, "num_attention_heads": 16 if not toy
           else 2, "ffn_dim": ffn, "vocab_size": vocab, "word_embed_proj_dim": width, "max_position_embeddings": 2048,
           "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8}
    qformer = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
               "encoder_hidden_size": 64, "cross_attention_frequency": 1}
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=opt, num_query_tokens=4,
                         image_token_index=vocab - 1)
    model = Blip2ForConditionalGeneration(config).to(torch.float16)
    model.save_pretrained(directory)
    from tokenizers import Tokenizer, models

    tokenizer = GPT2TokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<pad>": 1, "</s>": 2, "<unk>": 0},
                                                                              unk_token="<unk>")),
                                  pad_token="<pad>", eos_token="</s>", bos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(directory)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def added_memory(side: str, path: Path) -> dict[str, Any]:
    """Run :data:`PROBE` for ``side`` in a fresh process; its JSON line."""
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), side=side, path=str(path))],
                          capture_output=True, text=True, timeout=1800,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    if done.returncode != 0:
        raise RuntimeError(f"import_memory {side}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(scale: Scale, data: Any = None) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mmlm-import-") as tmp:
        path = Path(tmp) / "blip2"
        weights = write_checkpoint(path, scale)
        sides = {side: added_memory(side, path) for side in ("mmlm", "reference")}
    if abs(sides["mmlm"]["params"] - sides["reference"]["params"]) > 1e-3 * sides["reference"]["params"]:
        raise AssertionError(f"import_memory: {sides['mmlm']['params']} vs {sides['reference']['params']} parameters")
    what = f"BLIP-2 float16 checkpoint, {sides['mmlm']['params'] / 1e6:.0f}M parameters, {weights:,.0f} MiB of weights"
    return [row(f"peak host memory added by the import, Blip2.from_hf vs from_pretrained ({what})",
                sides["mmlm"]["added_mib"], sides["reference"]["added_mib"], "MiB",
                sides["mmlm"]["added_mib"] / sides["reference"]["added_mib"], "<= 1.2")]
