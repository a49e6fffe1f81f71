"""Bad input and contested folders: each ends in one line naming the file (and line), or is
survived. Broken YAML / JSON Lines / Latin-1 files, a config error found while preparing data,
one big input.txt, explicit validation files, two trainers on one run folder, a data-cache
build killed part-way."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe.config import ConfigError, load_config
from moe.data import open_corpus, prepare_data
from moe.data.files import chunk_text
from moe.train import run_lock
from moe.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
# Seconds-long runs: a tiny model on a few KB of text.
TINY = ["--model.vocab_size=300", "--model.d_model=32", "--model.n_layers=1",
        "--model.n_heads=2", "--model.n_experts=2", "--model.top_k=1",
        "--model.expert_hidden=32", "--model.max_seq_len=16", "--data.seq_len=16",
        "--train.batch_size=4", "--train.micro_batch_size=4", "--train.warmup_steps=1",
        "--data.val_windows=4", "--train.eval_every=2", "--train.ckpt_every=2",
        "--train.sample_tokens=0", "--log.progress=false"]


def _cfg(tmp_path, *extra):
    return load_config(None, TINY + [f"--data.cache_dir={tmp_path / 'cache'}",
                                     f"--train.run_dir={tmp_path / 'run'}", *extra])


def _one_line(e) -> str:
    msg = str(e.value if hasattr(e, "value") else e)
    assert "\n" not in msg, msg
    return msg


def _play(n_scenes: int, start: int = 0) -> str:
    """A stand-in for tiny-shakespeare's input.txt: speeches between blank lines."""
    return "".join(f"KING {i}:\nMy lord, scene {i} is long enough to read {i * 7 % 13} times."
                   f"\nAnd so it ends, for now.\n\n" for i in range(start, start + n_scenes))


# ---------------------------------------------------------------------------------------------
# bad files: one line naming the file and line


def test_malformed_yaml_config_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  d_model: 64\n   n_layers: 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"config file {path} is not valid YAML: line 3, column 12" in _one_line(e)
    with pytest.raises(ConfigError, match=r"override --model.top_k: '\[1' is not a YAML"):
        load_config(None, ["--model.top_k=[1"])


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b"}\n\n{"text": "c\n{"text": "d"}\n')
    cfg = _cfg(tmp_path, "--data.source=files", f"--data.files={path}")
    with pytest.raises(ConfigError) as e:  # through the trainer: one line, no run folder
        train(cfg)
    assert f"data: data.files {path} is not valid json: line 4, column 10" in _one_line(e)
    assert not (tmp_path / "run").exists()
    path.write_text('{"text": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"rows.jsonl is not valid json: line 2: a list, not"):
        prepare_data(cfg)


def test_encoding_policy_strict_or_replace(tmp_path, capfd):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("plain ascii\n" * 3)
    (folder / "b.txt").write_bytes("first line\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"))
    over = ["--data.source=files", f"--data.files={folder}/*.txt"]
    with pytest.raises(ValueError) as e:
        open_corpus(_cfg(tmp_path, *over).data).load()
    assert (f"data.files {folder / 'b.txt'} is not utf-8 text: line 2, byte offset 14 "
            "(invalid continuation byte)") in _one_line(e)
    capfd.readouterr()
    docs = dict(open_corpus(_cfg(tmp_path, *over, "--data.encoding_errors=replace").data).load()
                ["text"])
    assert docs["text/b.txt"] == "first line\ncaf\ufffd cr\ufffdme\n"
    warnings = [ln for ln in capfd.readouterr().err.splitlines() if "warning" in ln]
    assert warnings == [f"[data] warning: {folder / 'b.txt'} is not valid utf-8: 2 "
                        "undecodable byte(s) read as U+FFFD, the first on line 2 "
                        "(data.encoding_errors=replace)"]
    docs = dict(open_corpus(_cfg(tmp_path, *over, "--data.encoding=latin-1").data).load()["text"])
    assert docs["text/b.txt"] == "first line\ncaf\u00e9 cr\u00e8me\n"
    with pytest.raises(ConfigError, match="data.encoding='utf-9' is not a Python codec"):
        _cfg(tmp_path, *over, "--data.encoding=utf-9")


def test_latin1_jsonl_strict_or_replace(tmp_path, capfd):
    path = tmp_path / "rows.jsonl"
    rows = ["ok row", "caf\u00e9", "another", "fin"]
    path.write_bytes("".join(json.dumps({"text": r}, ensure_ascii=False) + "\n"
                             for r in rows).encode("latin-1"))
    over = ["--data.source=files", f"--data.files={path}"]
    with pytest.raises(ValueError) as e:
        open_corpus(_cfg(tmp_path, *over).data).load()
    assert f"{path} is not utf-8 text: line 2, byte offset 32" in _one_line(e)
    texts = [t for _, t in open_corpus(_cfg(tmp_path, *over, "--data.encoding_errors=replace")
                                       .data).load()["text"]]
    assert texts == ["ok row", "caf\ufffd", "another", "fin"]
    assert capfd.readouterr().err.count("warning") == 1
    texts = [t for _, t in open_corpus(_cfg(tmp_path, *over, "--data.encoding=latin-1")
                                       .data).load()["text"]]
    assert texts == rows


# ---------------------------------------------------------------------------------------------
# validate before writing; one big file; explicit validation files


def test_config_error_found_in_data_leaves_no_run_folder(tmp_path):
    (tmp_path / "input.txt").write_text(_play(40))
    cfg = _cfg(tmp_path, "--data.source=files", f"--data.files={tmp_path / 'input.txt'}",
               "--model.vocab_size=10", "--data.chunk_chars=500")
    with pytest.raises(ConfigError, match="vocab_size=10 is too small"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_chunks_do_not_move_when_text_is_appended():
    text = _play(300)
    for size in (200, 1000, 5000):
        old = chunk_text(text, size)
        assert "".join(old) == text and all(len(c) >= size for c in old[:-1])
        for extra in ("\n", "more words", _play(50, 300), "x" * 3 * size):
            new = chunk_text(text + extra, size)
            assert "".join(new) == text + extra
            assert new[:len(old) - 1] == old[:-1]  # only the last chunk may change
    # No blank line: a line end; no line end at all: a hard cut at 2 * size.
    assert chunk_text("ab\n" * 10, 6) == ["ab\nab\nab\n"] * 3 + ["ab\n"]
    assert chunk_text("x" * 25, 5) == ["x" * 10, "x" * 10, "x" * 5]


def test_one_input_txt_trains_and_its_split_is_stable_when_appended(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(_play(120))  # ~10 KB: 20 documents of >= 500 characters
    over = ["--data.source=files", f"--data.files={path}", "--data.chunk_chars=500",
            "--data.val_fraction=0.2", "--train.max_steps=2"]
    docs = open_corpus(_cfg(tmp_path, *over).data).load()["text"]
    assert [n for n, _ in docs[:3]] == ["text/input.txt", "text/input.txt@1", "text/input.txt@2"]
    summary = train(_cfg(tmp_path, *over))
    assert summary["step"] == 2 and np.isfinite(summary["val_loss"])
    data = prepare_data(_cfg(tmp_path, *over))
    before = data.meta["docs"]["text"]
    assert before["val_docs"] >= 1 and before["train_docs"] > before["val_docs"]

    with open(path, "a") as f:
        f.write(_play(60, 120))
    after = dict(open_corpus(_cfg(tmp_path, *over).data).load()["text"])
    old = dict(docs)
    changed = [n for n in old if after[n] != old[n]]
    assert changed == [docs[-1][0]] and after[docs[-1][0]].startswith(old[docs[-1][0]])
    from moe.data.prepare import split_documents

    _, _, val1, _ = split_documents({"text": docs}, 0.2)
    _, _, val2, _ = split_documents({"text": list(after.items())}, 0.2)
    assert {n for n, _ in val1} <= {n for n, _ in val2}  # no document changed sides


def test_val_files_are_the_validation_set(tmp_path):
    (tmp_path / "train.txt").write_text(_play(40))
    (tmp_path / "val.txt").write_text(_play(15, 500))
    over = ["--data.source=files", f"--data.files={tmp_path / 'train.txt'}",
            f"--data.val_files={tmp_path / 'val.txt'}", "--data.chunk_chars=0"]
    data = prepare_data(_cfg(tmp_path, *over))
    assert data.meta["docs"] == {"text": {"train_docs": 1, "val_docs": 1}}  # no hash split
    assert data.tokenizer.decode(np.asarray(data.val[:-1]).tolist()) == _play(15, 500)
    assert train(_cfg(tmp_path, *over, "--train.max_steps=1"))["step"] == 1
    with pytest.raises(ValueError, match="is in both data.files and data.val_files"):
        open_corpus(_cfg(tmp_path, "--data.source=files", f"--data.files={tmp_path}/*.txt",
                         f"--data.val_files={tmp_path / 'val.txt'}").data)


def test_hf_val_split_is_the_validation_set(tmp_path, monkeypatch):
    import datasets

    splits = {"train": [f"story {i}" for i in range(30)] + ["shared row"],
              "validation": [f"held out {i}" for i in range(5)] + ["shared row"]}
    calls = []

    def fake_load(name, config, split):
        calls.append(split)
        return datasets.Dataset.from_dict({"text": splits[split]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    data = prepare_data(_cfg(tmp_path, "--data.source=hf", "--data.hf_name=someone/stories",
                             "--data.hf_val_split=validation"))
    assert sorted(calls) == ["train", "validation"]
    # The repeated row is validated on only; the val stream is exactly the validation split.
    assert data.meta["docs"] == {"text": {"train_docs": 30, "val_docs": 6}}
    val = data.tokenizer.decode(np.asarray(data.val).tolist()).split("<|endoftext|>")[:-1]
    assert sorted(val) == sorted(splits["validation"])


# ---------------------------------------------------------------------------------------------
# one trainer per run folder; a killed cache build is not trusted


@pytest.mark.slow
def test_second_trainer_on_a_run_dir_refuses_in_one_line(tmp_path):
    (tmp_path / "input.txt").write_text(_play(40))
    run = tmp_path / "run"
    over = TINY + ["--data.source=files", f"--data.files={tmp_path / 'input.txt'}",
                   "--data.chunk_chars=500", "--data.val_fraction=0.3",
                   f"--data.cache_dir={tmp_path / 'cache'}", f"--train.run_dir={run}"]
    with run_lock.hold(run):  # the first trainer, in this process
        proc = subprocess.run([sys.executable, str(ROOT / "scripts/train.py"), *over],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        with pytest.raises(ConfigError, match="in use by another trainer"):
            train(load_config(None, over))  # the late lock too (the early check passed it)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: train.run_dir={run} is in use by another trainer "
                                   f"(pid {os.getpid()}): wait for it to finish, stop it, or "
                                   "use another train.run_dir")
    assert not (run / "config.yaml").exists()
    assert train(load_config(None, over + ["--train.max_steps=1"]))["step"] == 1  # released


def test_late_lock_refuses_after_data_is_built(tmp_path, monkeypatch):
    # The early check passes (no lock yet); another trainer takes the folder while this one
    # builds its data: the lock taken before anything is written refuses.
    (tmp_path / "input.txt").write_text(_play(40))
    cfg = _cfg(tmp_path, "--data.source=files", f"--data.files={tmp_path / 'input.txt'}",
               "--data.chunk_chars=500", "--data.val_fraction=0.3")
    import moe.data.prepare as prepare_mod  # what the trainer's load_data calls

    held = []
    real = prepare_mod.prepare_data

    def prepare_then_lose_the_race(c):
        held.append(run_lock.hold(Path(c.train.run_dir)))
        held[0].__enter__()
        return real(c)

    monkeypatch.setattr(prepare_mod, "prepare_data", prepare_then_lose_the_race)
    with pytest.raises(ConfigError, match="in use by another trainer"):
        train(cfg)
    held[0].__exit__(None, None, None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


KILL_MID_BUILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from moe.config import load_config
from moe.data import prepare as prep
real = prep.write_tokens
def write_then_die(path, tok, texts, dtype, label):
    if label == "val":  # train tokens written, tokenizer saved, val half-way: SIGKILL
        open(str(path) + ".tmp" + str(os.getpid()), "wb").write(b"half")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, tok, texts, dtype, label)
prep.write_tokens = write_then_die
prep.prepare_data(load_config(None, {over!r}))
"""


@pytest.mark.slow
def test_cache_build_killed_midway_is_rebuilt(tmp_path, capfd):
    (tmp_path / "input.txt").write_text(_play(40))
    over = ["--data.source=files", f"--data.files={tmp_path / 'input.txt'}",
            "--data.chunk_chars=500", "--data.val_fraction=0.3", "--model.vocab_size=300",
            f"--data.cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, "-c", KILL_MID_BUILD.format(root=str(ROOT),
                                                                       over=over)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (folder,) = (tmp_path / "cache").glob("files-*")
    assert not (folder / "meta.json").exists() and list(folder.glob("*.tmp*"))
    capfd.readouterr()
    data = prepare_data(load_config(None, over))
    assert "building token cache" in capfd.readouterr().err  # not trusted: rebuilt
    assert not list(folder.glob("*.tmp*")) and (folder / "meta.json").is_file()
    fresh = prepare_data(load_config(None, over[:-1] + [f"--data.cache_dir={tmp_path / 'b'}"]))
    assert np.array_equal(data.val, fresh.val)
    assert np.array_equal(data.train["text"], fresh.train["text"])


def test_lock_of_a_killed_trainer_is_released(tmp_path):
    # flock, not a pid file: SIGKILL of the holder frees the folder, the stale pid is ignored.
    run = tmp_path / "run"
    code = (f"import os, signal, sys; sys.path.insert(0, {str(ROOT)!r})\n"
            "from moe.train import run_lock\n"
            f"with run_lock.hold({str(run)!r}): os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code], timeout=60)
    assert proc.returncode == -signal.SIGKILL and (run / ".lock").read_text().strip()
    run_lock.check_free(run)
    with run_lock.hold(run):
        assert (run / ".lock").read_text() == f"{os.getpid()}\n"


# ---------------------------------------------------------------------------------------------
# settings that used to crash mid-run or run wrongly: one line, nothing written


@pytest.mark.parametrize("override, key", [
    ("--model.d_model=60", "model.d_model"),  # 4 heads of 15: rotary needs an even head size
    ("--train.eps=-1", "train.eps"),  # was AdamW's ValueError traceback after the folder
])
@pytest.mark.slow
def test_refused_setting_leaves_no_run_folder(tmp_path, override, key):
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "scripts/train.py", "--config", "configs/tiny.yaml",
                          f"--train.run_dir={run}", override], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().count("\n") == 0 and key in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and not run.exists()


@pytest.mark.slow
def test_resume_with_another_seed_is_refused_in_one_line(tmp_path):
    train(_cfg(tmp_path, "--train.max_steps=2"))
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as e:  # was the loader's ValueError traceback
        train(_cfg(tmp_path, "--train.max_steps=4", "--train.seed=7"))
    assert "train.seed" in _one_line(e) and "step_00000002" in str(e.value)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # nothing appended


def test_nccl_without_a_gpu_is_one_line(tmp_path, monkeypatch):
    import torch

    from moe.parallel.launch import init_distributed

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: nccl is a valid backend here")
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:  # was AttributeError: _cuda_setDevice
        init_distributed(_cfg(tmp_path, "--parallel.backend=nccl"))
    assert "parallel.backend=nccl" in _one_line(e) and "gloo" in str(e.value)
