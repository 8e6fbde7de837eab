"""The DDP contract: every tiny config fits 2 steps on 2 CPU ranks (gloo) with the strategy its real-size config
names, and both ranks end with bitwise identical weights.

Plain ``ddp`` (``find_unused_parameters=False``) requires every parameter with ``requires_grad`` to get a gradient in
every step; a family that leaves a trained parameter idle fails here ("parameters that were not used in producing the
loss"). Only the real configs that say so run with ``ddp_find_unused_parameters_true`` (PaLM-E, MetaLM pretraining:
a batch may hold no span of one modality).

One launch of two ranks (a torchrun-style environment: ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``)
runs the real ``mmlm fit`` on every config in turn (``tests/tiny_runs.py``), so the ranks import torch, Lightning and
transformers once, not once per config. ``tiny_runs.WeightDigest`` writes a hash of every state-dict tensor per rank
at the start and the end of training. No validation, logger or checkpoint: 2 steps at batch 4 (Donut 2).

The same launch runs once more under FSDP2 (``configs/strategies/fsdp2.yaml``: Lightning's ``ModelParallelStrategy``,
each family sharded by ``MultimodalModule.configure_model``) on every config: every one must fit sharded; the digests
are of the gathered full tensors (``DTensor.full_tensor``).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from tiny_runs import write_workspace

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORLD, STEPS, TIMEOUT_S = 2, 2, 600
#: job → (tiny config, real-size config under configs/ whose trainer.strategy the job uses, extra fit arguments).
#: In run order: text_lm exports the LM that frozen and blip2_stage2 load, donut_read the model donut_cord loads.
JOBS = {
    # no real-size counterpart: the LM stage of the tiny Frozen recipe (a real Frozen starts from a pretrained LM);
    # plain ddp, as configs/strategies/ddp.yaml
    "text_lm": ("text_lm", None, []),
    "frozen": ("frozen", "frozen/nfresnet50_opt.yaml", []),
    "blip2_stage1": ("blip2_stage1", "blip2/stage1_vitl.yaml", []),
    "blip2_stage2": ("blip2_stage2", "blip2/stage2_opt2.7b.yaml", []),
    # instruction-aware queries and a trained ViT, as the VQA finetuning recipe
    "blip2_vqa_instruct": ("blip2_vqa_instruct", "blip2/finetune_vqav2.yaml", []),
    "kosmos1": ("kosmos1", "kosmos1/pretrain_vitl_1.3b.yaml", []),
    # the tiny PaLM-E trains its LM too (freeze: false), as the 1B finetuning recipe; ddp_find_unused_parameters_true
    "palme": ("palme", "palme/vitl_llama1b_finetune.yaml", []),
    "metalm_vqa": ("metalm_vqa", "metalm/finetune_vqav2.yaml", []),
    # the recipe's baseline: the same VQA finetuning with no docked encoder
    "metalm_decoder_only": ("metalm_decoder_only", "metalm/finetune_vqav2.yaml", []),
    "metalm_pretrain": ("metalm_pretrain", "metalm/pretrain_vl_vitb16_bert_subln1.3b.yaml", []),  # find_unused
    "metalm_pretrain_text": ("metalm_pretrain_text", "metalm/pretrain_text_electra_subln1.3b.yaml", []),  # idem
    "vlmo_stage1": ("vlmo_stage1", "vlmo/stage1_base.yaml", []),
    "vlmo_stage2": ("vlmo_stage2", "vlmo/stage2_base.yaml", []),
    "vlmo_stage3": ("vlmo_stage3", "vlmo/stage3_base.yaml", []),
    # retrieval fine-tuning is stage 3 with ITC only (no fusion pass: VL-FFNs, ITM and MLM heads idle)
    "vlmo_retrieval": ("vlmo_stage3", "vlmo/retrieval_coco.yaml",
                       ["--model.init_args.itm_weight=0", "--model.init_args.mlm_weight=0"]),
    "vlmo_vqa": ("vlmo_vqa", "vlmo/vqav2_base.yaml", []),
    "vlmo_nlvr2": ("vlmo_nlvr2", "vlmo/nlvr2_base.yaml", []),
    # the teacher (EMA, no gradient) and the centre (all-reduced) must end equal on both ranks too
    "dino": ("dino", "dino/vits16_imagenet.yaml", []),
    "donut_read": ("donut_read", "donut/pretrain_synthdog.yaml", ["--data.init_args.batch_size=2"]),
    # finetune_cord.yaml runs on one device (no strategy); on several Lightning picks plain ddp, as the other Donut
    # fine-tuning configs (finetune_docvqa.yaml, finetune_rvlcdip.yaml) name
    "donut_cord": ("donut_cord", "donut/finetune_cord.yaml", ["--data.init_args.batch_size=2"]),
}
COMMON = [f"--trainer.max_steps={STEPS}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
          "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--data.init_args.num_workers=0", "--data.init_args.batch_size=4"]
#: BatchNorm running statistics: DDP broadcasts buffers from rank 0 at the start of each forward, so after the last
#: step they hold each rank's own last batch (the checkpoint takes rank 0's); every other tensor must be equal
RANK_LOCAL = (".running_mean", ".running_var")
#: environment of other launchers that Lightning would read instead of ours
FOREIGN_ENV = ("SLURM_", "TORCHELASTIC_", "LSB_", "OMPI_", "PMI_", "GROUP_RANK", "RANK", "LOCAL_WORLD_SIZE")


def strategy_of(real: str | None) -> str:
    """``trainer.strategy`` of a real-size config; ``ddp`` when it names none (Lightning's choice for several
    devices)."""
    if real is None:
        return "ddp"
    strategy = yaml.safe_load((REPO / "configs" / real).read_text())["trainer"].get("strategy", "ddp")
    assert strategy in ("ddp", "ddp_find_unused_parameters_true"), f"{real}: strategy {strategy!r} (add it here)"
    return strategy


def test_every_tiny_config_has_a_real_size_counterpart():
    assert {path.stem for path in (REPO / "configs" / "tiny").glob("*.yaml")} == {c for c, _, _ in JOBS.values()}
    assert all((REPO / "configs" / real).is_file() for _, real, _ in JOBS.values() if real is not None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_env(rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_ENV)}
    return {**env, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(REPO), os.environ.get("PYTHONPATH")])),
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(WORLD), "NODE_RANK": "0",
            "LOCAL_RANK": str(rank)}


def launch(spec: Path, logs: Path) -> float:
    """Start every rank on ``spec``; wait (at most ``TIMEOUT_S``, then kill them); the wall time in seconds."""
    started, port, procs = time.perf_counter(), free_port(), []
    for rank in range(WORLD):
        with open(logs / f"rank{rank}.log", "w") as log:
            procs.append(subprocess.Popen([sys.executable, str(TESTS / "tiny_runs.py"), str(spec)], cwd=spec.parent,
                                          env=rank_env(rank, port), stdout=log, stderr=subprocess.STDOUT))
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, TIMEOUT_S - (time.perf_counter() - started)))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=30)
    return time.perf_counter() - started


def fsdp2_strategy() -> str:
    """``trainer.strategy`` of ``configs/strategies/fsdp2.yaml`` as one JSON command-line value."""
    return json.dumps(yaml.safe_load((REPO / "configs/strategies/fsdp2.yaml").read_text())["trainer"]["strategy"])


@pytest.fixture(scope="module", params=["ddp", "fsdp2"])
def contract_run(tmp_path_factory, request) -> dict:
    """Data, then every job on 2 ranks, under its real config's DDP strategy or under FSDP2; per job and rank its
    status and digest record (``None`` when missing)."""
    root = write_workspace(tmp_path_factory.mktemp(f"{request.param}_contract"))
    out = root / "contract"
    names = list(JOBS)
    jobs = [{"name": name, "config": JOBS[name][0], "args": JOBS[name][2],
             "strategy": strategy_of(JOBS[name][1]) if request.param == "ddp" else fsdp2_strategy()}
            for name in names]
    spec = root / "jobs.json"
    spec.write_text(json.dumps({"out": str(out), "common": COMMON, "jobs": jobs}))
    wall = launch(spec, root)

    def read(path: Path) -> dict | None:
        return json.loads(path.read_text()) if path.is_file() else None

    results = {name: {"status": [read(out / name / f"status-rank{r}.json") for r in range(WORLD)],
                      "digest": [read(out / name / f"rank{r}.json") for r in range(WORLD)]} for name in names}
    seconds = {name: round(max((s or {}).get("seconds", 0) for s in r["status"]), 1) for name, r in results.items()}
    print(f"\n{request.param} contract: {wall:.0f} s in all; per job (s): {seconds}")
    logs = "\n".join(f"--- rank {r}\n{(root / f'rank{r}.log').read_text()[-3000:]}" for r in range(WORLD))
    return {"results": results, "logs": logs, "strategy": request.param}


@pytest.mark.parametrize("name", list(JOBS))
def test_fits_two_steps_on_two_ranks_with_identical_weights(contract_run, name):
    result = contract_run["results"][name]
    if None in result["status"]:
        pytest.fail(f"{name}: a rank did not finish (hang or crash before or during it)\n{contract_run['logs']}")
    errors = [s["status"] for s in result["status"] if s["status"] != "ok"]
    strategy = strategy_of(JOBS[name][1]) if contract_run["strategy"] == "ddp" else "fsdp2"
    assert not errors, f"{name} under {strategy}:\n{errors[0]}"
    ranks = result["digest"]
    assert None not in ranks, f"{name}: a rank wrote no weight digest"
    assert [(r["rank"], r["world_size"], r["global_step"]) for r in ranks] == [(i, WORLD, STEPS) for i in range(WORLD)]
    assert ranks[0]["trainable"] == ranks[1]["trainable"] and ranks[0]["trainable"], name
    assert ranks[0]["end"].keys() == ranks[1]["end"].keys()
    differ = [key for key, digest in ranks[0]["end"].items() if ranks[1]["end"][key] != digest]
    assert not [key for key in differ if not key.endswith(RANK_LOCAL)], f"{name}: ranks differ in {differ[:10]}"
    start, end = ranks[0]["start"], ranks[0]["end"]
    assert any(start[n] != end[n] for n in ranks[0]["trainable"] if n in end), f"{name}: no trained weight moved"
    moved = [n for n in ranks[0]["frozen"] if n in end and start[n] != end[n]]
    assert not moved, f"{name}: frozen parameters changed: {moved[:10]}"
