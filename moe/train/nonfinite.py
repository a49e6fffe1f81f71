"""What a step with a non-finite loss or gradient does: ``train.on_nonfinite``.

The trainer checks every step before ``optimizer.step()``: the loss (summed over all ranks by
``ShardedModel.reduce_step_metrics``, so under pipeline parallelism the last stage's NaN reaches
every stage) and the global gradient norm (reduced over every shard by
``moe.parallel.grads.grad_norm``, so an inf in one parameter's gradient on one rank makes the
norm inf on all). Both numbers are identical on every rank, so every rank takes the same
branch with no extra collective. Then, per ``train.on_nonfinite``:

- ``stop``: a one-line ``NonFiniteError`` naming the step and what to do; nothing is saved, the
  last checkpoint is kept.
- ``skip``: the step's gradients are dropped and the optimizer does not step (AdamW moments and
  step count untouched). The batch counts as read (the data position moves past it) but not as
  trained on: the step counter, token count and so the LR schedule and batch ramp stay where
  they were, so the run equals one whose data never held that batch, and still trains
  ``max_steps`` updates.
- ``rollback``: as PaLM did for loss spikes (Chowdhery et al. 2022, sec. 5.1: restart ~100 steps
  before the spike and skip ~200-500 batches), reload the latest checkpoint (model, optimizer,
  RNG, step, tokens: the resume path) but keep the data position past the offending batch, so
  the batches read since that checkpoint are not replayed.

Each event writes a one-line message and a metrics row
``{"step", "event": "nonfinite", "action", "loss", "grad_norm", "skipped", "rolled_back"}``
(``step`` is the step that failed; a rollback's row adds ``to_checkpoint``). After
``train.max_nonfinite`` events with no step completed past the previous failure (a rollback
that fails again at the same step counts), the next one stops the run. The counts are
checkpointed, so a resumed run keeps them.
"""

from __future__ import annotations

import math

from moe.config import TrainConfig


class NonFiniteError(FloatingPointError):
    """The run stopped on a non-finite loss or gradient; the message is one line for users."""


class NonFiniteGuard:
    def __init__(self, tc: TrainConfig, state: dict | None = None):
        self.policy, self.limit, self.ckpt_every = tc.on_nonfinite, tc.max_nonfinite, tc.ckpt_every
        state = state or {}
        self.skipped = int(state.get("skipped", 0))
        self.rolled_back = int(state.get("rolled_back", 0))
        self.in_a_row, self.last_bad = 0, 0

    @staticmethod
    def is_bad(loss: float, grad_norm: float) -> bool:
        return not (math.isfinite(loss) and math.isfinite(grad_norm))

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "rolled_back": self.rolled_back}

    def event(self, step: int, done: int, loss: float, grad_norm: float, find_checkpoint,
              log) -> tuple[str, object]:
        """Step ``step`` failed with ``done`` steps completed. Counts the event, passes its
        metrics row to ``log`` and returns (one-line message, checkpoint to roll back to or
        None), or raises NonFiniteError with the message. ``find_checkpoint()`` (the latest
        good checkpoint or None; collective under a mesh) is called on the same branches on
        every rank, and only where the answer is needed: never for a plain skip."""
        what = (f"step {step}: loss is {loss}" if not math.isfinite(loss)
                else f"step {step}: gradient norm is {grad_norm} (loss {loss:.4f})")
        # Progress past the previous failure resets the count; a rollback that fails again at
        # the same step does not.
        self.in_a_row = self.in_a_row + 1 if done < self.last_bad else 1
        self.last_bad = step
        stopping = self.policy == "stop" or self.in_a_row > self.limit
        checkpoint = find_checkpoint() if stopping or self.policy == "rollback" else None
        kept = f"last checkpoint {checkpoint.name} kept" if checkpoint else "no checkpoint yet"
        advice = "lower train.lr or check the data"
        failure = None
        if self.policy == "stop":
            failure = (f"{what}: stopped (train.on_nonfinite=stop), {kept}: {advice}, or run "
                       f"again with train.on_nonfinite=skip or rollback to go past it")
        elif self.in_a_row > self.limit:
            failure = (f"{what}: {self.in_a_row} non-finite steps with no progress "
                       f"(train.max_nonfinite={self.limit}), giving up, {kept}: {advice}")
        elif self.policy == "rollback" and checkpoint is None:
            failure = (f"{what}: no checkpoint to roll back to yet (train.ckpt_every="
                       f"{self.ckpt_every}): {advice}, or use train.on_nonfinite=skip")
        row = {"step": step, "event": "nonfinite", "action": self.policy, "loss": loss,
               "grad_norm": grad_norm}
        if failure is not None:
            log({**row, "action": "stop", **self.state_dict()})
            raise NonFiniteError(failure)
        if self.policy == "skip":
            self.skipped += 1
            msg = f"{what}: update skipped ({self.skipped} skipped in this run)"
        else:
            self.rolled_back += 1
            row["to_checkpoint"] = checkpoint.name
            msg = (f"{what}: rolled back to {checkpoint.name}, the batches read since are "
                   f"skipped ({self.rolled_back} rollbacks in this run)")
        log({**row, **self.state_dict()})
        return msg, checkpoint
