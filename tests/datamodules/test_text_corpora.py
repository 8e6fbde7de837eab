"""Text-only corpora: plain text files → shards → batches; caption shards read as text."""

from __future__ import annotations

import torch

from datamodules.text_corpora import TextDataModule, documents, write_text_shards
from mmlm.losses import IGNORE_INDEX


def test_text_files_round_trip_through_shards_into_batches(shapes_data, tmp_path):
    (tmp_path / "a.txt").write_text("a red circle.\n\n\nthree shapes:\na blue square.\n\n  \n")
    (tmp_path / "b.txt").write_text("two triangles.")
    assert list(documents(tmp_path / "a.txt")) == ["a red circle.", "three shapes: a blue square."]
    assert write_text_shards([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "shards", shard_size=2) == 3
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["summary.json", "text-00000.tar",
                                                                        "text-00001.tar"]
    dm = TextDataModule(val_urls=str(tmp_path / "shards" / "text-*.tar"), tokenizer=str(shapes_data / "tokenizer"),
                        batch_size=8)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert len(batch) == 3 and batch.pixels.shape == (3, 0) and batch.tasks == ["text"] * 3
    texts = dm.tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)
    assert [t.replace(" ", "") for t in texts] == ["aredcircle.", "threeshapes:abluesquare.", "twotriangles."]
    real = batch.attention_mask.bool()
    real[:, 0] = False  # bos: the (empty) prompt
    assert torch.equal(batch.labels[real], batch.input_ids[real])  # every text token and eos is a target
    assert bool((batch.labels[~real] == IGNORE_INDEX).all())


def test_caption_shards_are_a_text_corpus_and_bad_samples_are_counted(shapes_data, tmp_path):
    from datamodules.formats.shards import ShardWriter

    dm = TextDataModule(val_urls=str(shapes_data / "val" / "captions-*.tar"), tokenizer=str(shapes_data / "tokenizer"),
                        batch_size=4, max_text_tokens=6)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    assert batch.input_ids.shape[1] <= 6 and bool((batch.input_ids[:, -1] != dm.tokenizer.pad_token_id).any())
    (tmp_path / "bad").mkdir()
    writer = ShardWriter(tmp_path / "bad", shard_size=10, prefix="text-")
    writer.write({"__key__": "0", "txt": b"a red circle."})
    writer.write({"__key__": "1", "json": b"{}"})
    writer.close()
    dm = TextDataModule(val_urls=str(tmp_path / "bad" / "text-*.tar"), tokenizer=str(shapes_data / "tokenizer"))
    dm.setup("validate")
    assert sum(len(b) for b in dm.val_dataloader()) == 1
    assert dm.skip_counts() == {"missing_text": 1}


def test_mmlm_data_text_shards_writes_the_documents(tmp_path, capsys):
    import json

    from mmlm.app.cli import main

    (tmp_path / "doc.txt").write_text("first document\nstill first.\n\nsecond one.\n")
    assert main(["data", "text-shards", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["documents"] == 2
    assert (tmp_path / "out" / "text-00000.tar").is_file()


LONG = " ".join(f"sentence {i} says a red </s> circle is <pad> round." for i in range(40))


def test_a_long_document_continues_in_the_next_rows_with_no_text_lost(tmp_path):
    from byte_tokenizers import byte_bpe_tokenizer

    from datamodules.formats.shards import ShardWriter
    from mmlm.sentences import text_ids

    tok = byte_bpe_tokenizer([LONG], out_dir=tmp_path / "tok")
    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards", shard_size=10, prefix="text-")
    writer.write({"__key__": "long", "txt": LONG.encode()})
    writer.write({"__key__": "short", "txt": b"a red circle."})
    writer.close()
    dm = TextDataModule(val_urls=str(tmp_path / "shards" / "text-*.tar"), tokenizer=str(tmp_path / "tok"),
                        batch_size=2, max_text_tokens=32)
    dm.setup("validate")
    batch = next(iter(dm.val_dataloader()))
    doc = text_ids(tok, LONG)
    rows = [r for r, key in enumerate(batch.keys) if key.endswith("long")]
    assert len(rows) == -(-(len(doc) + 1) // 31) > 1 and batch.input_ids.shape[1] == 32
    targets = [int(t) for r in rows for t in batch.labels[r] if t != IGNORE_INDEX]
    assert targets == doc + [tok.eos_token_id]  # every token once, in order, then eos
    assert tok.decode(targets[:-1]) == LONG  # the literal </s> and <pad> stayed text
    assert not set(targets[:-1]) & set(tok.all_special_ids)
    assert all(int(batch.input_ids[r, 0]) == tok.bos_token_id for r in rows)  # each row starts with bos


def test_document_rows_without_bos_keep_one_token_of_context():
    from datamodules.text_corpora import document_rows

    rows = document_rows(list(range(10, 20)), None, 2, max_tokens=4)
    assert [ids for ids, _ in rows] == [[10, 11, 12, 13], [13, 14, 15, 16], [16, 17, 18, 19], [19, 2]]
    targets = [t for _, labels in rows for t in labels if t != IGNORE_INDEX]
    assert targets == list(range(11, 20)) + [2]  # the first token has no context, all others predicted once
    with_bos = document_rows(list(range(10, 15)), 0, 2, max_tokens=4)
    assert [ids for ids, _ in with_bos] == [[0, 10, 11, 12], [0, 13, 14, 2]]
