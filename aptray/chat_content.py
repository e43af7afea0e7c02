"""A chat message's content sent as a list of parts (OpenAI's shape, which its SDK, LangChain and
vLLM's clients send), for models that take text only: the text parts' texts joined with newlines,
as vLLM's chat_utils joins them for a chat template that renders content as a string. Any other
part (image_url, input_audio, file...) is refused by name rather than dropped.

Shared by the server's chat and /tokenize (aptray.serve.openai_api.ChatMessage), the Responses
API's input items and the offline LLM.chat, so that all of them render the same prompt.
"""
from __future__ import annotations

from collections.abc import Iterable

from aptray.sampling_params import InvalidRequest, check_text

SEPARATOR = "\n"  # vLLM's, between a message's text parts
MAX_PARTS = 1024  # a message's parts: clients send a few; each costs a check before the size limit applies


def join_texts(texts: Iterable[str]) -> str:
    """Text parts' texts as one message's content."""
    return SEPARATOR.join(texts)


def content_text(content, role: str, param: str = "content") -> str | None:
    """content as the chat template takes it: a string (or None) as it is, a list of text parts as
    their texts joined. InvalidRequest naming param (messages[i].content...) where it is not that."""
    if content is None or isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{param} must be a string or a list of content parts", param)
    if not content:
        raise InvalidRequest(f"{param} is an empty list of parts: send a string, or one text part or more", param)
    if len(content) > MAX_PARTS:
        raise InvalidRequest(f"{param} has {len(content)} parts, over the limit of {MAX_PARTS}", param)
    return join_texts(_part_text(part, role, f"{param}[{i}]") for i, part in enumerate(content))


def _part_text(part, role: str, param: str) -> str:
    """The text of one part: {"type": "text", "text": ...} (an assistant's {"type": "refusal", "refusal": ...})."""
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        raise InvalidRequest(f"{param} must be a content part: an object with a type, such as "
                             f"{{\"type\": \"text\", \"text\": \"...\"}}", param)
    taken = ("text", "refusal") if role == "assistant" else ("text",)  # OpenAI's assistant may carry refusals
    if kind not in taken:
        raise InvalidRequest(f"{param} is a part of type {kind[:64]!r}, and this model takes text only: send "
                             f"parts of type {' or '.join(map(repr, taken))}", f"{param}.type")
    text = part.get(kind)
    if not isinstance(text, str):
        raise InvalidRequest(f"{param} of type {kind!r} needs its {kind!r}: a string", f"{param}.{kind}")
    return check_text(text, param=f"{param}.{kind}")
