"""Chat templates that turn a list of messages into DeepSeek-VL2's `sft_format` prompt string.

Only the "deepseek" template is registered: it is the `sft_format` of every released DeepSeek-VL2
`processor_config.json`. The rendering rule is the one of the official code, quirks included:

    (system + sep if system) + for every message i: "{role}: {content}{(sep, sep2)[i % 2]}"  or  "{role}:" if empty

The separator alternates by message *index*, not by role. With a leading `system` role message (case 12 of the
goldens) the user turn therefore ends with sep2 (the eos string) instead of "\\n\\n". This is reproduced on purpose.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

__all__ = ["Conversation", "conv_templates", "get_conv_template", "register_conv_template"]


@dataclass
class Conversation:
    """A prompt template plus the messages appended to it so far."""

    name: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    system_template: str = "{system_message}"
    system_message: str = ""
    messages: list[tuple[str, str]] = field(default_factory=list)
    stop_str: tuple[str, ...] = ()
    offset: int = 0  # number of leading few-shot messages (official field; the official web demo reads it)

    def set_system_message(self, system_message: str) -> None:
        self.system_message = system_message

    def append_message(self, role: str, message: str | None) -> None:
        """Append a turn; an empty or None message renders as "{role}:" (the slot the model completes)."""
        self.messages.append((role, message or ""))

    def update_last_message(self, message: str | None) -> None:
        """Replace the content of the last turn, e.g. the open assistant turn once the answer is generated
        (official API, used by the official web demo)."""
        if not self.messages:
            raise ValueError("update_last_message: the conversation has no message yet; append_message first")
        role, _ = self.messages[-1]
        self.messages[-1] = (role, message or "")

    def reset_message(self) -> None:
        self.messages = []

    def get_prompt(self) -> str:
        """Render the system prompt and all messages; the result is NOT stripped (callers strip it)."""
        seps = (self.sep, self.sep2)
        system = self.system_template.format(system_message=self.system_message)
        parts = [system + seps[0]] if system else []
        for i, (role, message) in enumerate(self.messages):
            if message and not isinstance(message, str):  # e.g. the official web demo's (text, images) tuples
                raise TypeError(f"message {i} ({role}) is a {type(message).__name__}, not text; append its text only")
            parts.append(f"{role}: {message}{seps[i % 2]}" if message else f"{role}:")
        return "".join(parts)

    def copy(self) -> Conversation:
        return copy.deepcopy(self)


conv_templates: dict[str, Conversation] = {}


def register_conv_template(template: Conversation, override: bool = False) -> None:
    if template.name in conv_templates and not override:
        raise ValueError(f"Conversation template {template.name!r} is already registered; pass override=True.")
    conv_templates[template.name] = template


def get_conv_template(name: str) -> Conversation:
    """Return a fresh copy of a registered template (templates are mutable, the registry must stay clean)."""
    if name not in conv_templates:
        raise ValueError(f"Unknown conversation template {name!r}; available: {sorted(conv_templates)}.")
    return conv_templates[name].copy()


register_conv_template(
    Conversation(
        name="deepseek",
        roles=("<|User|>", "<|Assistant|>"),
        sep="\n\n",
        sep2="<｜end▁of▁sentence｜>",
        stop_str=("User:", "<｜end▁of▁sentence｜>"),
    )
)
