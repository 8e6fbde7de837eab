"""mmlm.app.recipes: the tiny recipes' command lines come from their run functions' signatures."""

from __future__ import annotations

import pytest

from mmlm.app.recipes import recipe_main, recipe_parser


def run_toy(data_dir: str = "data/x", steps: int = 3, lr: float = 1e-3, packed: bool = True) -> dict:
    """Toy recipe."""
    return {"data_dir": data_dir, "steps": steps, "lr": lr, "packed": packed}


def test_flags_take_the_types_and_defaults_of_the_signature():
    args = recipe_parser(run_toy, "Toy recipe.\n\nMore.").parse_args(["--steps", "7", "--lr", "0.5", "--packed", "no"])
    assert vars(args) == {"data_dir": "data/x", "steps": 7, "lr": 0.5, "packed": False}
    with pytest.raises(SystemExit):
        recipe_parser(run_toy, None).parse_args(["--packed", "maybe"])


def test_main_runs_and_reports_the_results_with_the_time():
    seen = []
    assert recipe_main(run_toy, lambda results, seconds: seen.append((results, seconds)), None, ["--steps", "2"]) == 0
    (results, seconds), = seen
    assert results["steps"] == 2 and results["packed"] is True and seconds >= 0


def test_an_unusable_value_ends_as_one_usage_error_before_the_report(capsys):
    """A :class:`RecipeInputError` prints argparse's usage and one ``error:`` line naming the flag, exit code 2; any
    other exception propagates as it is."""
    from mmlm.app.recipes import RecipeInputError

    def run_checked(steps: int = 3) -> dict:
        if steps < 1:
            raise RecipeInputError(f"--steps {steps}: expected at least 1")
        raise RuntimeError("a failure during the work")

    reported = []
    with pytest.raises(SystemExit) as exit_info:
        recipe_main(run_checked, lambda results, seconds: reported.append(results), None, ["--steps", "0"])
    assert exit_info.value.code == 2 and not reported
    err = capsys.readouterr().err
    assert err.startswith("usage:") and err.strip().splitlines()[-1].endswith("error: --steps 0: expected at least 1")
    with pytest.raises(RuntimeError, match="during the work"):
        recipe_main(run_checked, lambda results, seconds: reported.append(results), None, [])
