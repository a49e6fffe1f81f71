"""Tests for moe.data: corpus sources, split, tokenizer, token caches and the packed loader."""

import json
from collections import Counter

import numpy as np
import pytest
import torch

from moe.config import load_config
from moe.data import (
    EOT,
    EOT_ID,
    PackedLoader,
    data_fingerprint,
    open_corpus,
    prepare_data,
    split_names,
    train_bpe,
    val_batches,
)
from moe.data import prepare as prepare_mod
from moe.data.corpus import generated_reason, stdlib_files
from moe.data.loader import val_windows
from moe.data.split import name_hash
from moe.data.tokenizer import training_sample

DOCS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog.\n",
    "Unicode: café, naïve, 東京, emoji 🙂 and tabs\there.\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
    "import os\nprint(os.getcwd())\n",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.\n",
]


def make_cfg(tmp_path, *overrides):
    return load_config(None, [f"--data.cache_dir={tmp_path / 'cache'}", "--model.vocab_size=300",
                              *overrides])


def stream_docs(data, arr):
    """Split a token stream at <|endoftext|> and decode each document."""
    ids = np.asarray(arr).tolist()
    assert ids[-1] == EOT_ID  # every document, the last included, ends with the separator
    docs, cur = [], []
    for i in ids:
        if i == EOT_ID:
            docs.append(data.tokenizer.decode(cur))
            cur = []
        else:
            cur.append(i)
    return docs


def all_docs(data):
    train = [d for arr in data.train.values() for d in stream_docs(data, arr)]
    return train, stream_docs(data, data.val)


# ---------------------------------------------------------------------------------------------
# local files


def test_files_txt_one_document_per_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={folder}/*.txt")
    data = prepare_data(cfg)
    assert data.epochs == {"text": 1.0}
    assert set(data.train) == {"text"}
    assert data.meta["docs"] == {"text": {"train_docs": 5, "val_docs": 1}}
    train, val = all_docs(data)
    # Multi-line files stay whole documents, and the cache round-trips them exactly.
    assert sorted(train + val) == sorted(DOCS)
    assert not set(train) & set(val)
    assert data.cache_path.name == f"files-{data.fingerprint}"
    assert data.train["text"].dtype == np.uint16 and data.val.dtype == np.uint16


def test_files_jsonl_custom_text_field(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS)))
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={path}",
                   "--data.text_field=body")
    train, val = all_docs(prepare_data(cfg))
    assert sorted(train + val) == sorted(DOCS)
    assert len(val) == 1


def test_files_parquet(tmp_path):
    import datasets

    path = tmp_path / "rows.parquet"
    datasets.Dataset.from_dict({"content": DOCS, "n": list(range(len(DOCS)))}).to_parquet(path)
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={path}",
                   "--data.text_field=content")
    train, val = all_docs(prepare_data(cfg))
    assert sorted(train + val) == sorted(DOCS)


def test_bad_text_field_names_available_columns(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(DOCS)))
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={path}")  # text_field=text
    with pytest.raises(ValueError, match=r"'text' is not a column.*available columns: id, body"):
        prepare_data(cfg)


def test_files_errors(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.jsonl").write_text('{"text": "b"}\n')
    (tmp_path / "c.csv").write_text("text\nc\n")
    cases = [([f"{tmp_path}/*.nothing"], FileNotFoundError, "matches no files"),
             ([f"{tmp_path}/missing.txt"], FileNotFoundError, "is not a file"),
             ([f"{tmp_path}/a.txt", f"{tmp_path}/b.jsonl"], ValueError, "mixes formats"),
             ([f"{tmp_path}/c.csv"], ValueError, "unsupported extension"),
             ([f"{tmp_path}/a.txt", f"{tmp_path}/sub/a.txt"], ValueError, "both get the document")]
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("a again")
    for files, err, msg in cases:
        cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={json.dumps(files)}")
        with pytest.raises(err, match=msg):
            open_corpus(cfg.data)


def test_hub_source_reads_text_field(tmp_path, monkeypatch):
    # No network here: stand in for the hub with a local Dataset and check what is asked for.
    import datasets

    calls = []

    def fake_load(name, config, split):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"story": DOCS, "n": list(range(len(DOCS)))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    cfg = make_cfg(tmp_path, "--data.source=hf", "--data.hf_name=someone/stories",
                   "--data.hf_config=small", "--data.hf_split=validation",
                   "--data.text_field=story")
    data = prepare_data(cfg)
    assert calls == [("someone/stories", "small", "validation")]
    assert data.cache_path.name.startswith("hf-")
    train, val = all_docs(data)
    assert sorted(train + val) == sorted(DOCS)

    bad = make_cfg(tmp_path, "--data.source=hf", "--data.hf_name=someone/stories")
    with pytest.raises(ValueError, match="available columns: story, n"):
        prepare_data(bad)


def split_texts(data):
    """(train texts, val texts) of a cache, as sets."""
    train, val = all_docs(data)
    return set(train), set(val)


def test_files_split_is_stable_when_a_file_is_added(tmp_path):
    # Names are file#row, so a new file (sorted first: a global row index would shift every
    # row after it) moves no existing document across the split.
    folder = tmp_path / "rows"
    folder.mkdir()

    def write(name, n):
        with open(folder / name, "w") as f:
            for i in range(n):
                f.write(json.dumps({"text": f"{name} row {i}: " + "x" * (i % 7)}) + "\n")

    write("b.jsonl", 40)
    write("c.jsonl", 40)
    over = ["--data.source=files", f"--data.files={folder}/*.jsonl", "--data.val_fraction=0.3"]
    docs = open_corpus(make_cfg(tmp_path, *over).data).load()["text"]
    assert docs[0][0] == "text/b.jsonl#0" and docs[-1][0] == "text/c.jsonl#39"
    train1, val1 = split_texts(prepare_data(make_cfg(tmp_path, *over)))
    write("a.jsonl", 40)
    train2, val2 = split_texts(prepare_data(make_cfg(tmp_path, *over)))
    assert train1 and val1 and train1 <= train2 and val1 <= val2
    assert len(train2 | val2) == 120


def test_hub_documents_are_named_by_content(tmp_path, monkeypatch):
    import datasets

    rows = [f"story {i}" for i in range(60)]
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split: datasets.Dataset.from_dict({"text": rows}))
    over = ["--data.source=hf", "--data.hf_name=someone/stories", "--data.val_fraction=0.3"]
    train1, val1 = split_texts(prepare_data(make_cfg(tmp_path / "a", *over)))
    # Rows inserted in front (a global row index would move every later row), and a repeat of
    # a val row, which is read once instead of landing on the train side too.
    rows = ["new 1", "new 2", next(iter(val1))] + rows
    data = prepare_data(make_cfg(tmp_path / "b", *over))
    train2, val2 = split_texts(data)
    assert train1 <= train2 and val1 <= val2 and len(train2 | val2) == 62
    assert sum(c["train_docs"] + c["val_docs"] for c in data.meta["docs"].values()) == 62


# ---------------------------------------------------------------------------------------------
# split


def test_split_is_hash_rule_deterministic_and_order_free():
    names = [f"doc{i}" for i in range(2000)]
    flags = split_names(names, 0.1)
    assert flags == split_names(names, 0.1)
    assert flags == [name_hash(n) < 0.1 for n in names]
    assert split_names(names[::-1], 0.1) == flags[::-1]
    assert 150 < sum(flags) < 250  # ~10% of 2000
    # Raising the fraction only moves documents into val, never out of it.
    more = split_names(names, 0.2)
    assert all(m for f, m in zip(flags, more) if f)


def test_split_keeps_one_document_on_each_side():
    names = ["a", "b", "c"]
    lowest = min(names, key=name_hash)
    highest = max(names, key=name_hash)
    low = split_names(names, 1e-9)
    assert [n for n, v in zip(names, low) if v] == [lowest]
    high = split_names(names, 1 - 1e-9)
    assert [n for n, v in zip(names, high) if not v] == [highest]
    with pytest.raises(ValueError, match="needs at least 2"):
        split_names(["only"], 0.5)
    with pytest.raises(ValueError, match="duplicate"):
        split_names(["x", "x"], 0.5)


# ---------------------------------------------------------------------------------------------
# tokenizer and caches


def test_byte_level_bpe_round_trips_any_text():
    tok = train_bpe(DOCS * 3, 300)
    assert tok.eot_id == EOT_ID == 0 and tok.decode([EOT_ID]) == EOT
    assert 257 <= tok.vocab_size <= 300
    for text in DOCS + ["", " leading space", "\r\n\x00 ctrl", "unseen: ж ß ∑ 😀",
                        f"literal {EOT} inside"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert EOT_ID not in ids  # only the pipeline's separator is id 0
    with pytest.raises(ValueError, match="too small"):
        train_bpe(DOCS, 256)


def test_tokenizer_training_sample_caps_utf8_bytes():
    texts = ["abc", "défg", "hi"]  # "défg" is 5 bytes
    assert training_sample(texts, 6e-6) == ["abc", "dé"]
    assert training_sample(texts, 5e-6) == ["abc", "d"]  # never half of "é"
    assert training_sample(texts, 1.0) == texts


def test_cache_is_reused_without_retraining_or_retokenizing(tmp_path, monkeypatch):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(DOCS):
        (folder / f"doc{i}.md").write_text(text, encoding="utf-8")
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={folder}/*.md")
    first = prepare_data(cfg)
    tok_file = first.cache_path / "tokenizer.json"
    stamps = {p.name: p.stat().st_mtime_ns for p in first.cache_path.iterdir()}

    def boom(*args, **kwargs):
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(prepare_mod, "train_bpe", boom)
    monkeypatch.setattr(prepare_mod, "write_tokens", boom)
    second = prepare_data(cfg)
    assert second.fingerprint == first.fingerprint
    assert {p.name: p.stat().st_mtime_ns for p in second.cache_path.iterdir()} == stamps
    assert np.array_equal(second.train["text"], first.train["text"])

    # A build that died before meta.json is redone, but keeps the trained tokenizer.
    (first.cache_path / "meta.json").unlink()
    monkeypatch.undo()
    monkeypatch.setattr(prepare_mod, "train_bpe", boom)
    third = prepare_data(cfg)
    assert tok_file.stat().st_mtime_ns == stamps["tokenizer.json"]
    assert np.array_equal(third.train["text"], first.train["text"])
    assert np.array_equal(third.val, first.val)


def test_truncated_cache_file_is_an_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS))
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={path}")
    data = prepare_data(cfg)
    val_file = data.cache_path / "val.bin"
    val_file.write_bytes(val_file.read_bytes()[:-2])
    with pytest.raises(ValueError, match="delete .* to rebuild"):
        prepare_data(cfg)


def test_editing_a_local_file_changes_the_fingerprint(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one")
    cfg = make_cfg(tmp_path, "--data.source=files", f"--data.files={path}")
    before = data_fingerprint(cfg)
    path.write_text("one two")
    assert data_fingerprint(cfg) != before


# ---------------------------------------------------------------------------------------------
# builtin corpus


def test_builtin_fingerprint_tracks_settings(tmp_path):
    base = ["--data.code_max_mb=0.5"]
    fp = data_fingerprint(make_cfg(tmp_path, *base, "--model.vocab_size=512"))
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert data_fingerprint(make_cfg(tmp_path, *base, "--model.vocab_size=512")) == fp
    assert data_fingerprint(make_cfg(tmp_path, *base, "--model.vocab_size=1024")) != fp
    assert data_fingerprint(make_cfg(tmp_path, "--data.code_max_mb=0.6",
                                     "--model.vocab_size=512")) != fp
    assert data_fingerprint(make_cfg(tmp_path, *base, "--model.vocab_size=512",
                                     "--data.val_fraction=0.05")) != fp
    # seq_len and epochs only change how the loader reads the cache, not the cache itself.
    assert data_fingerprint(make_cfg(tmp_path, *base, "--model.vocab_size=512",
                                     "--data.seq_len=64", "--data.code_epochs=1")) == fp


def test_builtin_code_cap_takes_a_sorted_prefix():
    _, every = stdlib_files(None)
    _, capped = stdlib_files(0.5)
    assert capped == every[:len(capped)]
    assert sum(s for _, s in capped) <= 500_000 < sum(s for _, s in every[:len(capped) + 1])
    assert [r for r, _ in every] == sorted(r for r, _ in every)
    assert not any("site-packages" in r or "__pycache__" in r for r, _ in every)
    with pytest.raises(ValueError, match="code_max_mb"):
        stdlib_files(0.000001)


def test_generated_tables_are_left_out_of_the_builtin_corpus():
    excluded = []
    root, kept = stdlib_files(None, excluded)
    reasons = dict(excluded)
    # The near-identical charmap families, also those without a "generated from" header.
    for rel in ("encodings/cp874.py", "encodings/tis_620.py", "encodings/cp437.py",
                "encodings/mac_roman.py", "encodings/iso8859_1.py", "encodings/cp720.py",
                "encodings/koi8_t.py"):
        if (root / rel).is_file():
            assert reasons[rel] == "charmap codec table", rel
    # The text source is never a code document too.
    assert reasons["pydoc_data/topics.py"] == "the text source"
    names = {r for r, _ in kept}
    assert {"encodings/utf_8.py", "encodings/__init__.py", "codecs.py", "ast.py"} <= names
    assert not any(generated_reason((root / r).read_text(errors="replace")[:4096])
                   for r in names)
    assert len(excluded) < 0.1 * len(kept)


def test_generated_reason_reads_headers_not_prose():
    codec = ('"""Python Character Mapping Codec x generated on Windows"""\nimport codecs\n'
             'class Codec(codecs.Codec):\n    def decode(self, input, errors="strict"):\n'
             '        return codecs.charmap_decode(input, errors, decoding_table)\n')
    assert generated_reason(codec) == "charmap codec table"
    assert generated_reason("# Auto-generated by Tools/x.py\nA = 1\n") == "generated file"
    assert generated_reason("# -*- coding: utf-8 -*-\n# This file is generated by mk.py. "
                            "DO NOT EDIT.\n") == "generated file"
    # Prose that mentions generation (ast.py's docstring) is not a generated-file header.
    assert generated_reason('"""An abstract syntax tree can be generated by passing a flag."""'
                            "\nimport sys\n") is None
    assert generated_reason("x = 1\n" * 20 + "# generated by hand below\n") is None


def test_builtin_corpus_end_to_end(tmp_path):
    cfg = make_cfg(tmp_path, "--data.code_max_mb=0.5", "--model.vocab_size=512")
    docs = open_corpus(cfg.data).load()
    assert set(docs) == {"code", "text"}
    assert len(docs["code"]) > 10 and len(docs["text"]) > 10
    assert all(name.startswith("code/") and text for name, text in docs["code"])
    assert all(name.startswith("text/") and text for name, text in docs["text"])
    assert any("def " in text for _, text in docs["code"])

    data = prepare_data(cfg)
    assert data.epochs == {"code": 4.0, "text": 2.0}
    assert data.cache_path.name == f"builtin-{data.fingerprint}"
    assert data.tokenizer.vocab_size == 512
    meta = data.meta["docs"]
    for source in ("code", "text"):
        assert meta[source]["val_docs"] >= 1
        assert meta[source]["train_docs"] + meta[source]["val_docs"] == len(docs[source])
        assert int(data.train[source].max()) < 512
    train, val = all_docs(data)
    assert sorted(train + val) == sorted(t for items in docs.values() for _, t in items)


# ---------------------------------------------------------------------------------------------
# packed loader

L = 16


def synthetic_sources():
    # Token values identify their window: a window of "a" starts at w*L, of "b" at 10000+w*L.
    return {"a": np.arange(10 * L + 1, dtype=np.uint16),
            "b": np.arange(10000, 10000 + 5 * L + 1, dtype=np.uint16)}


def take(loader, sizes):
    xs, ys = zip(*(loader.next_batch(n) for n in sizes))
    return torch.cat(xs), torch.cat(ys)


def test_loader_pass_has_exact_epochs_and_windows():
    loader = PackedLoader(synthetic_sources(), {"a": 2.0, "b": 0.5}, L, seed=0)
    # a: 10 windows x 2 = 20; b: 0.5 x 5 = 2.5 rounds half up to 3 distinct windows.
    assert loader.counts == {"a": 20, "b": 3} and loader.pass_len == 23
    x, y = loader.next_batch(23)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (23, L)
    assert torch.equal(y, x + 1)  # targets are the next tokens (the streams are aranges)
    assert torch.equal(x - x[:, :1], torch.arange(L).expand(23, L))  # whole aligned windows
    starts = Counter(x[:, 0].tolist())
    assert {s: c for s, c in starts.items() if s < 10000} == {w * L: 2 for w in range(10)}
    b = {s: c for s, c in starts.items() if s >= 10000}
    assert len(b) == 3 and set(b.values()) == {1}
    assert all((s - 10000) % L == 0 and s < 10000 + 5 * L for s in b)
    assert loader.pass_index == 0 and loader.position == 23
    # The next pass has the same counts in a new order.
    x2, _ = loader.next_batch(23)
    assert loader.pass_index == 1
    assert Counter(v for v in x2[:, 0].tolist() if v < 10000) == {w * L: 2 for w in range(10)}
    assert not torch.equal(x, x2)


def test_loader_deterministic_per_seed_and_batch_size_free():
    epochs = {"a": 1.0, "b": 2.0}
    # A pass is 10 + 2 x 5 = 20 windows; 48 windows cross two pass boundaries.
    one = take(PackedLoader(synthetic_sources(), epochs, L, seed=3), [24, 24])
    again = take(PackedLoader(synthetic_sources(), epochs, L, seed=3), [3, 5, 16, 1, 23])
    other = take(PackedLoader(synthetic_sources(), epochs, L, seed=4), [24, 24])
    assert torch.equal(one[0], again[0]) and torch.equal(one[1], again[1])
    assert not torch.equal(one[0], other[0])
    # The dict order of the sources does not matter.
    flipped = dict(reversed(list(synthetic_sources().items())))
    assert torch.equal(take(PackedLoader(flipped, epochs, L, seed=3), [48])[0], one[0])


@pytest.mark.parametrize("sizes_before, pass_index, position", [([5, 7], 0, 12),
                                                                 ([25, 3], 1, 8)])
def test_loader_resume_mid_pass_is_exact(sizes_before, pass_index, position):
    epochs = {"a": 1.5, "b": 1.0}  # pass of 15 + 5 = 20 windows: the later sizes cross passes
    sizes_after = [9, 30, 4, 17]
    straight = PackedLoader(synthetic_sources(), epochs, L, seed=11)
    take(straight, sizes_before)
    state = json.loads(json.dumps(straight.state_dict()))  # survives a JSON checkpoint
    assert (state["pass_index"], state["position"]) == (pass_index, position)
    expected = take(straight, sizes_after)

    resumed = PackedLoader(synthetic_sources(), epochs, L, seed=11)
    resumed.load_state_dict(state)
    got = take(resumed, sizes_after)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert resumed.state_dict() == straight.state_dict()


def test_loader_state_errors():
    epochs = {"a": 1.5, "b": 1.0}
    state = PackedLoader(synthetic_sources(), epochs, L, seed=11).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(synthetic_sources(), epochs, L, seed=12).load_state_dict(state)
    with pytest.raises(ValueError, match="counts"):
        PackedLoader(synthetic_sources(), {"a": 1.0, "b": 1.0}, L, seed=11).load_state_dict(state)


def test_loader_errors():
    with pytest.raises(ValueError, match="too short for one window"):
        PackedLoader({"a": np.arange(L, dtype=np.uint16)}, {"a": 1.0}, L, seed=0)
    with pytest.raises(ValueError, match="must match sources"):
        PackedLoader(synthetic_sources(), {"a": 1.0}, L, seed=0)
    with pytest.raises(ValueError, match="no windows"):
        PackedLoader(synthetic_sources(), {"a": 0.0, "b": 0.0}, L, seed=0)


def test_val_batches_spread_over_the_whole_split():
    tokens = np.arange(1000, dtype=np.uint16)  # (1000 - 1) // 8 = 124 windows
    batches = val_batches(tokens, 8, batch_size=2, n_windows_total=6)
    assert len(batches) == 3
    starts = []
    for x, y in batches:
        assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)
        assert torch.equal(x - x[:, :1], torch.arange(8).expand(2, 8))  # whole aligned windows
        starts += x[:, 0].tolist()
    # The middle window of each of 6 equal stretches of the 124 windows, in stream order.
    assert starts == [8 * w for w in (10, 31, 51, 72, 93, 113)]
    assert list(val_windows(1000, 8, 6)) == [10, 31, 51, 72, 93, 113]
    assert all(torch.equal(a[0], b[0])
               for a, b in zip(batches, val_batches(tokens, 8, 2, 6)))
    # The set is the windows' count alone: any batch size cuts the same windows, the last
    # batch holding the rest.
    for size in (1, 4, 5, 6, 64):
        other = val_batches(tokens, 8, size, 6)
        assert [len(x) for x, _ in other][:-1] == [size] * (len(other) - 1)
        assert torch.cat([x for x, _ in other])[:, 0].tolist() == starts
    # Every window when they are all needed.
    assert list(val_windows(1000, 8, 124)) == list(range(124))
    with pytest.raises(ValueError, match="lower data.val_windows"):
        val_batches(tokens, 8, batch_size=25, n_windows_total=125)


def test_val_windows_cover_every_document_longer_than_their_spacing():
    rng = np.random.default_rng(0)
    lengths = rng.integers(300, 3000, size=40)  # documents of 300-3000 tokens
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    seq_len, n = 32, 256
    win = val_windows(int(bounds[-1]), seq_len, n)
    spacing = (bounds[-1] // seq_len) / n * seq_len  # tokens between window starts
    assert lengths.min() > spacing
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        assert any(w * seq_len < hi and w * seq_len + seq_len + 1 > lo for w in win)
