"""``scripts/dino_tiny.py`` end to end at toy size (the tiny config's ViT, 4 steps): k-NN before and after, the
collapse check, both backbone files."""

from __future__ import annotations

import json
import math
import sys

from recipe_scripts import load_script


def test_dino_tiny_prints_knn_before_and_after_and_the_teacher_entropies(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setattr(sys, "argv", ["dino_tiny"])
    out = tmp_path / "out"
    results = load_script("dino_tiny").main(["--steps", "4", "--train", "48", "--val", "24",
                                             "--data", str(tmp_path / "data"), "--out", str(out), "--workers", "0"])
    printed = capsys.readouterr().out
    assert "k-NN top-1  shape: DINO" in printed and "teacher targets at the last step" in printed
    assert json.loads((out / "results.json").read_text()) == results
    assert results["ln_K"] == round(math.log(1024), 3)
    for name in ("teacher_entropy", "teacher_mean_entropy"):  # logged by Dino.training_loss, in nats
        assert 0.0 <= results["last_step"][name] <= results["ln_K"] + 1e-3
    assert results["last_step"]["teacher_entropy"] <= results["last_step"]["teacher_mean_entropy"] + 1e-3
    assert "linear probe top-1  shape: DINO" in printed
    for stage in ("random_init", "dino", "linear_random_init", "linear_dino"):
        assert set(results[stage]) == {"shape", "colour"} and all(0 <= v <= 1 for v in results[stage].values())
    random_init = load_file(str(out / "random_backbone.safetensors"))
    trained = load_file(str(out / "backbone.safetensors"))
    assert random_init.keys() == trained.keys()
    assert any(not (random_init[k] == trained[k]).all() for k in trained)  # 4 steps moved the teacher
