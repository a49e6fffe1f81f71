"""Training: the loop and what only it uses.

    loop.py        train(cfg): data, model, AdamW, schedule, eval, checkpoints, logs
    task.py        what a run trains on (the text LM; the vision model: moe/vision/task.py)
    metrics.py     metrics.jsonl (writer and reader), wandb, per-layer routing statistics
    nonfinite.py   train.on_nonfinite: stop, skip or roll back a NaN/inf step
    init_from.py   train.init_from: a new run from another run's weights (or an
                   imported Hugging Face model's, or a dense model's upcycle)
    run_lock.py    one trainer per run folder (an flock released when its holder dies)

Import ``train`` from ``moe.train.loop``; this file imports nothing, so the parts the loop
uses (metrics, tasks) load without the loop.
"""
