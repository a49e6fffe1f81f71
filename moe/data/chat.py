"""The chat template: how a list of messages becomes the text a model continues.

    text = render_chat([{"role": "user", "content": "Write a loop"}], CHAT_TEMPLATE)
    ids = tokenizer.encode(text)

The template is Jinja, rendered as Hugging Face's ``apply_chat_template`` renders it (a
sandboxed environment with ``trim_blocks`` and ``lstrip_blocks``, the variables ``messages``,
``add_generation_prompt``, ``bos_token`` and ``eos_token``), and the export writes the same
template into the exported folder's tokenizer files (moe/hf/export.py), so
``AutoTokenizer.from_pretrained(folder).apply_chat_template(messages,
add_generation_prompt=True)`` gives the token ids the server feeds the model (tested).

It is plain text, not special tokens: our tokenizer splits ``<|endoftext|>`` written in text
into ordinary tokens (document text must never yield the separator), so role markers are
text too. A run folder may keep its own template as ``chat_template.jinja`` beside its
``tokenizer.json``; ``moe-serve --chat-template FILE`` overrides both. Our models are trained
on code, not conversations: the template makes the protocol work, not the model chat.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

# A turn is "<|role|>\n" + content + "\n"; the generation prompt opens the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
TEMPLATE_FILE = "chat_template.jinja"


def load_chat_template(tokenizer_path: str | Path | None = None,
                       override: str | Path | None = None) -> str:
    """``override`` (a file) if given, else ``chat_template.jinja`` beside the tokenizer file
    if there is one, else ``CHAT_TEMPLATE``. A template that does not compile raises
    ValueError naming the file."""
    path = Path(override) if override is not None else (
        Path(tokenizer_path).with_name(TEMPLATE_FILE) if tokenizer_path is not None else None)
    if path is None or (override is None and not path.is_file()):
        return CHAT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"chat template {path} does not exist")
    template = path.read_text()
    try:
        _compile(template)
    except Exception as e:  # jinja2's TemplateSyntaxError and friends
        raise ValueError(f"chat template {path} does not compile: {e}") from None
    return template


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Hugging Face's settings (transformers' chat template utilities), so both render alike.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template)


def render_chat(messages: list[dict], template: str = CHAT_TEMPLATE,
                add_generation_prompt: bool = True, eos_token: str = "<|endoftext|>",
                bos_token: str | None = None) -> str:
    """The text of ``messages`` (dicts with "role" and "content" strings) under ``template``;
    ``bos_token`` defaults to ``eos_token`` (ours is one token for both, as GPT-2's)."""
    return _compile(template).render(messages=messages,
                                     add_generation_prompt=add_generation_prompt,
                                     bos_token=eos_token if bos_token is None else bos_token,
                                     eos_token=eos_token)
