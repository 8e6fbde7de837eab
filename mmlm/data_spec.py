"""What a model tells the datamodule that feeds it: one typed :class:`DataSpec`, returned by
``MultimodalModule.data_spec()`` and resolved once by the datamodule (``WebDataModule.model_spec``). An argument given
to the datamodule wins over the spec's value; the datamodule never reads any other attribute of the model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mmlm.encoders.base import ImagePreprocess
    from mmlm.sentences import Marker


@dataclass(frozen=True)
class DataSpec:
    """The model's side of the data contract.

    Attributes:
        tokenizer: the model's Hugging Face tokenizer (its ids, special tokens and padding are the batches').
        image_preprocess: size, mean, std and interpolation of the model's vision encoder; ``None`` without one.
        markers: the modality markers of multimodal sentences (KOSMOS-1's image marker, PaLM-E's image, state and
            object markers), ``()`` for families without sentences.
        state_dim: width Ds of PaLM-E's ``<state>`` vectors, else ``None``.
        object_dim: width Do of PaLM-E's ``<obj>`` vectors, else ``None``.
        align_long_axis: Donut: rotate a document whose long axis disagrees with the input size; ``None`` elsewhere.
        add_tokens: tokens the data needs that the model must learn (Donut's ``<s_key>`` tags, collected from the
            ground truth): the datamodule calls it once, with the sorted tokens, before building any batch; ``None``
            for a model that takes none.
        end_token_id: the token that ends every target, which the model learns to emit and stops generating at;
            ``None``: the tokenizer's eos. BLIP-2 checkpoints converted from LAVIS's OPT models end text with ``"\\n"``
            (their generation config's eos), not the tokenizer's ``</s>``.
        instruction_tokenizer: the tokenizer of a second reading of each example's prompt (BLIP-2's instruction-aware
            Q-Former, InstructBLIP's ``qformer_input_ids``): the datamodule tokenises every prompt with it into
            ``instruction_ids``; ``None`` for a model that takes none.
    """

    tokenizer: Any = None
    image_preprocess: ImagePreprocess | None = None
    markers: tuple[Marker, ...] = ()
    state_dim: int | None = None
    object_dim: int | None = None
    align_long_axis: bool | None = None
    add_tokens: Callable[[Sequence[str]], None] | None = None
    end_token_id: int | None = None
    instruction_tokenizer: Any = None

    def require(self, name: str, needed_by: str, argument: str) -> Any:
        """The value of field ``name``.

        Raises:
            ValueError: it is unset (``None`` or ``()``), naming ``needed_by`` (the datamodule) and the ``argument``
                that would give it explicitly.
        """
        value = getattr(self, name)
        if value is None or value == ():
            raise ValueError(f"{needed_by} needs {argument}=… or a trainer whose model's data_spec() gives {name}")
        return value
