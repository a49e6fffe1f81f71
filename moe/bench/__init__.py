"""Benchmarks that print numbers (speed targets live here, never in tests):

    step.py          MoE vs active-matched dense training step, MFU, experts timed alone
    memory.py        peak memory and speed of activation checkpointing, each mode in a fresh process
    init_memory.py   peak host memory of building and materialising a model
    decode.py        decode tokens/s: our engine, static and continuous batching, vs Hugging Face
    speculative.py   speculative decoding: acceptance, speedup, cost model
    serve.py         the server's load test: the load (malformed, cut-off, 1e-40 requests
                     among the rest) and its invariants; serve_run.py runs it on a server
                     subprocess (throughput, latency, memory, SIGTERM)
    prompt_lookup.py prompt lookup on code completion: ours and Hugging Face's, plain and not
"""
