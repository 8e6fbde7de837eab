"""The family contract, in one process, for every tiny config under ``configs/tiny/``:

1. the model and datamodule build as ``mmlm fit --config configs/tiny/<name>.yaml`` builds them (``MMLMCLI`` with
   ``run=False``), and one training batch gives a finite scalar loss through the model's ``training_step``;
2. after backward, no frozen parameter (``requires_grad=False``) has a gradient, every gradient is finite and some
   trainable parameter's is non-zero;
3. one step of the optimiser from the model's own ``configure_optimizers`` moves some trainable parameter and leaves
   every frozen one bitwise unchanged;
4. a family whose evaluation produces text (a ``GenerationEvaluator`` or ``DocumentEvaluator``) generates exactly one
   string per example of a validation batch; the others are skipped, after checking that they refuse to generate;
5. ``model.state_dict()`` survives ``torch.save`` → ``torch.load(weights_only=True)`` → strict ``load_state_dict`` into
   a freshly built model of the same config, bitwise.

The configs run as written from a workspace holding the ``data/`` paths they name (``tiny_runs.write_workspace``),
with small batches and no loader workers. Configs that export what a later one loads (``model.init_args.export_dir``:
text_lm's LM for frozen and blip2_stage2, donut_read's model for donut_cord) are built and exported first by their own
``on_fit_end``, the hook ``mmlm fit`` ends with. No trainer loop runs: the step below calls the hooks Lightning's
automatic optimisation calls around it (``on_train_batch_start``, ``on_after_backward``, ``on_before_optimizer_step``).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from pytorch_lightning import LightningDataModule, Trainer
from test_ddp_contract import JOBS
from tiny_runs import tensor_digest, write_workspace

from mmlm.app.lightning import lightning_cli
from mmlm.evaluation import DocumentEvaluator, GenerationEvaluator
from mmlm.models.base import MultimodalModule

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny"
#: every tiny config once, in the DDP contract's run order (exporting configs before those that load their export)
CONFIGS = list(dict.fromkeys(config for config, _, _ in JOBS.values()))
BUILD = ["--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--data.init_args.num_workers=0"]
#: evaluators whose rows are generated text (item 4)
GENERATIVE = (GenerationEvaluator, DocumentEvaluator)


@dataclass
class Family:
    """One config's model, datamodule (set up for fit) and trainer, as ``mmlm fit`` builds them."""

    model: MultimodalModule
    datamodule: LightningDataModule
    trainer: Trainer


@dataclass
class StepRecord:
    """What one training step of a family did (items 1-3).

    Attributes:
        loss: the detached loss ``training_step`` returned.
        frozen: names of the parameters without ``requires_grad``.
        with_grad: names of the parameters whose ``.grad`` is set after backward.
        nonzero_grad: names of the parameters with a non-zero gradient.
        nonfinite_grad: names of the parameters with a NaN or infinite gradient entry.
        before: :func:`tiny_runs.tensor_digest` per parameter before the step (before the forward).
        after: the same after ``optimizer.step()``.
    """

    loss: torch.Tensor
    frozen: set[str]
    with_grad: set[str]
    nonzero_grad: set[str]
    nonfinite_grad: list[str]
    before: dict[str, str]
    after: dict[str, str]

    @property
    def trainable(self) -> set[str]:
        return set(self.before) - self.frozen


def build(name: str) -> Family:
    """``configs/tiny/<name>.yaml`` built by the ``mmlm`` LightningCLI (``run=False``: its config checks, seed and
    classes, nothing run), with the datamodule attached to the trainer and set up for fit as ``Trainer.fit`` does: it
    reads the tokenizer and image size from the model, and Donut's adds its task tokens to the model."""
    batch_size = "2" if name.startswith("donut") else "4"
    cli = lightning_cli(["--config", str(TINY / f"{name}.yaml"), *BUILD, f"--data.init_args.batch_size={batch_size}"],
                        run=False)
    cli.trainer.strategy.connect(cli.model)  # trainer.lightning_module, which the datamodule's setup asks for
    cli.datamodule.trainer = cli.trainer
    cli.datamodule.setup("fit")
    return Family(cli.model, cli.datamodule, cli.trainer)


def exports(name: str) -> bool:
    """Whether a config's model writes an export at the end of fit (``model.init_args.export_dir``)."""
    return bool(yaml.safe_load((TINY / f"{name}.yaml").read_text())["model"]["init_args"].get("export_dir"))


def export(family: Family) -> None:
    """Write the family's export with its own ``on_fit_end`` (the untrained weights: later configs only load them)."""
    family.model.trainer = family.trainer
    family.model.on_fit_end()


def first_batch(loaders: Any) -> Any:
    """The first batch of a loader, or of the first of a list of loaders."""
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    return next(iter(loader))


def digests(model: torch.nn.Module) -> dict[str, str]:
    return {name: tensor_digest(param) for name, param in model.named_parameters()}


def optimizer_of(model: MultimodalModule) -> torch.optim.Optimizer:
    """The optimiser of ``model.configure_optimizers()`` (a bare optimiser or Lightning's dict form)."""
    configured = model.configure_optimizers()
    return configured["optimizer"] if isinstance(configured, dict) else configured


def train_one_batch(family: Family) -> StepRecord:
    """One training batch through ``training_step``, backward and one optimiser step, with the hooks Lightning runs
    around them; parameters are hashed before the forward and after the step."""
    model = family.model
    batch = first_batch(family.datamodule.train_dataloader())
    optimizer = optimizer_of(model)
    model.train()  # what fit does; frozen parts keep themselves in eval mode
    before = digests(model)
    model.on_train_batch_start(batch, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*`self\.log\(\)`.*")  # no trainer loop: logging is a no-op
        loss = model.training_step(batch, 0)
    loss.backward()
    model.on_after_backward()
    params = dict(model.named_parameters())
    grads = {name: p.grad for name, p in params.items() if p.grad is not None}
    record = StepRecord(loss=loss.detach(), frozen={name for name, p in params.items() if not p.requires_grad},
                        with_grad=set(grads), nonzero_grad={name for name, g in grads.items() if g.count_nonzero()},
                        nonfinite_grad=[name for name, g in grads.items() if not torch.isfinite(g).all()],
                        before=before, after={})
    model.on_before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record.after = digests(model)
    return record


class Families(dict):
    """``name → Family``, built on first use."""

    def __missing__(self, name: str) -> Family:
        self[name] = build(name)
        return self[name]


class Steps(dict):
    """``name → StepRecord`` of the family's one training step, run on first use."""

    def __init__(self, families: Families) -> None:
        super().__init__()
        self.families = families

    def __missing__(self, name: str) -> StepRecord:
        self[name] = train_one_batch(self.families[name])
        return self[name]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Iterator[Path]:
    """The tiny configs' ``data/`` written once, as the working directory of this module's tests, with the exports
    that later configs load already written."""
    root = write_workspace(tmp_path_factory.mktemp("family_contract"))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr(sys, "argv", ["mmlm"])  # LightningCLI warns when it is given both args and a command line
        for name in filter(exports, CONFIGS):
            export(build(name))
        yield root


@pytest.fixture(scope="module")
def families(workspace) -> Families:
    return Families()


@pytest.fixture(scope="module")
def steps(families) -> Steps:
    return Steps(families)


def test_every_tiny_config_is_covered():
    assert sorted(CONFIGS) == sorted(path.stem for path in TINY.glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_one_training_batch_gives_a_finite_scalar_loss(steps, name):
    loss = steps[name].loss
    assert loss.ndim == 0, f"{name}: training_step returned a loss of shape {tuple(loss.shape)}"
    assert torch.isfinite(loss), f"{name}: loss {loss.item()}"


@pytest.mark.parametrize("name", CONFIGS)
def test_backward_reaches_trainable_parameters_only(steps, name):
    record = steps[name]
    assert not record.with_grad & record.frozen, f"{name}: frozen parameters got gradients: " \
                                                 f"{sorted(record.with_grad & record.frozen)[:10]}"
    assert not record.nonfinite_grad, f"{name}: non-finite gradients in {record.nonfinite_grad[:10]}"
    assert record.nonzero_grad & record.trainable, f"{name}: no trainable parameter got a non-zero gradient"


@pytest.mark.parametrize("name", CONFIGS)
def test_optimizer_step_moves_trainable_and_keeps_frozen_parameters(steps, name):
    record = steps[name]
    moved = {key for key, digest in record.before.items() if record.after[key] != digest}
    assert moved & record.trainable, f"{name}: the optimizer step changed no trainable parameter"
    assert not moved & record.frozen, f"{name}: frozen parameters changed: {sorted(moved & record.frozen)[:10]}"


@pytest.mark.parametrize("name", CONFIGS)
def test_generation_gives_one_string_per_validation_example(families, name):
    model = families[name].model
    batch = first_batch(families[name].datamodule.val_dataloader())
    model.eval()
    kinds = [type(e).__name__ for e in model.evaluation.evaluators]
    if not any(isinstance(e, GENERATIVE) for e in model.evaluation.evaluators):
        with pytest.raises(NotImplementedError):
            model.generate_text(batch)
        pytest.skip(f"{type(model).__name__} generates no text (its evaluation: {', '.join(kinds)})")
    with torch.no_grad():
        texts = model.generate_text(batch)
    assert isinstance(texts, list) and all(isinstance(text, str) for text in texts), f"{name}: {texts!r}"
    assert len(texts) == len(batch), f"{name}: {len(texts)} texts for {len(batch)} examples"


@pytest.mark.parametrize("name", CONFIGS)
def test_state_dict_round_trip_into_a_fresh_model_is_bitwise(families, name, tmp_path):
    model = families[name].model
    torch.manual_seed(1)
    with torch.no_grad():  # weights no fresh build of the config can have: the load must put them there
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.rand_like(tensor))
    state = model.state_dict()
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)

    fresh = build(name).model
    before = fresh.state_dict()
    assert any(key not in before or not torch.equal(before[key], value) for key, value in state.items()), name
    fresh.load_state_dict(loaded, strict=True)
    restored = fresh.state_dict()
    assert restored.keys() == state.keys()
    differ = [key for key, value in state.items() if tensor_digest(restored[key]) != tensor_digest(value)]
    assert not differ, f"{name}: not bitwise equal after the round trip: {differ[:10]}"


def test_no_family_overrides_a_private_hook_of_the_base():
    """A family composes the base (evaluators, ``training_loss``, public hooks); it never replaces a ``_name`` of
    :class:`MultimodalModule` or of Lightning's module."""
    import inspect

    import mmlm.models
    from mmlm.models import MultimodalModule

    private = {name for klass in MultimodalModule.__mro__ for name in vars(klass)
               if name.startswith("_") and not name.startswith("__")}
    families = [getattr(mmlm.models, name) for name in mmlm.models.__all__]
    overriding = {family.__name__: sorted(set(vars(family)) & private) for family in families
                  if inspect.isclass(family) and issubclass(family, MultimodalModule) and family is not MultimodalModule}
    assert len(overriding) >= 15 and {name: hooks for name, hooks in overriding.items() if hooks} == {}
