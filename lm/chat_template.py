"""The ChatML prompt format and Hugging Face chat templates.

`format_chatml` writes plain ChatML (`<|im_start|>role\n...<|im_end|>\n`) as Salamandra's instruct
models use it; `render_chat_template` renders any Hugging Face (Jinja) chat template the way
transformers does; `read_chat_template` finds the template saved with a tokenizer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox

from lm.special_tokens import SPECIAL_IDS, SPECIAL_TOKENS

__all__ = ["CHAT_ROLES", "CHATML_TEMPLATE", "format_chatml", "read_chat_template", "render_chat_template"]

CHAT_ROLES: tuple[str, ...] = ("system", "user", "assistant")
_IM_START, _IM_END = SPECIAL_TOKENS[SPECIAL_IDS.im_start], SPECIAL_TOKENS[SPECIAL_IDS.im_end]

# Plain ChatML, with no default system prompt (the instruct models' own template inserts one with
# the current date): training prompts must not change from one day to the next. BOS is left out
# on purpose, the tokenizer adds it (add_bos_token), as in Salamandra.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def format_chatml(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render ``[{"role": ..., "content": str}, ...]`` as ChatML text (no BOS).

    Raises ValueError for a role outside ``CHAT_ROLES``, content that is not a string, or content
    holding ``<|im_start|>`` / ``<|im_end|>`` (it would silently open or close a turn).
    """
    parts = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in CHAT_ROLES:
            raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise ValueError(
                f"message {index} content must be a str, got {type(content).__name__}; "
                "put images in as placeholder text before formatting"
            )
        for marker in (_IM_START, _IM_END):
            if marker in content:
                raise ValueError(f"message {index} content contains {marker!r}, which would break the turn structure")
        parts.append(f"{_IM_START}{role}\n{content}{_IM_END}\n")
    if add_generation_prompt:
        parts.append(f"{_IM_START}assistant\n")
    return "".join(parts)


def render_chat_template(
    template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False, **variables: Any
) -> str:
    """Render a Hugging Face chat template (Jinja) the way ``transformers`` does.

    Same environment as ``apply_chat_template``: a sandbox with ``trim_blocks`` and ``lstrip_blocks``,
    the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now`` and a ``tojson`` that keeps
    non-ASCII text. The special tokens are there as ``bos_token``, ``eos_token``, ``unk_token`` and
    ``pad_token``; ``variables`` adds or overrides template variables (e.g. ``date_string``).
    A template's ``raise_exception`` surfaces as ``jinja2.TemplateError``.
    """
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def strftime_now(format: str) -> str:
        return datetime.now().strftime(format)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment.filters["tojson"] = tojson
    environment.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    context = {
        "bos_token": SPECIAL_TOKENS[SPECIAL_IDS.bos],
        "eos_token": SPECIAL_TOKENS[SPECIAL_IDS.eos],
        "unk_token": SPECIAL_TOKENS[SPECIAL_IDS.unk],
        "pad_token": SPECIAL_TOKENS[SPECIAL_IDS.pad],
        **variables,
        "messages": [dict(m) for m in messages],
        "add_generation_prompt": add_generation_prompt,
    }
    return environment.from_string(template).render(**context)


def read_chat_template(directory: str | Path) -> str | None:
    """The chat template saved in a Hugging Face tokenizer directory: `chat_template.jinja`, else
    `tokenizer_config.json`'s `chat_template` (its "default" entry when it holds named templates);
    None when there is none."""
    directory = Path(directory)
    # Newer transformers save the template as its own file, which then takes precedence.
    jinja_path = directory / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    config_path = directory / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    template = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):  # the named-templates form: [{"name": ..., "template": ...}]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
