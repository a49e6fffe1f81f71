"""Analytic figures from a config, nothing trained or run:

    params.py    parameters (total, active, per expert), FLOPs per token, KV cache
    context.py   memory of long contexts (attention scores, KV cache) by sequence length
    layout.py    per-GPU parameters and memory of a tp x pp x dp x ep layout, from the plan
    serving.py   serving memory: batch that fits, bytes per token
"""
