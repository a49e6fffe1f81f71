"""The vision run (``vision.enabled``): what the trainer's loop runs instead of the text LM.

A training example is one generated image and its text (moe/vision/data.py), laid out as

    tokens   <|endoftext|> t1 t2 ... tn <|endoftext|> pad ...      (data.seq_len + 1)
    image    sits before token 0 (media_pos = 0): every text token sees it

so the first <|endoftext|> is the image marker, and the loss counts every text token and the
closing <|endoftext|> (padding is ``IGNORE_INDEX``). The loss of a step is the sum of token
cross-entropies over the number of counted tokens in the GLOBAL batch (``n_targets``), so it
is the same for any split of the batch over micro-batches and data ranks.

Every evaluation logs, on the fixed validation images:

    val_loss                   the text loss with the true images
    val_loss_shuffled_images   the same texts with the images rolled by one over the whole
                               validation set (every text gets another text's image)
    val_loss_no_images         the text model alone (no cross-attention)
    val_accuracy               colour / shape questions about seen colour x shape pairs
                               (and its val_colour_accuracy / val_shape_accuracy parts)
    heldout_accuracy           the same questions about pairs never seen in training (the
                               composition test), and its colour / shape parts
    val_exists_accuracy        binding on seen pairs: "is there a <pair>?" on val images, a
                               yes (an object's own pair) and a distractor no (the colour of
                               one object, the shape of another) per image (data.exists_queries)
    heldout_exists_accuracy    binding on held-out pairs (data.binding_probe): yes on every
                               heldout image for its held-out pair, as many no's per held-out
                               pair on images holding its colour and shape on two objects
    gate_attn_{i}, gate_ffn_{i}  |tanh| of each cross-attention block's gates

Accuracy scores every candidate answer by its summed log-probability after the question
(chance: 1/6 for colours, 1/4 for shapes, 1/2 for exists: yes and no are balanced exactly);
``*_accuracy_calibrated`` by its gain over the same question without the image (the text
prior removed). The exists metrics are their own aggregate: ``val_accuracy`` and
``heldout_accuracy`` keep their meaning (colour and shape questions only) and there is no
combined binding key; ``heldout_exists_accuracy`` IS the held-out binding accuracy. They are
absent where no query can be made (vision.max_objects=1: no distractor exists).
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moe.checkpoint import read_extra
from moe.config import Config, ConfigError
from moe.data import load_data
from moe.data.tokenizer import BPETokenizer
from moe.device import autocast_context
from moe.inference.sampling import SamplingParams
from moe.model.loss import IGNORE_INDEX, lm_loss
from moe.train.metrics import RoutingAccumulator
from moe.vision import data as vdata
from moe.vision.caption import answer_logprobs, caption_image, image_tensor
from moe.vision.model import build_vision_model, is_vision_param
from moe.vision.pretrain import PRETRAINED_MODULES, pretrain_encoder
from moe.vision.text_pretrain import check_text_pretrain, pretrain_text

ACCURACY_IMAGES = 256  # validation images asked about for val_accuracy


def encode_texts(tok: BPETokenizer, texts: list[str], seq_len: int) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    """x, y int64 [N, seq_len]: marker + text + <|endoftext|>, shifted, padding ignored."""
    eot = tok.eot_id
    x = np.full((len(texts), seq_len), eot, dtype=np.int64)
    y = np.full((len(texts), seq_len), IGNORE_INDEX, dtype=np.int64)
    for i, ids in enumerate(tok.encode_batch(texts)):
        seq = [eot, *ids, eot]
        if len(seq) - 1 > seq_len:
            raise ConfigError(f"a vision text of {len(seq) - 1} tokens does not fit "
                              f"data.seq_len={seq_len}: raise data.seq_len (and "
                              "model.max_seq_len)")
        x[i, :len(seq) - 1] = seq[:-1]
        y[i, :len(seq) - 1] = seq[1:]
    return x, y


ANSWER = re.compile(r"a:( [^.]*)\.")  # an answer: after "a:", up to its full stop


def answer_token_mask(tok: BPETokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """bool [N, seq_len], aligned with ``encode_texts``' y: True where the target is a token
    of an answer (" yes" in "q: is there a red square? a: yes."; not the "." after it, not
    the prompt, nothing in a caption). A token counts if its characters lie inside the
    answer's (its leading space included)."""
    mask = np.zeros((len(texts), seq_len), dtype=bool)
    for i, (text, enc) in enumerate(zip(texts, tok.tok.encode_batch(list(texts)))):
        spans = [m.span(1) for m in ANSWER.finditer(text)]
        for j, (lo, hi) in enumerate(enc.offsets[:seq_len]):
            # y[j] is token j of the text: encode_texts puts the marker before it in x
            mask[i, j] = any(a <= lo and hi <= b for a, b in spans)
    return mask


def loss_weights(mask: np.ndarray, y: np.ndarray, answer_weight: float) -> np.ndarray:
    """float32 [N, seq_len]: answer_weight on the answer tokens, 1 on every other counted
    target, 0 on padding."""
    w = np.where(mask, np.float32(answer_weight), np.float32(1.0))
    return np.where(y == IGNORE_INDEX, np.float32(0.0), w).astype(np.float32)


class ImageTextLoader:
    """Shuffled passes over the training examples: pass p is the permutation drawn from
    ``default_rng([seed, p])``; a batch may run across a pass boundary. Resumes exactly."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next_indices(self, k: int) -> np.ndarray:
        out = []
        while k > 0:
            take = min(k, self.n - self.pos)
            out.append(self._order[self.pos:self.pos + take])
            self.pos += take
            k -= take
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._permutation()
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n") != self.n:
            raise ConfigError(f"the checkpoint's loader read {state.get('n')} training images, "
                              f"this run has {self.n}: resume with the same vision.n_train")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._order = self._permutation()


class VisionTask:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        vc = cfg.vision
        self.seq_len = cfg.data.seq_len
        # The tokenizer of data.* (the text run's, so a text checkpoint's embeddings fit),
        # whose token streams vision.text_pretrain_steps train on.
        self.text = load_data(cfg)
        self.tokenizer = self.text.tokenizer
        self.trains_text = not vc.freeze_text
        check_text_pretrain(cfg)
        self.data = vdata.load_or_build(cfg.data.cache_dir, vc.n_train, vc.n_val, vc.n_heldout,
                                        vc.data_seed, vc.image_size, vc.max_objects)
        self.train_x, self.train_y = encode_texts(self.tokenizer, self.data.train.texts,
                                                  self.seq_len)
        self.val_x, self.val_y = encode_texts(self.tokenizer, self.data.val.texts, self.seq_len)
        self.train_w = None  # vision.answer_loss_weight: None when every token weighs 1
        if vc.answer_loss_weight != 1:
            mask = answer_token_mask(self.tokenizer, self.data.train.texts, self.seq_len)
            self.train_w = loss_weights(mask, self.train_y, vc.answer_loss_weight)
        # vision.binding_share: single binding questions on training images, their own rows.
        self.bind_image, self.bind_x, self.bind_y, self.bind_w = _binding_rows(
            self, cfg) if vc.binding_share else (None, None, None, None)
        self.val_queries = _val_queries(self.data.val, ACCURACY_IMAGES)
        self.heldout_queries = vdata.composition_queries(self.data.heldout)
        self.val_exists_queries = vdata.exists_queries(self.data.val, ACCURACY_IMAGES)
        # Built here, not cached: a few hundred images drawn from the seed in well under 1 s.
        self.binding = vdata.binding_probe(self.data.heldout, vc.data_seed, vc.max_objects)
        # (name, split, queries, aggregate key or None): what _accuracy scores at each eval.
        self.scoring_sets = [
            ("val", self.data.val, self.val_queries, "val_accuracy"),
            ("heldout", self.data.heldout, self.heldout_queries, "heldout_accuracy"),
            ("val_exists", self.data.val, self.val_exists_queries, None),
            ("heldout_exists", self.binding.split, self.binding.queries, None),
        ]
        self._scoring: dict[str, tuple[list, list]] = {}  # _scoring_rows per scoring set

    @staticmethod
    def init_keep(name: str) -> bool:
        return is_vision_param(name)  # a text checkpoint lacks them: they stay as initialised

    def build_model(self, device: str | torch.device = "meta") -> nn.Module:
        return build_vision_model(self.cfg.model, self.cfg.vision, device)

    def prepare(self, runtime) -> None:
        """vision.freeze_text: only the vision parts train (Flamingo's frozen LM);
        vision.freeze_encoder: the encoder and resampler train only in their own
        pre-training (``start``), not with the language-model loss (Flamingo's frozen vision
        encoder)."""
        vc = self.cfg.vision
        for part in runtime.parts:
            for name, p in part.named_parameters():
                top = name.split(".", 1)[0]
                if (vc.freeze_text and not is_vision_param(name)) or (
                        vc.freeze_encoder and top in PRETRAINED_MODULES):
                    p.requires_grad_(False)

    def start(self, runtime, init_source) -> dict | None:
        """A new run's pre-training, unless ``train.init_from`` brought trained weights: the
        text model's (vision.text_pretrain_steps; not from any checkpoint: a text run's
        weights are pretrained already) and the vision encoder's (vision.pretrain_steps;
        not from a vision run's checkpoint)."""
        vc, tc = self.cfg.vision, self.cfg.train
        out = {}
        if vc.text_pretrain_steps and init_source is None:
            start = time.perf_counter()
            out["text_pretrain_loss"] = pretrain_text(runtime, self.cfg, self.text)
            if runtime.is_main:
                print(f"text model pre-trained: {vc.text_pretrain_steps} steps, loss "
                      f"{out['text_pretrain_loss']:.3f}, {time.perf_counter() - start:.1f}s",
                      file=sys.stderr)
        if vc.pretrain_steps and not (init_source is not None and read_extra(init_source)[
                "config"].get("vision", {}).get("enabled")):
            start = time.perf_counter()
            loss = pretrain_encoder(runtime.parts[0], self.data.train, vc.pretrain_steps,
                                    tc.batch_size, vc.pretrain_lr, tc.seed, vc.pretrain_head)
            out["vision_pretrain_loss"] = loss
            if runtime.is_main:
                print(f"vision encoder pre-trained: {vc.pretrain_steps} steps, what-is-where "
                      f"loss {loss:.3f}, {time.perf_counter() - start:.1f}s", file=sys.stderr)
        return out or None

    def loader(self) -> VisionLoader:
        vc, seed = self.cfg.vision, self.cfg.train.seed
        return VisionLoader(
            ImageTextLoader(len(self.train_x), seed),
            ImageTextLoader(len(self.bind_x), seed + 1) if vc.binding_share else None,
            vc.binding_from, vc.binding_share)

    def _inputs(self, split: vdata.VisionSplit, idx: np.ndarray) -> dict[str, torch.Tensor]:
        images = image_tensor(split.images[idx])[:, None]  # [B, 1, 3, H, W]
        return {"images": images, "media_pos": torch.zeros(len(idx), 1, dtype=torch.long)}

    def step(self, runtime, loader: VisionLoader, batch: int,
             routing: RoutingAccumulator) -> float:
        b = loader.next_batch(batch)  # the global batch, identical on every rank
        rows = [(self.train_x, self.train_y, self.train_w, b.texts)]
        images = [b.texts]
        if len(b.binding):
            rows.append((self.bind_x, self.bind_y, self.bind_w, b.binding))
            images.append(self.bind_image[b.binding])
        y = np.concatenate([ys[i] for _, ys, _, i in rows])
        # Rows are left-aligned: the columns past the batch's last target are padding alone
        # (~16% of a step's tokens in configs/vision_tiny.yaml) and are cut. Each token's
        # logits are the same (causal attention); only the expert capacity and the router
        # losses, which padding shared with text, see fewer tokens.
        width = int(np.nonzero((y != IGNORE_INDEX).any(0))[0][-1]) + 1
        x = torch.from_numpy(np.concatenate([xs[i, :width] for xs, _, _, i in rows]))
        y = torch.from_numpy(np.ascontiguousarray(y[:, :width]))
        weights = None
        if any(w is not None for _, _, w, _ in rows):  # a text's token weighs 1 by default
            weights = torch.from_numpy(np.concatenate([
                (ys[i] != IGNORE_INDEX).astype(np.float32) if w is None else w[i]
                for _, ys, w, i in rows])[:, :width])
        n_targets = int((y != IGNORE_INDEX).sum())
        return runtime.forward_backward(x, y, routing,
                                        self._inputs(self.data.train, np.concatenate(images)),
                                        n_targets=n_targets, target_weights=weights)

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, runtime) -> dict[str, float]:
        """Every rank runs every batch (an expert-parallel forward needs all ranks) and gets
        the same numbers."""
        runtime.train(False)
        try:
            out = self._losses(runtime)
            for name, split, queries, aggregate in self.scoring_sets:
                if queries:
                    out.update(self._accuracy(runtime, split, queries, name, aggregate))
            for key, (attn, ffn) in runtime.parts[0].gates().items():
                out[f"gate_attn_{key}"], out[f"gate_ffn_{key}"] = attn, ffn
        finally:
            runtime.train(True)
        return out

    def _forward(self, runtime, x: torch.Tensor, inputs: dict | None) -> torch.Tensor:
        dev = runtime.device
        inputs = {k: v.to(dev) for k, v in (inputs or {}).items()}
        with runtime.autocast():
            return runtime.forward(x.to(dev), **inputs)

    def _losses(self, runtime) -> dict[str, float]:
        """Sums over every validation row, in micro-batches: the numbers do not depend on
        train.micro_batch_size (each text's shuffled image is the previous row's, over the
        whole set, not within a micro-batch)."""
        mb, n = self.cfg.train.micro_batch_size, len(self.val_x)
        sums = {"val_loss": 0.0, "val_loss_shuffled_images": 0.0, "val_loss_no_images": 0.0}
        count = 0
        for lo in range(0, n, mb):
            idx = np.arange(lo, min(lo + mb, n))
            x, y = torch.from_numpy(self.val_x[idx]), torch.from_numpy(self.val_y[idx])
            y_dev = y.to(runtime.device)
            inputs = self._inputs(self.data.val, idx)
            shuffled = {**inputs, "images": self._inputs(self.data.val, (idx - 1) % n)["images"]}
            for key, given in (("val_loss", inputs), ("val_loss_shuffled_images", shuffled),
                               ("val_loss_no_images", None)):
                logits = self._forward(runtime, x, given)
                sums[key] += float(lm_loss(logits, y_dev, reduction="sum"))
            count += int((y != IGNORE_INDEX).sum())
        return {k: v / count for k, v in sums.items()}

    def _scoring_rows(self, queries: list) -> tuple[list, list]:
        """The candidate-answer rows of ``queries``, tokenised once (not at every eval):
        chunks of (image indices, x, y with only the answer counted) and, per row, (query
        index, whether it is the true answer)."""
        tok, eot, mb = self.tokenizer, self.tokenizer.eot_id, self.cfg.train.micro_batch_size
        rows, owners = [], []  # one row per (query, candidate)
        for qi, (image, q) in enumerate(queries):
            prompt = [eot, *tok.encode(q.prompt)]
            for cand in vdata.candidates(q.kind, self.cfg.vision.max_objects):
                rows.append((image, prompt + tok.encode(cand), len(prompt)))
                owners.append((qi, cand == q.answer))
        width = max(len(ids) for _, ids, _ in rows) - 1
        chunks = []
        for lo in range(0, len(rows), 4 * mb):
            chunk = rows[lo:lo + 4 * mb]
            x = torch.full((len(chunk), width), eot, dtype=torch.long)
            y = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            for r, (_, ids, n_prompt) in enumerate(chunk):
                x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
                y[r, n_prompt - 1:len(ids) - 1] = torch.tensor(ids[n_prompt:])  # answer only
            chunks.append((np.array([img for img, _, _ in chunk]), x, y))
        return chunks, owners

    def _accuracy(self, runtime, split: vdata.VisionSplit, queries: list, name: str,
                  aggregate: str | None = None) -> dict[str, float]:
        """Share of questions whose true answer has the highest log-probability, and
        (``_calibrated``) the highest log-probability gain over the text model alone: the
        answer the image makes likelier than the question alone does (PMI scoring, Holtzman
        et al. 2021), which discounts the text prior a held-out pair contradicts. Keys:
        ``{split}_{kind}_accuracy`` per question kind, where ``split`` is ``name`` up to its
        first "_" (the scoring set "val_exists" gives val_exists_accuracy), and
        ``{aggregate}`` over all its queries when given; both with ``_calibrated``."""
        if name not in self._scoring:
            self._scoring[name] = self._scoring_rows(queries)
        chunks, owners = self._scoring[name]
        scores, priors = [], []
        for images, x, y in chunks:
            y = y.to(runtime.device)
            logits = self._forward(runtime, x, self._inputs(split, images))
            scores.append(answer_logprobs(logits, y).cpu())
            priors.append(answer_logprobs(self._forward(runtime, x, None), y).cpu())
        scores, priors = torch.cat(scores), torch.cat(priors)
        out = {}
        for suffix, score in (("", scores), ("_calibrated", scores - priors)):
            best: dict[int, tuple[float, bool]] = {}
            for (qi, true), s in zip(owners, score.tolist()):
                if qi not in best or s > best[qi][0]:
                    best[qi] = (s, true)
            by_kind: dict[str, list[bool]] = {}
            for qi, (_, q) in enumerate(queries):
                by_kind.setdefault(q.kind, []).append(best[qi][1])
            prefix = name.split("_")[0]
            out.update({f"{prefix}_{kind}_accuracy{suffix}": float(np.mean(v))
                        for kind, v in by_kind.items()})
            if aggregate is not None:
                out[f"{aggregate}{suffix}"] = float(np.mean([c for v in by_kind.values()
                                                            for c in v]))
        return out

    def sample(self, runtime, device: torch.device) -> str | None:
        """A caption of the first held-out image, greedy, beside the true one."""
        tok, tc = self.tokenizer, self.cfg.train
        prompt = [tok.eot_id, *tok.encode("a")]
        with autocast_context(device, tc.dtype):
            new = caption_image(runtime.parts[0], self.data.heldout.images[0], prompt,
                                max_new_tokens=min(tc.sample_tokens, 48),
                                params=SamplingParams(max_new_tokens=48, temperature=0.0,
                                                      stop_tokens=(tok.eot_id,)))
        text = tok.decode(prompt[1:] + [t for t in new if t != tok.eot_id])
        if runtime.is_main:
            truth = vdata.caption(self.data.heldout.scenes[0])
            print(f"held-out image 0: {truth!r}\nmodel caption:    {text!r}", file=sys.stderr)
        return text


def _binding_rows(task: VisionTask, cfg: Config) -> tuple[np.ndarray, ...]:
    """image int64 [N], x, y [N, seq_len] (``encode_texts``) and the loss weights of the
    binding rows: "q: is there a <pair>? a: yes." and a distractor "no." per training image
    that has one (``data.exists_queries``). With vision.binding_answer_weight only the
    answer's tokens are targets, at that weight; else every token is, weighted as a text's
    (None: all 1)."""
    if cfg.vision.max_objects < 2:
        raise ConfigError(f"vision.binding_share={cfg.vision.binding_share} needs scenes of "
                          "two objects or more (a binding question's no is a distractor): "
                          "raise vision.max_objects or set vision.binding_share=0")
    queries = vdata.exists_queries(task.data.train)
    texts = [q.prompt + q.answer + "." for _, q in queries]
    x, y = encode_texts(task.tokenizer, texts, task.seq_len)
    w, weight = None, cfg.vision.binding_answer_weight
    if weight is not None:
        y[~answer_token_mask(task.tokenizer, texts, task.seq_len)] = IGNORE_INDEX
        w = np.where(y == IGNORE_INDEX, 0.0, weight).astype(np.float32)
    elif task.train_w is not None:
        w = loss_weights(answer_token_mask(task.tokenizer, texts, task.seq_len), y,
                         cfg.vision.answer_loss_weight)
    return np.array([i for i, _ in queries], dtype=np.int64), x, y, w


@dataclass
class VisionBatch:
    """One global batch: row indices into the training texts and into the binding rows."""
    texts: np.ndarray
    binding: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


class VisionLoader:
    """The batches of a vision run by step: images with their texts; from step
    ``binding_from + 1`` on (vision.binding_from, binding_share), ``n_binding(batch)`` rows
    of each batch are binding questions and the rest texts. Each source keeps its own
    shuffled passes, so a resumed run draws what the unbroken one would."""

    def __init__(self, texts: ImageTextLoader, binding: ImageTextLoader | None = None,
                 binding_from: int = 0, binding_share: float = 0.0):
        if (binding is None) != (binding_share == 0):
            raise ValueError("a binding loader is needed exactly when binding_share is set")
        self.texts, self.binding = texts, binding
        self.binding_from, self.share = binding_from, binding_share
        self.served = 0  # batches drawn so far: the step the next batch is for, minus one

    def n_binding(self, batch: int) -> int:
        """Binding rows in a batch of ``batch`` (at least one text row stays)."""
        return min(batch - 1, round(self.share * batch))

    def next_batch(self, batch: int) -> VisionBatch:
        self.served += 1
        k = self.n_binding(batch) if self.binding is not None and \
            self.served > self.binding_from else 0
        out = VisionBatch(texts=self.texts.next_indices(batch - k))
        if k:
            out.binding = self.binding.next_indices(k)
        return out

    def state_dict(self) -> dict:
        return {"served": self.served, "texts": self.texts.state_dict(),
                "binding": None if self.binding is None else self.binding.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "served" not in state:  # a checkpoint from before binding rows: texts only
            state = {"served": 0, "texts": state, "binding": None}
        if (self.binding is None) != (state["binding"] is None):
            raise ConfigError(f"the checkpoint's run had {'' if state['binding'] else 'no '}"
                              "binding rows: resume with its vision.binding_share")
        self.texts.load_state_dict(state["texts"])
        if self.binding is not None:
            self.binding.load_state_dict(state["binding"])
        self.served = state["served"]


def _val_queries(split: vdata.VisionSplit, n_images: int) -> list:
    """A colour and a shape question about one object of each of the first images (seen
    colour x shape pairs: the counterpart of the held-out composition queries)."""
    out = []
    for i, scene in enumerate(split.scenes[:n_images]):
        o = scene.objects[i % len(scene.objects)]
        out += [(i, vdata.colour_question(o)), (i, vdata.shape_question(o))]
    return out
