"""DDP end to end: the real ``mmlm fit`` on 2 CPU ranks (gloo) with the tiny Frozen config.

One module-scoped run (tiny shapes data, 8 samples per shard; narrow ResNet, 2-layer GPT-2 from a
config dict, no stage-1 export needed) trains one epoch of ``epoch_samples=32`` at batch 4 per
rank with ``resampled: false``, then validates on the full val set (two loaders: VQA, captions).
``tests/ddp_probe.py`` records per rank which ``(task, key)`` samples it saw; keys are mapped to
shards by reading the shards here. A second, 1-process ``mmlm validate`` of the saved checkpoint
checks that the reduced VQA accuracy does not depend on the number of ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from functools import partial
from pathlib import Path

import pytest

from datamodules.pipeline.streams import batches_per_rank
from datamodules.synthetic.shapes import write_shapes
from mmlm.evaluation import result_file
from mmlm.metrics import VQAAccuracy

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORLD, BATCH, EPOCH_SAMPLES = 2, 4, 32
ENCODER_KWARGS = {"channels": [8, 16, 16, 16], "stem_width": 8, "output_stride": 16}
# A wide init makes the untrained LM's greedy answers vary per input, so VQA accuracy is not 0
# and comparing it between 2 ranks and 1 process means something.
TINY_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128,
             "vocab_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
             "initializer_range": 0.5}
TASK_PREFIX = {"vqa": "vqa", "caption": "captions"}  # task → shard file prefix
VAL_LOADERS = {"0": "vqa", "1": "caption"}  # dataloader index → task (order of the val sources)


def shard_source(data: Path, split: str, task: str, weight: float = 1.0) -> dict:
    """One ``Source`` of ``ImageTextDataModule`` as a dict: a glob over one split's shard set."""
    return {"urls": f"{data}/{split}/{TASK_PREFIX[task]}-*.tar", "kind": task, "weight": weight}


def cli_args(command: str, data: Path, root: Path, probe: Path, devices: int) -> list[str]:
    """``mmlm <command>`` over ``configs/tiny/frozen.yaml`` with tiny overrides and the probe callback."""
    lm = {"class_path": "mmlm.language.HFCausalLM", "init_args": {"name_or_path": None, "config": TINY_GPT2}}
    source = partial(shard_source, data)
    probe_cb = {"class_path": "ddp_probe.DDPProbe", "init_args": {"out_dir": str(probe)}}
    return [
        sys.executable, "-m", "mmlm.app.cli", command, "--config", str(REPO / "configs/tiny/frozen.yaml"),
        "--trainer.accelerator=cpu", f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        "--trainer.max_steps=-1", "--trainer.max_epochs=1", "--trainer.val_check_interval=1.0",
        "--trainer.limit_val_batches=1.0", "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks+={json.dumps(probe_cb)}",
        f"--model.init_args.tokenizer={data / 'tokenizer'}",
        "--model.init_args.encoder.init_args.img_size=32",
        f"--model.init_args.encoder.init_args.model_kwargs={json.dumps(ENCODER_KWARGS)}",
        f"--model.init_args.language_model={json.dumps(lm)}",
        "--model.init_args.generation.max_new_tokens=2",
        f"--data.init_args.train={json.dumps([source('train', 'vqa'), source('train', 'caption', weight=0.5)])}",
        f"--data.init_args.val={json.dumps([source('val', 'vqa'), source('val', 'caption')])}",
        f"--data.init_args.batch_size={BATCH}", f"--data.init_args.epoch_samples={EPOCH_SAMPLES}",
        "--data.init_args.resampled=false", "--data.init_args.shuffle_buffer=8",
    ]


def run_cli(args: list[str]) -> None:
    """Run the CLI in a subprocess (``tests/`` importable for the probe); fail with its output tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(args[2:4])} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def shard_members(directory: Path, task: str) -> dict[tuple[str, str], tuple[str, dict | None]]:
    """``(task, key) → (shard file name, parsed json member)`` for every sample of one shard set."""
    out: dict[tuple[str, str], tuple[str, dict | None]] = {}
    for shard in sorted(directory.glob(f"{TASK_PREFIX[task]}-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                meta = json.load(tar.extractfile(member)) if ext == "json" else None
                if meta is not None or (task, key) not in out:
                    out[(task, key)] = (shard.name, meta)
    return out


def vqa_predictions(root: Path) -> list[Path]:
    """The VQA result file a run wrote (not the files beside it)."""
    return [result_file(root, "val", "vqa")]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> dict:
    """Data, 2-rank ``fit`` then 1-process ``validate`` of its checkpoint; the probe records of both."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = tmp / "data"
    write_shapes(data, train=64, val=16, seed=0, shard_size=8, progress=False)
    run_cli(cli_args("fit", data, tmp / "fit", tmp / "probe2", devices=WORLD))
    (ckpt,) = (tmp / "fit").glob("lightning_logs/version_*/checkpoints/*.ckpt")
    run_cli(cli_args("validate", data, tmp / "val1", tmp / "probe1", devices=1) + [f"--ckpt_path={ckpt}"])
    ranks = [json.loads((tmp / "probe2" / f"rank{r}.json").read_text()) for r in range(WORLD)]
    (preds2,) = vqa_predictions(tmp / "fit")
    (preds1,) = vqa_predictions(tmp / "val1")
    members = {split: {**shard_members(data / split, "vqa"), **shard_members(data / split, "caption")}
               for split in ("train", "val")}
    import torch

    checkpoint = torch.load(ckpt, weights_only=True)
    return {"ranks": ranks, "single": json.loads((tmp / "probe1" / "rank0.json").read_text()),
            "preds2": json.loads(preds2.read_text()), "preds1": json.loads(preds1.read_text()),
            "members": members, "position": checkpoint["ImageTextDataModule"]["train_position"],
            "report": json.loads(next((tmp / "fit").glob("lightning_logs/version_*/data_report-fit.json")).read_text())}


def samples(record: list[list[str]], task: str) -> list[tuple[str, str]]:
    """``(task, shard key)`` of one task's records (mixed training sources prefix keys with their source label)."""
    return [(t, k.rsplit("/", 1)[-1]) for t, k in record if t == task]


def answers_by_id(rows: list[dict]) -> dict[str, str]:
    return {row["question_id"]: row["answer"] for row in rows}


def test_both_ranks_ran_and_took_the_same_number_of_steps(ddp_run):
    ranks = ddp_run["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world_size"] for r in ranks} == {WORLD}
    expected = batches_per_rank(EPOCH_SAMPLES, BATCH, WORLD)  # 4 optimizer steps per rank and epoch
    assert [r["global_step"] for r in ranks] == [expected, expected]
    assert [r["train_batches"] for r in ranks] == [expected, expected]
    assert [len(r["train"]) for r in ranks] == [expected * BATCH] * WORLD


def test_ranks_read_disjoint_training_shards(ddp_run):
    """Without resampling, one pass gives each rank its own slice of the (shuffled) shard list."""
    shard_of = ddp_run["members"]["train"]
    for task in TASK_PREFIX:
        per_rank = [samples(r["train"], task) for r in ddp_run["ranks"]]
        assert all(len(s) == len(set(s)) for s in per_rank), f"{task}: a sample repeated within a pass"
        shards = [{shard_of[s][0] for s in rank} for rank in per_rank]
        assert all(shards), f"{task}: a rank saw no {task} sample ({shards})"
        assert shards[0].isdisjoint(shards[1]), f"{task}: ranks share shards {shards[0] & shards[1]}"


def test_validation_sees_every_sample_exactly_once_across_ranks(ddp_run):
    val = ddp_run["members"]["val"]
    passes = [r["val"] for r in ddp_run["ranks"]]
    assert [len(p) for p in passes] == [1, 1], "expected one validation pass per rank (end of the epoch)"
    for loader, task in VAL_LOADERS.items():
        per_rank = [p[0][loader] for p in passes]
        assert all(t == task for rank in per_rank for t, _ in rank)
        seen = Counter(tuple(s) for rank in per_rank for s in rank)
        assert seen == Counter(s for s in val if s[0] == task), f"{task}: not every val sample exactly once"
        assert {tuple(s) for s in per_rank[0]}.isdisjoint(tuple(s) for s in per_rank[1])
    # the VQA shards do not split evenly (7 shards, the last one short): ranks ran different
    # numbers of val batches, and validation must still finish without a hang
    assert len(passes[0][0]["0"]) != len(passes[1][0]["0"])


def test_gathered_predictions_cover_the_val_set_once(ddp_run):
    question_ids = [row["question_id"] for row in ddp_run["preds2"]]
    expected = [meta["question_id"] for (task, _), (_, meta) in ddp_run["members"]["val"].items() if task == "vqa"]
    assert Counter(question_ids) == Counter(expected)


def test_vqa_accuracy_is_reduced_over_ranks_and_matches_one_process(ddp_run):
    answers = {meta["question_id"]: meta["answers"]
               for (task, _), (_, meta) in ddp_run["members"]["val"].items() if task == "vqa"}
    metric = VQAAccuracy()
    metric.update([r["answer"] for r in ddp_run["preds2"]], [answers[r["question_id"]] for r in ddp_run["preds2"]])
    expected = float(metric.compute())
    assert expected > 0, "the check needs a non-zero accuracy; change TINY_GPT2's initializer_range"
    logged = [r["metrics"]["val/vqa_acc"] for r in ddp_run["ranks"]]
    assert logged == pytest.approx([expected, expected], abs=1e-6)  # every rank logs the global value
    # same checkpoint, one process, the whole val set: same greedy answers and accuracy
    assert answers_by_id(ddp_run["preds1"]) == answers_by_id(ddp_run["preds2"])
    assert ddp_run["single"]["metrics"]["val/vqa_acc"] == pytest.approx(expected, abs=1e-6)


def test_checkpoint_holds_every_ranks_data_position(ddp_run):
    """The data position is gathered from both ranks (each resumes its own shards and offsets)."""
    ranks = ddp_run["position"]["ranks"]
    expected = batches_per_rank(EPOCH_SAMPLES, BATCH, WORLD)
    assert [(r["epoch"], r["batches"]) for r in ranks] == [(0, expected)] * WORLD
    assert all(position is not None for r in ranks for position in r["workers"])
    assert ranks[0]["workers"] != ranks[1]["workers"]
    assert ddp_run["report"] == {}  # the shapes data has no bad sample; the report is written once, by rank 0
