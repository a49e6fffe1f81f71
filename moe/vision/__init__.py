"""Vision: a Flamingo-style image encoder joined to the text model by gated cross-attention.

    encoder.py      ViT patch encoder and the Perceiver resampler (images -> latents)
    attention.py    cross-attention and the gated cross-attention block (Flamingo eq. 1)
    model.py        VisionLanguageModel: the text Transformer plus the vision parts
    data.py         the generated images, captions and questions, cached in data/
    task.py         what the trainer runs for a vision run (batches, losses, evaluation)

docs/vision.md says how to train it and what it measured.
"""
