"""scripts/bench: every benchmark runs at toy size and gives well-formed rows; run.py writes the markdown table.

No timing assertions: this checks the harness, not the machine.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import run  # noqa: E402

KEYS = {"name", "mmlm", "reference", "unit", "ratio", "target", "met"}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory) -> tuple[list[dict], Path]:
    """All benchmarks once at toy size, markdown written to a temporary file."""
    out = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    rows = run.main(["--scale", "toy", "--out", str(out), "--note", "toy run from the tests"])
    return rows, out


def test_every_benchmark_gives_well_formed_rows(toy_run):
    rows, _ = toy_run
    names = [r["name"] for r in rows]
    assert len(names) == len(set(names))
    assert any(n.startswith("loader") for n in names) and any(n.startswith("jpeg") for n in names)
    assert len(rows) == len(run.BENCHMARKS) + 1  # toy: one loader setting, plus the JPEG row
    for r in rows:
        assert set(r) == KEYS
        for key in ("mmlm", "reference", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, (r["name"], key)
        assert r["ratio"] == pytest.approx(r["mmlm"] / r["reference"])
        if r["target"] is None:
            assert r["met"] is None
        else:
            op, value = r["target"].split()
            assert op in (">=", "<=") and float(value) > 0
            assert r["met"] is (r["ratio"] >= float(value) if op == ">=" else r["ratio"] <= float(value))


def test_markdown_has_machine_versions_and_table(toy_run):
    rows, out = toy_run
    text = out.read_text()
    for needle in ("# Benchmarks", "- CPU:", "- cores:", "- RAM:", "torch ", "transformers ", "pytorch-lightning ",
                   "webdataset ", "timm ", "- date:", "toy run from the tests", "| benchmark | mmlm | reference |"):
        assert needle in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "benchmark" not in line]
    assert len(table) == len(rows)
    assert all(line.count("|") == len(run.HEADER) + 1 for line in table)


def test_only_runs_the_named_benchmark(tmp_path):
    rows = run.main(["--scale", "toy", "--only", "flops", "--out", str(tmp_path / "b.md")])
    assert len(rows) == 1 and "FLOP/s" in rows[0]["name"]


def test_a_run_keeps_the_other_device_kinds_section(tmp_path):
    """A CPU run rewrites only ``## CPU``; the ``## GPU`` section of an earlier GPU run survives, and vice versa."""
    out = tmp_path / "b.md"
    gpu = "## GPU\n\n- GPU: NVIDIA H200\n\n| benchmark | mmlm |\n|---|---|\n| flops | 1 |\n"
    out.write_text(run.INTRO + "\n## CPU\n\nold cpu table\n\n" + gpu)
    run.main(["--scale", "toy", "--only", "flops", "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Benchmarks") and text.count("## CPU") == 1 and "old cpu table" not in text
    assert text.endswith(gpu) and "Sub-LN decoder" in run.sections(text)["CPU"]


def test_an_only_run_replaces_its_own_rows_and_keeps_the_others(tmp_path):
    """``--only flops`` on a file with a CPU table of the same scale: the flops row is the new one, every other row
    is kept with its numbers, and the section says which rows were rerun and since when the others stand; at
    another scale the section holds only the new rows."""
    out = tmp_path / "b.md"
    old = ["| loader, num_workers=0 | 3,712 | 3,715 | samples/s | 0.999 | >= 0.95 | yes |",
           "| BLIP-2 greedy generation (16 prompts × 16 tokens) | 5,408 | 5,470 | tokens/s | 0.989 | >= 1.0 | **no** |",
           "| Sub-LN decoder (4×256) step FLOP/s vs 2048² matmul peak | 80.8 | 104 | GFLOP/s | 0.776 | — | — |"]
    out.write_text(run.INTRO + "\n## CPU\n\n- date: 2026-12-01 10:00 UTC\n- scale: `toy` (1 s in all)\n\n| "
                   + " | ".join(run.HEADER) + " |\n|---|---|---|---|---|---|---|\n"
                   + "\n".join(old) + "\n")
    (new,) = run.main(["--scale", "toy", "--only", "flops", "--out", str(out)])
    table = [line for line in run.sections(out.read_text())["CPU"].splitlines() if line.startswith("| ")][1:]
    assert table[:2] == old[:2] and len(table) == 3 and table[2].startswith(f"| {new['name']} |")
    assert "--only flops" in out.read_text() and "kept from the run of 2026-12-01 10:00 UTC" in out.read_text()
    out.write_text(out.read_text().replace("- scale: `toy`", "- scale: `quick`"))  # rows of another scale
    run.main(["--scale", "toy", "--only", "flops", "--out", str(out)])
    assert len([line for line in run.sections(out.read_text())["CPU"].splitlines() if line.startswith("| ")]) == 2


def test_vqa_like_rows_train_on_the_answer_only_and_pack_to_the_padded_loss(tmp_path):
    """The packing benchmark's VQA-like batch: loss on the answer and eos only; its packed rows give the padded loss
    (``packed_inputs`` raises otherwise) in fewer rows."""
    import blip2_step
    from common import SCALES

    from datamodules.synthetic.shapes import write_shapes

    write_shapes(tmp_path / "data", train=8, val=0, seed=0, shard_size=8, progress=False)
    ours, hf = blip2_step.build_pair(tmp_path / "data", tmp_path / "hf")
    images = torch.zeros(4, 3, 64, 64)
    batch = blip2_step.vqa_like_batch(ours, images, 16)
    answer = ours.tokenizer("Answer:", add_special_tokens=False)["input_ids"]
    for ids, labels, mask in zip(batch.input_ids, batch.labels, batch.attention_mask):
        trained = (labels != -100).nonzero().flatten().tolist()
        assert 2 <= len(trained) <= 4 and trained == list(range(trained[0], int(mask.sum())))  # 1–3 words + eos
        assert ids[trained[0] - len(answer):trained[0]].tolist() == answer  # right after "Answer:"
    padded, packed = blip2_step.packed_inputs(ours, hf, images, SCALES["toy"], blip2_step.vqa_like_batch)
    assert len(packed) < len(padded) and int(packed.attention_mask.sum()) == int(padded.attention_mask.sum())
