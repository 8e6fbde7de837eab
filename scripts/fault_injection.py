"""Fault injection: one tiny ``mmlm fit`` epoch, interrupted again and again, resumed each time.

The run trains ``tests/resume_probe.KeyModel`` (one linear layer) on generated shapes shards (two mixed sources,
2 DataLoader workers, a shuffle buffer; a checkpoint every ``--every`` steps, all kept, plus ``last.ckpt``) and
``tests/resume_probe.KeyRecorder`` writes the keys of every training batch. Faults, in a random order of launches
(seeded): SIGKILL at random steps (``--kills`` times; work after the newest checkpoint is lost and redone), SIGTERM
once (a preemption: the step it arrives at is saved, exit 143), and once the newest checkpoints are cut in half
before the restart (a full disk: ``--ckpt_path last`` passes over them with a warning). Every restart is the same
command with ``--ckpt_path last``.

The report: per launch its fault, the step it resumed from and stopped at; then, over the whole run, the batches
computed, those redone (lost with a SIGKILL or a cut checkpoint), and — for the sequence of batches the final
weights were trained on (each launch's batches up to the step the next launch resumed from) — samples trained,
samples repeated and samples missing against one uninterrupted epoch of the same data settings. Exactness means repeated = missing = 0 and the
same order.

    python scripts/fault_injection.py --out /tmp/faults            # prints JSON and a Markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"
sys.path[:0] = [str(REPO), str(TESTS)]


def cut_newest(folder: Path) -> list[str]:
    """Cut ``last.ckpt`` and the newest step checkpoint to half their size (a write stopped by a full disk)."""
    steps = sorted(folder.glob("epoch=*-step=*.ckpt"), key=lambda p: p.stat().st_mtime)
    cut = [path for path in (folder / "last.ckpt", *steps[-1:]) if path.is_file()]
    for path in cut:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [p.name for p in cut]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="working folder (data, checkpoints, key logs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault steps and their order")
    parser.add_argument("--samples", type=int, default=192, help="epoch_samples")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--every", type=int, default=4, help="checkpoint every N steps")
    parser.add_argument("--kills", type=int, default=4, help="SIGKILLs at random steps")
    args = parser.parse_args()
    from resume_probe import fit_command, recorded, uninterrupted_epoch

    from datamodules.synthetic.shapes import write_shapes

    if args.out.exists() and any(args.out.iterdir()):
        raise SystemExit(f"--out {args.out} is not empty: give a new folder")
    data, root = args.out / "data", args.out / "run"
    write_shapes(data, train=48, val=0, seed=0, shard_size=8, progress=False)
    steps = args.samples // args.batch
    rng = random.Random(args.seed)
    endings = ["SIGKILL"] * args.kills + ["SIGTERM"]  # how each launch but the last ends
    rng.shuffle(endings)
    cut_before = rng.randint(1, len(endings))  # the restart before which the newest checkpoints are cut
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    launches, kept, computed, redone, position, started = [], [], 0, 0, 0, time.time()
    cut_done = False
    for n, ending in enumerate([*endings, None]):
        keys = args.out / f"keys{n}.tsv"
        # the cut waits for a restart with an older checkpoint to fall back to
        older = len({p.name for p in (root / "ckpt").glob("epoch=*-step=*.ckpt")}) >= 2
        cut = cut_newest(root / "ckpt") if n >= cut_before and not cut_done and older else []
        cut_done = cut_done or bool(cut)
        kill_step = rng.randint(position + 1, min(position + 2 * args.every, steps - 1)) if ending else -1
        command = fit_command(data, root, keys, batch=args.batch, samples=args.samples, every=args.every,
                              kill_after=kill_step, kill_signal=ending or "SIGKILL", top_k=-1)
        command += ["--ckpt_path=last"] if n > 0 else []
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        rows = recorded(keys)
        resumed_from = rows[0][0] - 1 if rows else position
        for earlier in kept:  # batches after the checkpoint this launch resumed from were lost with their launch
            redone += sum(step > resumed_from for step, _ in earlier)
            earlier[:] = [(step, batch) for step, batch in earlier if step <= resumed_from]
        kept.append(rows)
        computed += len(rows)
        position = rows[-1][0] if rows else resumed_from
        warnings = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
        launches.append({"launch": n, "ends_with": ending or "end of epoch", "cut_before": cut,
                         "resumed_from_step": resumed_from, "stopped_after_step": position,
                         "exit": proc.returncode, "checkpoint_warnings": len(warnings)})
        if ending is None and proc.returncode != 0:
            raise SystemExit(f"the last launch exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    trained = [keys for rows in kept for _, keys in rows]
    epoch = uninterrupted_epoch(data, args.batch, args.samples)
    seen, expected = Counter(k for b in trained for k in b), Counter(k for b in epoch for k in b)
    report = {"launches": launches, "batches_per_epoch": steps, "batches_computed": computed,
              "batches_redone": redone,
              "samples_trained": sum(seen.values()), "samples_repeated": sum((seen - expected).values()),
              "samples_missing": sum((expected - seen).values()), "same_order": trained == epoch,
              "seconds": round(time.time() - started, 1)}
    print(json.dumps(report, indent=1))
    print("\n| launch | before it | resumed from step | stopped after step | by | exit | warnings |")
    print("|---|---|---|---|---|---|---|")
    for launch in launches:
        before = f"cut {' and '.join(launch['cut_before'])} in half" if launch["cut_before"] else ""
        print(f"| {launch['launch']} | {before} | {launch['resumed_from_step']} | {launch['stopped_after_step']} | "
              f"{launch['ends_with']} | {launch['exit']} | {launch['checkpoint_warnings']} |")


if __name__ == "__main__":
    main()
