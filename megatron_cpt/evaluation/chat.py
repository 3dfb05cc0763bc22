"""The model's own chat template: where it comes from and how a conversation is rendered.

Instruction-following is measured the way the instruct model is used: the question as a user
turn inside the chat template, the answer after the assistant header. The template is taken
from the model, never written by us:

- a ``.gguf`` file: its metadata key ``tokenizer.chat_template`` (read with ``gguf``);
- an HF directory (also every ``mcore-to-hf`` export, which copies ``chat_template.jinja`` /
  ``tokenizer_config.json``) or a Megatron checkpoint with an HF tokenizer: the tokenizer's
  ``chat_template``.

Rendering is Jinja2 in a sandbox with the options Hugging Face uses for chat templates
(``trim_blocks``, ``lstrip_blocks``, ``raise_exception``), so a prompt equals the tokenizer's
own ``apply_chat_template`` (tested on SmolLM2) and works for tokenizers that have no
``apply_chat_template`` (tiktoken/SentencePiece under Megatron) given the template text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from megatron_cpt.errors import UserError


def gguf_chat_template(path: str | Path) -> str | None:
    """``tokenizer.chat_template`` from a GGUF file's metadata (None when absent).

    Cached per file version: ``GGUFReader`` parses every metadata field, the whole vocabulary
    included (~5 s for SmolLM2's 49,152 tokens), and a run asks for the template more than once.
    """
    stat = Path(path).stat()
    return _gguf_chat_template(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=8)
def _gguf_chat_template(path: str, mtime_ns: int, size: int) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def chat_template_of(backend) -> str:
    """The chat template of an evaluated model (see the module docstring for the sources)."""
    name = str(getattr(backend, "name", ""))
    if name.endswith(".gguf") and Path(name).is_file():
        template = gguf_chat_template(name)
        if template:
            return template
    hf = getattr(backend.tokenizer, "hf", None)
    template = getattr(hf, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if isinstance(template, str) and template.strip():
        return template
    raise UserError(
        f"{name}: the model has no chat template (tokenizer chat_template / GGUF "
        "tokenizer.chat_template); instruction-following tasks need one"
    )


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template)


def render_chat(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """The conversation as the text the model was trained on, ending with the assistant
    header when ``add_generation_prompt`` (the answer is what follows)."""
    import jinja2

    try:
        return _compile(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise UserError(f"chat template: {exc}") from None


def end_of_turn(template: str, bos_token: str = "", eos_token: str = "") -> str:
    """The text the template puts after an assistant message's content (e.g. ``<|im_end|>``
    or ``<|eot_id|>``), found by rendering a marker answer: an answer is complete when
    the model closes its turn, so label scoring includes this text."""
    marker = "\x00ANSWER\x00"
    text = render_chat(
        template,
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
        add_generation_prompt=False,
        bos_token=bos_token,
        eos_token=eos_token,
    )
    tail = text.split(marker, 1)[1]
    # only the closing special text up to the first newline (templates add "\n" between turns)
    return tail.split("\n", 1)[0] if "\n" in tail else tail
