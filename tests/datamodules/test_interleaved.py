"""Interleaved documents: both layouts, converters, truncation, loss masks, mixing, packing, k-shot prompts."""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
import webdataset as wds
from PIL import Image

from datamodules.interleaved import InterleavedDataModule, MixSource, document_segments
from datamodules.pipeline.skips import SkipSample, collecting_notes
from datamodules.synthetic.interleaved import write_interleaved
from datamodules.tools.interleaved import convert
from mmlm.sentences import IGNORE_INDEX

M = 3  # placeholders per image


def jpeg(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


RED, BLUE = jpeg((220, 30, 30)), jpeg((30, 80, 230))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("interleaved")
    return write_interleaved(out, docs=16, pairs=8, texts=8, val=8, support=6, shard_size=4)


def module(synth, **kwargs) -> InterleavedDataModule:
    urls = synth["urls"]
    defaults = dict(train=[MixSource(urls["docs"])], val=[MixSource(urls["val"], kind="vqa")],
                    tokenizer=synth["tokenizer"], image_size=16, image_tokens=M, batch_size=4, max_tokens=96,
                    vqa_prompt="{}", demo_template="{prompt} {target}.", support=urls["support"],
                    match_question_type=True, shuffle_buffer=0)
    data = InterleavedDataModule(**{**defaults, **kwargs})
    data.setup()
    return data


def builder(data: InterleavedDataModule, stage: str = "fit"):
    return data.example_fn(stage, data.sources["fit" if stage == "fit" else "validate"])


def words(data, ids) -> list[str]:
    return [data.resolved.tokenizer.convert_ids_to_tokens(int(i)) if i != IGNORE_INDEX else "_" for i in ids]


def obelics(texts, refs, **members) -> dict:
    return {"__key__": "doc", "json": json.dumps({"texts": texts, "images": refs}).encode(), **members}


def test_obelics_and_mmc4_layouts_give_the_same_sentence(synth):
    data = module(synth)
    first = obelics(["a red circle.", None, "two blue squares.", None],
                    [None, "0.jpg", None, {"base64": base64.b64encode(BLUE).decode()}], **{"0.jpg": RED})
    info = [{"member": "0.jpg", "matched_text_index": 1, "matched_sim": 0.3},
            {"image_base64": base64.b64encode(BLUE).decode(), "matched_text_index": 2, "matched_sim": 0.3}]
    second = {"__key__": "doc", "0.jpg": RED,
              "json": json.dumps({"text_list": ["a red circle.", "two blue squares.", ""], "image_info": info}).encode()}
    a, b = builder(data)(first, 0), builder(data)(second, 0)
    assert a.sentence.ids == b.sentence.ids and torch.equal(a.items["image"], b.items["image"])
    tokens = words(data, a.sentence.ids)
    assert tokens[:6] == ["<s>", "a", "red", "circle", ".", "<image>"] and tokens[-1] == "</s>"
    assert [s.start for s in a.sentence.spans] == [6, 6 + M + 2 + 4]
    assert a.items["image"][0].mean() != a.items["image"][1].mean()  # red then blue, in reading order


def test_labels_only_on_text_tokens(synth):
    data = module(synth)
    sample = builder(data)(obelics([None, "red.", None, "blue."], ["0.jpg", None, "1.jpg", None],
                                   **{"0.jpg": RED, "1.jpg": BLUE}), 0)
    labelled = [t for t, lab in zip(words(data, sample.sentence.ids), sample.sentence.labels()) if lab != IGNORE_INDEX]
    assert labelled == ["red", ".", "blue", ".", "</s>"]


@pytest.mark.parametrize("doc, reason", [
    (obelics(["a", None], ["0.jpg", None], **{"0.jpg": RED}), "bad_document"),
    ({"__key__": "x", "json": b'{"title": "no layout"}'}, "bad_document"),
])
def test_bad_documents_are_skipped_with_a_reason(doc, reason):
    with pytest.raises(SkipSample) as err:
        document_segments(doc)
    assert err.value.reason == reason


def test_a_missing_image_is_left_out_and_the_document_kept():
    """An undownloaded image (no member, no base64) drops that image only, counted as a conversion."""
    doc = obelics(["a", None, "b", None], [None, "0.jpg", None, "1.jpg"], **{"1.jpg": RED})
    with collecting_notes() as notes:
        assert document_segments(doc) == ["a", "b", RED]
    assert notes.skipped == {"converted_missing_image": 1}


def test_max_images_and_max_tokens_never_cut_an_image(synth):
    texts, refs = [None, "red.", None, "blue.", None, "red."], ["0.jpg", None, "1.jpg", None, "2.jpg", None]
    doc = obelics(texts, refs, **{"0.jpg": RED, "1.jpg": BLUE, "2.jpg": RED})
    two = builder(module(synth, max_images=2))(doc, 0)
    assert len(two.sentence.spans) == 2 and two.items["image"].shape[0] == 2
    assert words(module(synth), two.sentence.ids)[-1] != "</s>"  # the document was cut: no end token
    with pytest.raises(SkipSample, match="empty_document"):  # <s> + a whole image span do not fit: no text
        builder(module(synth, max_tokens=4))(doc, 0)
    for limit in range(7, 20):
        cut = builder(module(synth, max_tokens=limit))(doc, 0)
        assert len(cut.sentence) <= limit and cut.items.get("image", torch.empty(0)).shape[0] == len(cut.sentence.spans)
        for span in cut.sentence.spans:  # every kept span is whole, wrappers included
            assert span.outer[1] <= len(cut.sentence)


def test_mixing_weights_and_packing_lower_padding(synth):
    urls = synth["urls"]
    train = [MixSource(urls["docs"], weight=1.0), MixSource(urls["captions"], "caption", 1.0),
             MixSource(urls["text"], "text", 1.0)]
    padded = module(synth, train=train, pack=False, epoch_samples=48, resampled=True, batch_size=8)
    packed = module(synth, train=train, pack=True, epoch_samples=48, resampled=True, batch_size=8)
    pad_batches, pack_batches = list(padded.train_dataloader()), list(packed.train_dataloader())
    kinds = {"image": 0, "text": 0}
    for batch in pad_batches:
        for spans in batch.spans:
            kinds["image" if spans else "text"] += 1
    assert kinds["image"] > 0 and kinds["text"] > 0  # documents/pairs and text-only samples both drawn
    assert sum(b.num_samples for b in pack_batches) == sum(b.num_samples for b in pad_batches) == 48
    assert sum(len(b) for b in pack_batches) < sum(len(b) for b in pad_batches)
    pad_fraction = sum(b.padding_fraction() for b in pad_batches) / len(pad_batches)
    pack_fraction = sum(b.padding_fraction() for b in pack_batches) / len(pack_batches)
    assert pack_fraction < pad_fraction
    assert all(int(b.segment_ids.max()) >= 1 for b in pack_batches) and any(b.packed for b in pack_batches)


def test_k_shot_prompts_use_demos_of_the_same_type_and_never_the_query_image(synth):
    data = module(synth, shots=2)
    batch = next(iter(data.val_dataloader()))
    query_ids = set()
    for row in range(len(batch)):
        spans = batch.prompt_spans[row]
        assert len(spans) == 3  # two demos + the query
        query = batch.images[spans[-1].item]
        for demo in spans[:-1]:
            assert not torch.equal(batch.images[demo.item], query)
        query_ids.add(spans[-1].item)
        prompt = words(data, batch.prompt_ids[row][batch.prompt_mask[row].bool()])
        assert prompt.count("<image>") == 3 and prompt[-1] == "?" and prompt[0] == "<s>"
        labelled = [lab for lab in batch.labels[row].tolist() if lab != IGNORE_INDEX]
        assert len(labelled) == 2  # the answer and </s>
    assert batch.tasks == ["vqa"] * len(batch) and len(batch.references) == len(batch)


def test_k_shot_demos_exclude_the_query_image_even_when_the_support_holds_it(synth):
    data = module(synth, shots=4, support=synth["urls"]["val"], match_question_type=False)  # support = the queries
    make = builder(data, "validate")
    for sample in wds.WebDataset(synth["urls"]["val"], shardshuffle=False):
        out = make(sample, 0)
        query = out.items["image"][-1]
        assert all(not torch.equal(out.items["image"][i], query) for i in range(len(out.items["image"]) - 1))


def test_zero_shot_prompt_is_the_query_alone(synth):
    batch = next(iter(module(synth, shots=0).val_dataloader()))
    assert all(len(spans) == 1 for spans in batch.prompt_spans)


def test_converters_round_trip_into_the_datamodule(synth, tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.jpg").write_bytes(RED)
    uri = "data:image/jpeg;base64," + base64.b64encode(BLUE).decode()
    lines = [{"texts": ["a red circle.", None, None, "two blue squares."], "images": [None, "r.jpg", uri, None]},
             {"texts": [None, "lost image."], "images": ["https://example.com/x.jpg", None]},
             {"texts": [None], "images": ["r.jpg"]}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\nnot json\n")
    summary = convert(tmp_path / "docs.jsonl", tmp_path / "obelics", "obelics", tmp_path / "img", shard_size=2)
    assert (summary["documents"], summary["images"], summary["images_missing"]) == (2, 2, 1)
    assert (summary["skipped_no_text"], summary["skipped_bad_line"]) == (1, 1)
    mmc4 = [{"text_list": ["a red circle.", "two blue squares."],
             "image_info": [{"image_name": "r.jpg", "matched_text_index": 1, "matched_sim": 0.3},
                            {"image_name": "gone.jpg", "matched_text_index": 0, "matched_sim": 0.3}]}]
    (tmp_path / "mmc4.jsonl").write_text(json.dumps(mmc4[0]) + "\n")
    m = convert(tmp_path / "mmc4.jsonl", tmp_path / "mmc4", "mmc4", tmp_path / "img")
    assert (m["documents"], m["images"], m["images_missing"]) == (1, 1, 1)
    data = module(synth, train=[MixSource([summary["urls"], m["urls"]])], batch_size=3)
    batch = next(iter(data.train_dataloader()))
    assert batch.num_samples == 3 and batch.images.shape[0] == 2 + 0 + 1


def test_unknown_source_kind_fails_loudly():
    with pytest.raises(ValueError, match="kind 'pairs'"):
        MixSource("x.tar", kind="pairs")


LONG = " ".join(f"line {i}: a red </s> circle, a <pad> blue square." for i in range(30))


@pytest.mark.parametrize("pack", [False, True])
def test_a_long_text_document_continues_in_the_next_rows_with_no_text_lost(tmp_path, pack):
    from byte_tokenizers import byte_bpe_tokenizer

    from mmlm.sentences import text_ids

    byte_bpe_tokenizer([LONG], out_dir=tmp_path / "tok")
    data = InterleavedDataModule(train=[MixSource(str(tmp_path / "none-*.tar"), "text")], tokenizer=str(tmp_path / "tok"),
                                 image_size=16, image_tokens=M, max_tokens=48, pack=pack)
    data.setup()
    build = data.example_fn("fit", data.sources["fit"])
    samples = [build({"__key__": "long", "txt": LONG.encode()}, 0), build({"__key__": "short", "txt": b"a red."}, 0)]
    batch = data.collate_fn("fit")(samples)
    doc = text_ids(data.resolved.tokenizer, LONG)
    eos, bos = data.resolved.tokenizer.eos_token_id, data.resolved.tokenizer.bos_token_id
    assert batch.input_ids.shape[1] <= 48 and int(batch.attention_mask.sum()) > 48
    targets = [int(t) for t in batch.labels.flatten() if t != IGNORE_INDEX]
    short = text_ids(data.resolved.tokenizer, "a red.") + [eos]
    assert len(targets) == len(doc) + 1 + len(short)  # every token of both documents is a target once
    if not pack:  # one row each, in order: the long document's rows first
        rows = len(batch) - 1
        assert rows == 1 + -(-(len(doc) + 2 - 48) // 47)
        assert targets[:len(doc) + 1] == doc + [eos]
        assert data.resolved.tokenizer.decode(targets[:len(doc)]) == LONG  # literal </s> and <pad> stayed text
        assert all(int(batch.input_ids[r, 0]) == bos for r in range(rows))
