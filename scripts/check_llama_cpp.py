"""Check a run exported to GGUF against llama.cpp itself: tokens, greedy output, logits and
perplexity, each against ours. Not part of the test suite: the first run builds llama.cpp
(10-25 minutes on 2 busy cores); later runs reuse the build.

    python scripts/check_llama_cpp.py --run runs/tiny [--work build/llama_cpp]
        [--sdist llama_cpp_python-X.tar.gz] [--dtype f32|f16|q8_0] [--prompt "def "]
        [--n-predict 30] [--text FILE] [--chunks 16] [--jobs 2]

1. The llama.cpp sources: those vendored in the llama-cpp-python sdist (``--sdist``, else
   ``pip download llama-cpp-python --no-deps --no-binary :all:`` into ``--work``).
2. cmake (CPU, Release) builds only llama-simple, llama-perplexity, llama-tokenize and the
   libllama they link.
3. moe-export-gguf writes the run; as a reference, moe-export-hf writes it as Mixtral and
   llama.cpp's own convert_hf_to_gguf.py converts that (its pre-tokenizer forced to gpt-2, the
   one step it cannot take itself): both files must hold the same metadata (but
   general.name) and bit-identical tensors.
4. llama-tokenize's ids on a few strings and on the perplexity text equal ours.
5. llama-simple's greedy continuation of ``--prompt`` is our greedy text (moe-generate at
   temperature 0, up to the first <|endoftext|>, where llama-simple stops).
6. llama.cpp's logits for prompt + our greedy tokens (libllama through the sdist's ctypes
   bindings) against ours: the largest difference, and llama.cpp's argmax at every position.
7. llama-perplexity (chunks of model.max_seq_len tokens, the second half of each scored)
   against our loss on the same tokens.

Needs transformers (``pip install -e ".[dev]"``), cmake and a C++ compiler. Prints one line
per check; exits 1 when the converter's file or the tokens differ, or (with
--dtype f32) when the greedy tokens differ, the logits (f32 KV cache, no flash attention) by
more than 1e-4 or the losses by more than 1e-3 (perplexity 0.1%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
import types
from pathlib import Path

import gguf
import numpy as np
import torch

from moe.checkpoint import load_model
from moe.data import EOT_ID, BPETokenizer
from moe.hf.export import export_checkpoint, run_tokenizer
from moe.hf.gguf import export_gguf_checkpoint
from moe.inference.generate import generate

ROOT = Path(__file__).resolve().parents[1]

TOOLS = ["llama-simple", "llama-perplexity", "llama-tokenize"]
STRINGS = ["def main(argv):\n    return 0\n", "  leading spaces, trailing  ",
           "héllo wörld ✓ 🦙\t\n", "I've been 'told he's there, 'RE you sure? We'Ve a'lL",
           "3 33 333 3333 33333 3.3 3..3", "x = [1, 2.5, 'a']  # comment\r\n",
           "a <|endoftext|> literal", "\n \n\n \t \t\t \t\n  \n   \n"]
# convert_hf_to_gguf.py with the pre-tokenizer named (it hashes tokens to name one, and every
# trained vocabulary hashes differently) and sentencepiece not needed (no tokenizer.model).
CONVERT = """
import runpy, sys
lcp = sys.argv.pop(1)
sys.path[:0] = [lcp, lcp + "/gguf-py"]
import conversion.base as base
def no_spm(self, *a, **k):
    raise FileNotFoundError("tokenizer.model")
base.TextModel._set_vocab_sentencepiece = no_spm
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = lcp + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)


def sources(work: Path, sdist: str | None) -> Path:
    """The unpacked sdist's folder (holding llama_cpp/ and vendor/llama.cpp)."""
    if sdist and Path(sdist).is_dir():
        return Path(sdist)
    if sdist is None:
        found = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            print("downloading the llama-cpp-python sdist (pip) ...", flush=True)
            r = sh([sys.executable, "-m", "pip", "download", "llama-cpp-python", "--no-deps",
                    "--no-binary", ":all:", "-d", work])
            if r.returncode:
                sys.exit(f"error: pip download failed: {r.stderr.strip()[-500:]}")
            found = sorted(work.glob("llama_cpp_python-*.tar.gz"))
        sdist = str(found[-1])
    folder = work / Path(sdist).name.removesuffix(".tar.gz")
    if not (folder / "vendor" / "llama.cpp").is_dir():
        with tarfile.open(sdist) as tar:
            try:
                tar.extractall(work, filter="data")
            except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters
                tar.extractall(work)
    return folder


def build(src: Path, build_dir: Path, jobs: int) -> Path:
    """llama.cpp's tools (CPU, Release, only what this check runs); their bin/ folder."""
    t0 = time.time()
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    steps = [["cmake", "-S", src / "vendor" / "llama.cpp", "-B", build_dir, *gen,
              "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DGGML_OPENMP=OFF"],
             ["cmake", "--build", build_dir, "--target", *TOOLS, "-j", jobs]]
    for cmd in steps:
        r = sh(cmd)
        if r.returncode:
            sys.exit(f"error: {' '.join(map(str, cmd[:3]))} failed:\n{r.stdout[-2000:]}"
                     f"{r.stderr[-2000:]}")
    print(f"build: {', '.join(TOOLS)} in {build_dir / 'bin'} ({time.time() - t0:.0f} s)")
    return build_dir / "bin"


def compare_with_converter(ours: Path, run: str, src: Path, work: Path, dtype: str) -> bool:
    hf, ref = work / "hf_export", work / f"reference-{dtype}.gguf"
    shutil.rmtree(hf, ignore_errors=True)
    ref.unlink(missing_ok=True)
    export_checkpoint(run, hf)
    r = sh([sys.executable, "-c", CONVERT, src / "vendor" / "llama.cpp", hf, "--outfile", ref,
            "--outtype", dtype])
    if r.returncode:
        print(f"converter: FAILED to run\n{r.stderr[-2000:]}")
        return False
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    fa, fb = ({k: (f.types, f.contents()) for k, f in x.fields.items()
               if not k.startswith("GGUF.") and k != "general.name"} for x in (a, b))
    ta, tb = ({t.name: (t.tensor_type, list(t.shape), np.asarray(t.data).tobytes())
               for t in x.tensors} for x in (a, b))
    diff = [k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)]
    tdiff = [k for k in ta.keys() | tb.keys() if ta.get(k) != tb.get(k)]
    ok = not diff and not tdiff
    print(f"converter: {'same' if ok else 'DIFFERENT'} metadata ({len(fa)} keys but "
          f"general.name{'; differ: ' + ', '.join(sorted(diff)) if diff else ''}) and "
          f"tensors ({len(ta)}{'; differ: ' + ', '.join(sorted(tdiff)) if tdiff else ''}) as "
          f"llama.cpp's convert_hf_to_gguf.py --outtype {dtype} of our Mixtral export")
    return ok


def llama_tokenize(bin_dir: Path, model: Path, text: str, tmp: Path) -> list[int]:
    tmp.write_text(text, encoding="utf-8", newline="")
    r = sh([bin_dir / "llama-tokenize", "-m", model, "-f", tmp, "--no-escape", "--ids",
            "--no-parse-special", "--log-disable"])  # text never makes <|endoftext|>, as ours
    if r.returncode:
        sys.exit(f"error: llama-tokenize failed: {r.stderr[-1000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def llama_cpp_logits(src: Path, bin_dir: Path, model: Path, ids: list[int], threads: int,
                     exact: bool) -> np.ndarray:
    """Logits ``[len(ids), vocab]`` of libllama for ``ids`` in one batch, through the sdist's
    low-level ctypes bindings (its package __init__ also loads the high-level API, which needs
    more packages: skipped). ``exact``: K and V cached in f32 and flash attention off (by
    default llama.cpp caches them in f16, and its CPU flash attention rounds to f16 even
    from an f32 cache)."""
    os.environ["LLAMA_CPP_LIB_PATH"] = str(bin_dir)
    pkg = types.ModuleType("llama_cpp")
    pkg.__path__ = [str(src / "llama_cpp")]
    sys.modules["llama_cpp"] = pkg
    import llama_cpp.llama_cpp as lc

    lc.llama_backend_init()
    m = lc.llama_model_load_from_file(str(model).encode(), lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = len(ids)
    params.n_threads = params.n_threads_batch = threads
    if exact:
        params.type_k = params.type_v = lc.GGML_TYPE_F32
        params.flash_attn_type = lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    ctx = lc.llama_init_from_model(m, params)
    batch = lc.llama_batch_init(len(ids), 0, 1)
    for i, t in enumerate(ids):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, i, 1, 1
        batch.seq_id[i][0] = 0
    batch.n_tokens = len(ids)
    if lc.llama_decode(ctx, batch) != 0:
        sys.exit("error: llama_decode failed")
    n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(m))
    out = np.ctypeslib.as_array(lc.llama_get_logits(ctx), shape=(len(ids) * n_vocab,))
    out = out.reshape(len(ids), n_vocab).copy()
    lc.llama_batch_free(batch)
    lc.llama_free(ctx)
    lc.llama_model_free(m)
    return out


def our_perplexity(model, ids: list[int], n_ctx: int, n_chunk: int) -> float:
    """llama-perplexity's measure: chunks of n_ctx tokens, each scored on its second half
    (the first n_ctx/2 tokens are context only); the mean loss over all scored tokens."""
    first, losses = n_ctx // 2, []
    for c in range(n_chunk):
        x = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
        with torch.no_grad():
            logp = model(x, capacity_factor=None).double().log_softmax(-1)[0]
        losses.append(-logp[first:n_ctx - 1].gather(1, x[0, first + 1:, None]).squeeze(1))
    return torch.cat(losses).mean().item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="run folder (or step folder / consolidated file)")
    p.add_argument("--work", default=str(ROOT / "build" / "llama_cpp"),
                   help="sdist, sources, build and files of this check")
    p.add_argument("--sdist", default=None, help="a llama-cpp-python sdist (.tar.gz or folder)")
    p.add_argument("--dtype", default="f32", choices=["f32", "f16", "q8_0"])
    p.add_argument("--prompt", default="def ")
    p.add_argument("--n-predict", type=int, default=30)
    p.add_argument("--text", default=textwrap.__file__,
                   help="perplexity text (default: Python's textwrap.py)")
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.jobs)

    src = sources(work, args.sdist)
    bin_dir = build(src, work / "build", args.jobs)
    out = work / f"model-{args.dtype}.gguf"
    out.unlink(missing_ok=True)
    export_gguf_checkpoint(args.run, out, args.dtype)
    print(f"exported {args.run} -> {out} ({out.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    failed = [] if compare_with_converter(out, args.run, src, work, args.dtype) else ["converter"]

    loaded = load_model(args.run)
    model, cfg = loaded.model, loaded.model.cfg
    tok = BPETokenizer.load(run_tokenizer(loaded, args.run, None))
    text = Path(args.text).read_text(encoding="utf-8").rstrip("\n")  # -f drops one newline
    text_file, tmp = work / "perplexity.txt", work / "tokenize.txt"
    text_file.write_text(text, encoding="utf-8", newline="")
    same = []
    for s in STRINGS:
        theirs = llama_tokenize(bin_dir, out, s, tmp)
        same.append(theirs == tok.encode(s))
        if not same[-1]:
            print(f"  {s!r}: llama.cpp {theirs}, ours {tok.encode(s)}")
    text_ids = tok.encode(text)
    same_text = llama_tokenize(bin_dir, out, text, tmp) == text_ids
    print(f"tokens: {sum(same)}/{len(same)} strings identical; the perplexity text's "
          f"{len(text_ids)} tokens {'identical' if same_text else 'DIFFERENT'}")
    if not all(same) or not same_text:
        failed.append("tokens")

    prompt = tok.encode(args.prompt)
    n = min(args.n_predict, cfg.max_seq_len - len(prompt))
    ours = generate(model, torch.tensor([prompt]), max_new_tokens=n, temperature=0)[0].tolist()
    if EOT_ID in ours[len(prompt):]:
        ours = ours[:ours.index(EOT_ID, len(prompt))]  # llama-simple stops before printing it
    r = sh([bin_dir / "llama-simple", "-m", out, "-n", n, args.prompt])
    greedy_text = r.stdout.removesuffix("\n") == tok.decode(ours)
    print(f"greedy: llama-simple's {n} tokens after {args.prompt!r} "
          f"{'identical to' if greedy_text else 'DIFFERENT from'} ours: {tok.decode(ours)!r}")

    with torch.no_grad():
        mine = model(torch.tensor([ours]), capacity_factor=None)[0].double().numpy()
    diff, argmax_same = {}, True
    for exact in (False, True):
        ref = llama_cpp_logits(src, bin_dir, out, ours, args.jobs, exact)
        diff[exact] = float(np.abs(ref - mine).max())
        argmax_same &= bool((ref[len(prompt) - 1:-1].argmax(-1) == ours[len(prompt):]).all())
    print(f"logits: max |llama.cpp - ours| = {diff[True]:.2e} with an f32 KV cache and no "
          f"flash attention, {diff[False]:.2e} with llama.cpp's defaults (f16 cache, flash "
          f"attention), over {len(ours)} positions x "
          f"{mine.shape[1]} (largest |logit| {np.abs(mine).max():.1f}); llama.cpp's argmax "
          f"{'is' if argmax_same else 'is NOT'} our greedy token at every position")
    if args.dtype != "f32":
        print(f"  ({args.dtype}: llama.cpp runs the rounded weights, ours the run's f32 ones)")
    elif not (greedy_text and argmax_same):
        failed.append("greedy")

    n_chunk = min(args.chunks, len(text_ids) // cfg.max_seq_len)
    r = sh([bin_dir / "llama-perplexity", "-m", out, "-f", text_file, "-c", cfg.max_seq_len,
            "-b", cfg.max_seq_len, "--chunks", n_chunk, "-t", args.jobs,
            "--ppl-output-type", 1])
    rows = re.findall(r"^\s*\d+\s+([\d.]+)\s+([\d.]+)\s+\S+\s*$", r.stdout + r.stderr, re.M)
    if r.returncode or not rows:
        sys.exit(f"error: llama-perplexity failed:\n{r.stdout[-1000:]}{r.stderr[-2000:]}")
    theirs = float(rows[-1][1])  # the mean loss over every scored token (6 decimals)
    loss = our_perplexity(model, text_ids, cfg.max_seq_len, n_chunk)
    print(f"perplexity: llama.cpp {math.exp(theirs):.4f} (loss {theirs:.6f}), ours "
          f"{math.exp(loss):.4f} (loss {loss:.6f}) on {n_chunk} chunks of {cfg.max_seq_len} "
          f"tokens of {Path(args.text).name}")
    if args.dtype == "f32" and (diff[True] > 1e-4 or abs(theirs - loss) > 1e-3):
        failed.append("f32 logits or perplexity")
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
