"""BLIP-2's two stages end to end on the synthetic shapes data, on CPU.

1. Render the shapes data (if missing); save one random tiny ViT (``configs/tiny/blip2_stage1.yaml``'s sizes) so
   that both stages read the *same* frozen weights (``encoder.init_args.name_or_path``). With ``--vision-backbone
   FILE`` both stages freeze instead the timm ViT of ``configs/tiny/dino.yaml`` with the weights of FILE:
   ``scripts/dino_tiny.py`` writes ``backbone.safetensors`` (after DINO) and ``random_backbone.safetensors`` (the
   same ViT at its random initialisation) for the comparison: ``--compare-backbone FILE`` runs both stages again on
   the second file (same text LM) and prints its column beside.
2. Text LM (``configs/tiny/text_lm.yaml``, or ``--text-lm text_lm_reading.yaml``, which also learns to read scenes
   described in words before a question): a tiny GPT-2 learns the data's text; exported as the frozen LM.
3. Stage 1 (``configs/tiny/blip2_stage1.yaml``): Q-Former with ITC + ITM + ITG on the caption shards;
   validation logs retrieval R@K with ITC and, with ``--itm-rerank-k``, after ITM re-ranking.
4. Stage 2 (``configs/tiny/blip2_stage2.yaml``): the stage-1 Q-Former (``load_stage1_qformer``) + a new projection
   trained through the frozen LM on VQA + captions; held-out VQA accuracy and CIDEr. ``--lora-rank R`` (a named
   variant, not BLIP-2's recipe) also trains LoRA adapters of rank R on the LM's attention (:func:`lora_args`).

Prints retrieval R@1 vs chance, VQA accuracy vs the majority answer, CIDEr; writes ``OUT_DIR/results.json``.
Usage: ``python scripts/blip2_tiny.py [--train-images 6000] [--stage1-steps 400] …`` (``--help``).
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: make mmlm/ and datamodules/ importable
    sys.path.insert(0, str(ROOT))

from mmlm.app.quickstart import CONFIGS, ensure_data, sources, stage_args, train_val_answers  # noqa: E402
from mmlm.app.recipes import RecipeInputError, recipe_main  # noqa: E402


def save_vit(out: Path, seed: int) -> Path:
    """The stage-1 config's random ViT, written once with ``save_pretrained`` (both stages load it).

    The config sets ``initializer_range: 0.02``: transformers' ``Blip2VisionConfig`` default (1e-10) gives a
    random ViT whose tokens are ~1e-6 and the same for every image (nothing to learn from)."""
    import torch
    import yaml

    from mmlm.encoders import HFVisionEncoder

    if (out / "config.json").is_file():
        return out
    encoder = yaml.safe_load((CONFIGS / "tiny" / "blip2_stage1.yaml").read_text())["model"]["init_args"]["encoder"]
    torch.manual_seed(seed)
    args = encoder["init_args"]
    HFVisionEncoder(**args).model.save_pretrained(out)
    return out


def timm_backbone(path: str) -> list[str]:
    """The CLI override that makes a stage freeze ``configs/tiny/dino.yaml``'s timm ViT with the weights at ``path``.

    Tokens after the ViT's final norm (DINO's output) go to the Q-Former's own ``vision_norm`` (LAVIS's
    ``ln_vision``), at the resolution DINO's global crops and k-NN evaluation used."""
    import yaml

    encoder = yaml.safe_load((CONFIGS / "tiny" / "dino.yaml").read_text())["model"]["init_args"]["encoder"]
    encoder["init_args"] |= {"pretrained": str(path), "freeze": True, "layer": -1}  # (the stage configs say 4)
    return ["--model.init_args.encoder", json.dumps(encoder)]


def lora_args(rank: int) -> list[str]:
    """The stage-2 override that adds LoRA adapters (``peft``; rank ``rank``, alpha ``2 * rank``) to the LM's attention
    projections: the base LM stays frozen, the adapters train with the Q-Former. ``rank`` 0: none (BLIP-2's frozen
    LM)."""
    if rank < 0:
        raise RecipeInputError(f"--lora-rank {rank}: expected 0 (BLIP-2's frozen LM) or a positive LoRA rank")
    lora = {"rank": rank, "alpha": 2 * rank}
    return ["--model.init_args.language_model.init_args.lora", json.dumps(lora)] if rank else []


def retrieval_ceilings(data_dir: Path, images: int) -> dict[str, float]:
    """Best reachable R@1 (%) on the first ``images`` val captions: shapes captions repeat ("a red square." …), and
    identical captions tie (ties count as misses) for image→text, and leave 1 in n images for text→image."""
    from collections import Counter

    import webdataset as wds

    urls = sorted(str(p) for p in (data_dir / "val").glob("captions-*.tar"))
    captions = [s["txt"].decode().strip() for s in wds.WebDataset(urls, shardshuffle=False)][:images]
    counts = Counter(captions)
    return {"i2t_r1_ceiling": 100.0 * sum(n == 1 for n in counts.values()) / len(captions),
            "t2i_r1_ceiling": 100.0 * len(counts) / len(captions)}


def val_metrics(cli: Any) -> dict[str, float]:
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items() if k.startswith("val/")}


def per_type(metrics: dict[str, float]) -> dict[str, float]:
    """VQA accuracy per question type (``val/vqa_acc_qtype/<type>``)."""
    return {k.rsplit("/", 1)[1]: v for k, v in metrics.items() if k.startswith("val/vqa_acc_qtype/")}


#: Stage-1 retrieval metrics (``val/<key>``) copied into the results.
RETRIEVAL = ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10", "r_mean", "rerank_i2t_r1", "rerank_t2i_r1", "rerank_r_mean")


def run_stages(vit: list[str], lm_export: Path, lora: list[str], data_dir: Path, run_dir: Path, stage1_steps: int,
               stage2_steps: int, val_batches: int, workers: int, itm_rerank_k: int) -> tuple[dict[str, Any], int]:
    """Stage 1 then stage 2 (from stage 1's Q-Former) on the frozen vision of ``vit``, under ``run_dir``; returns
    stage 1's retrieval and stage 2's VQA (overall and per question type), CIDEr-D and BLEU-4, and stage 1's batch
    size."""
    from mmlm.app.lightning import lightning_cli
    from mmlm.models.blip2_stage1 import load_stage1_qformer

    stage1 = lightning_cli([
        "fit", *stage_args("blip2_stage1.yaml", data_dir, run_dir / "stage1", stage1_steps, val_batches, workers),
        *vit, "--data.init_args.val", sources("blip2_stage1.yaml", "val", data_dir),
        "--model.init_args.itm_rerank_k", str(itm_rerank_k)])
    first = val_metrics(stage1)
    stage2 = lightning_cli([*stage_args("blip2_stage2.yaml", data_dir, run_dir / "stage2", stage2_steps, val_batches,
                                        workers), *vit,
                            "--model.init_args.language_model.init_args.name_or_path", str(lm_export), *lora], run=False)
    load_stage1_qformer(stage2.model, stage1.trainer.checkpoint_callback.best_model_path)
    stage2.trainer.fit(stage2.model, datamodule=stage2.datamodule)
    second = val_metrics(stage2)
    return {key: first.get(f"val/{key}", float("nan")) for key in RETRIEVAL} | {
        key: second.get(f"val/{key}", float("nan")) for key in ("vqa_acc", "cider", "bleu4")} | {
        "vqa_acc_by_type": per_type(second)}, stage1.datamodule.batch_size


def run_blip2_tiny(data_dir: str | Path = "data/shapes", out_dir: str | Path = "runs/blip2_tiny",
                   train_images: int = 6000, val_images: int = 500, lm_steps: int = 300, stage1_steps: int = 400,
                   stage2_steps: int = 400, val_batches: int = 8, itm_rerank_k: int = 8, workers: int = 1,
                   seed: int = 0, vision_backbone: str = "", compare_backbone: str = "",
                   lora_rank: int = 0, text_lm: str = "text_lm.yaml") -> dict[str, Any]:
    """Run the four steps; returns (and writes to ``out_dir/results.json``) the numbers of the table.

    ``vision_backbone``: a timm weights file of ``configs/tiny/dino.yaml``'s ViT to freeze in both stages
    (:func:`timm_backbone`); empty: the random transformers ViT of the stage configs. ``compare_backbone``: a second
    such file (e.g. ``random_backbone.safetensors``, the same ViT before DINO) also run through both stages with the
    same text LM, under ``out_dir/compare``; its numbers are printed beside (``results["compare"]``). ``lora_rank``:
    LoRA adapters of that rank on the stage-2 LM (:func:`lora_args`); 0: the LM stays wholly frozen, as in BLIP-2.
    ``text_lm``: the text LM's config in ``configs/tiny/`` (``text_lm_reading.yaml``: trained also on VQA lines after
    the image's caption, so that the frozen LM reads what precedes the question; give it ``lm_steps`` 3000)."""
    from mmlm.app.lightning import lightning_cli
    from mmlm.metrics import majority_answer_baseline

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    lora = lora_args(lora_rank)  # bad input is named before any work
    for name, path in (("--vision-backbone", vision_backbone), ("--compare-backbone", compare_backbone)):
        if path and not Path(path).is_file():
            raise RecipeInputError(f"{name} {path}: no such weights file (scripts/dino_tiny.py writes "
                                    "backbone.safetensors and random_backbone.safetensors)")
    if not (CONFIGS / "tiny" / text_lm).is_file():
        raise RecipeInputError(f"--text-lm {text_lm}: no such config in {CONFIGS / 'tiny'} (e.g. text_lm.yaml, "
                               "text_lm_reading.yaml)")
    ensure_data(data_dir, train_images, val_images, seed)
    vit = (timm_backbone(vision_backbone) if vision_backbone else
           ["--model.init_args.encoder.init_args.name_or_path", str(save_vit(out_dir / "vit", seed))])
    lm_export = out_dir / "text_lm" / "export"
    blind = val_metrics(lightning_cli(["fit", *stage_args(text_lm, data_dir, out_dir / "text_lm", lm_steps,
                                                          val_batches, workers),
                                       "--model.init_args.export_dir", str(lm_export)]))
    stages = partial(run_stages, lm_export=lm_export, lora=lora, data_dir=data_dir, stage1_steps=stage1_steps,
                     stage2_steps=stage2_steps, val_batches=val_batches, workers=workers, itm_rerank_k=itm_rerank_k)
    results, batch_size = stages(vit, run_dir=out_dir)
    images = min(val_images, val_batches * batch_size)
    if compare_backbone:
        results["compare"] = stages(timm_backbone(compare_backbone), run_dir=out_dir / "compare")[0]
        results["compare"]["vision"] = compare_backbone
    results |= retrieval_ceilings(data_dir, images)
    results |= {"chance_r1": 100.0 / images, "val_images_retrieval": images, "itm_rerank_k": itm_rerank_k,
                "majority_vqa_acc": majority_answer_baseline(*train_val_answers(data_dir)),
                "blind_lm_vqa_acc": blind.get("val/vqa_acc", float("nan")),
                "blind_lm_cider": blind.get("val/cider", float("nan")), "blind_lm_vqa_acc_by_type": per_type(blind),
                "steps": {"text_lm": lm_steps, "stage1": stage1_steps, "stage2": stage2_steps},
                "train_images": train_images, "vision": vision_backbone or "random transformers ViT",
                "stage2_lm": f"LoRA rank {lora_rank}" if lora_rank else "frozen", "text_lm": text_lm}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return results


def print_results(results: dict[str, Any], seconds: float) -> None:
    """Retrieval R@1 vs chance, VQA accuracy vs the majority answer and the blind LM, CIDEr, side by side; with
    ``results["compare"]`` (``--compare-backbone``) that encoder's numbers in a column of their own."""
    from rich.console import Console
    from rich.table import Table

    compare = results.get("compare")
    table = Table(title=f"BLIP-2 tiny two-stage run: held-out synthetic shapes ({seconds / 60:.1f} min); "
                        f"frozen vision: {results['vision']}"
                        + (f" (compared: {compare['vision']})" if compare else "")
                        + f"; stage-2 LM ({results['text_lm']}): {results['stage2_lm']}")
    columns = ("metric", "BLIP-2 tiny", *(("compared encoder",) if compare else ()), "baseline")
    for col in columns:
        table.add_column(col, justify="left" if col == "metric" else "right")

    def row(label: str, cell: Any, baseline: str) -> None:
        """``cell(run_results) -> str`` for this run and, when present, the compared encoder's."""
        cells = [cell(results), *([cell(compare)] if compare else [])] if callable(cell) else [cell] * (1 + bool(compare))
        table.add_row(label, *cells, baseline)

    def pct(key: str, scale: float = 1.0) -> Any:
        return lambda r: f"{scale * r[key]:.1f}%"

    chance = f"{results['chance_r1']:.1f}% (chance, {results['val_images_retrieval']} images)"
    k = results["itm_rerank_k"]
    row("stage 1 R@1 image→text (ITC)", pct("i2t_r1"), chance)
    row("stage 1 R@1 text→image (ITC)", pct("t2i_r1"), chance)
    row("  (best reachable R@1: duplicate captions)", "",
        f"i2t {results['i2t_r1_ceiling']:.1f}%, t2i {results['t2i_r1_ceiling']:.1f}%")
    row("stage 1 R@10 image→text / text→image (ITC)", lambda r: f"{r['i2t_r10']:.1f}% / {r['t2i_r10']:.1f}%",
        f"{10 * results['chance_r1']:.1f}% (chance)")
    if k > 0:
        row(f"stage 1 R@1 image→text (ITM top-{k})", pct("rerank_i2t_r1"), chance)
        row(f"stage 1 R@1 text→image (ITM top-{k})", pct("rerank_t2i_r1"), chance)
    row("stage 2 VQA accuracy", pct("vqa_acc", 100), f"{100 * results['majority_vqa_acc']:.1f}% (majority answer)")
    row("", "", f"{100 * results['blind_lm_vqa_acc']:.1f}% (frozen text LM alone, blind)")
    blind = results["blind_lm_vqa_acc_by_type"]
    for kind in sorted(results["vqa_acc_by_type"]):
        row(f"  {kind} questions", lambda r, kind=kind: f"{100 * r['vqa_acc_by_type'].get(kind, float('nan')):.1f}%",
            f"{100 * blind.get(kind, float('nan')):.1f}% (blind)")
    row("stage 2 CIDEr-D", lambda r: f"{r['cider']:.3f}", f"{results['blind_lm_cider']:.3f} (text LM alone, blind)")
    row("stage 2 BLEU-4", lambda r: f"{r['bleu4']:.3f}", "-")
    Console(width=max(Console().width, 120)).print(table)  # rows read best unwrapped


def main(argv: list[str] | None = None) -> int:
    return recipe_main(run_blip2_tiny, print_results, __doc__, argv)


if __name__ == "__main__":
    raise SystemExit(main())
