"""A chat message's content as a list of text parts (aptray.chat_content), as the OpenAI SDK,
LangChain and vLLM's clients send it: the chat template renders it as the string of its texts
joined with newlines (vLLM's rule for a model that takes text only), on chat, /tokenize, the
Responses API and LLM.chat alike; any other part, and hostile shapes, are refused by name.
(Served: tests/test_serve.py::test_chat_content_as_text_parts_is_their_joined_text.)"""
from __future__ import annotations

import asyncio
import re

import pytest
from pydantic import ValidationError
from transformers import AutoTokenizer

from aptray import LLM, SamplingParams
from aptray.chat_content import MAX_PARTS
from aptray.sampling_params import InvalidRequest
from aptray.serve.limits import RequestLimits
from aptray.serve.openai_api import ChatCompletionRequest, TokenizeChatRequest
from aptray.serve.relay import Rejected
from aptray.serve.responses_api import ResponsesRequest
from aptray.serve.tokenize_api import Tokenizing
from aptray.serve.tools import chat_chars, chat_prompt
from tiny_models import tiny_model

PARTS = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
JOINED = "What is the capital\nof France?"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(tiny_model("opt-60x3"))


def _chat(*messages, cls=ChatCompletionRequest, **fields):
    return cls(messages=list(messages), **fields)


def _refusal(content, role: str = "user") -> InvalidRequest:
    """What checking a chat of one message with this content raises, as the server checks it first."""
    req = _chat({"role": role, "content": content})
    with pytest.raises(InvalidRequest) as e:
        chat_chars(req.messages, None)
    return e.value


@pytest.mark.parametrize("cls", [ChatCompletionRequest, TokenizeChatRequest])
def test_parts_are_the_prompt_of_their_joined_text(tokenizer, cls):
    """The token ids (and text) of a chat whose messages carry text parts are those of the same chat
    with each message's texts joined by newlines, through the chat_prompt that chat requests and
    /tokenize use; an assistant's refusal part is its text; the size the limits count is the same."""
    as_parts = _chat({"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                     {"role": "user", "content": PARTS},
                     {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot say."}]},
                     {"role": "user", "content": [{"type": "text", "text": "Please."}]}, cls=cls)
    as_text = _chat({"role": "system", "content": "Be brief."}, {"role": "user", "content": JOINED},
                    {"role": "assistant", "content": "I cannot say."}, {"role": "user", "content": "Please."}, cls=cls)
    text, ids = chat_prompt(tokenizer, as_parts, None)
    assert (text, ids) == chat_prompt(tokenizer, as_text, None)
    assert JOINED in text and ids
    assert chat_chars(as_parts.messages, None) == chat_chars(as_text.messages, None)
    # one part is its own text: no separator
    one = _chat({"role": "user", "content": PARTS[:1]}, cls=cls)
    alone = _chat({"role": "user", "content": PARTS[0]["text"]}, cls=cls)
    assert chat_prompt(tokenizer, one, None) == chat_prompt(tokenizer, alone, None)


@pytest.mark.parametrize("content,role,param,match", [
    ([PARTS[0], {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}], "user",
     "messages[0].content[1].type", "part of type 'image_url', and this model takes text only"),
    ([{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}], "user",
     "messages[0].content[0].type", "'input_audio', and this model takes text only"),
    ([{"type": "file", "file": {"file_id": "f"}}], "user", "messages[0].content[0].type", "'file'"),
    ([{"type": "refusal", "refusal": "no"}], "user", "messages[0].content[0].type", "send parts of type 'text'$"),
    ([{"type": "image_url"}], "assistant", "messages[0].content[0].type", "'text' or 'refusal'"),
    ([], "user", "messages[0].content", "empty list of parts"),
    ([PARTS[0]] * (MAX_PARTS + 1), "user", "messages[0].content", f"{MAX_PARTS + 1} parts, over the limit"),
    ([{"type": "text"}], "user", "messages[0].content[0].text", "needs its 'text': a string"),
    ([{"type": "text", "text": 5}], "user", "messages[0].content[0].text", "needs its 'text'"),
    ([{"type": "text", "text": ["hi"]}], "user", "messages[0].content[0].text", "needs its 'text'"),
    ([{"type": "text", "text": None}], "user", "messages[0].content[0].text", "needs its 'text'"),
    ([{"type": "text", "text": "a\ud800"}], "user", "messages[0].content[0].text", "lone surrogate at character 1"),
    ([{"text": "no type"}], "user", "messages[0].content[0]", "must be a content part"),
    ([{"type": ["text"], "text": "hi"}], "user", "messages[0].content[0]", "must be a content part"),
])
def test_parts_other_than_text_are_refused_by_name(content, role, param, match):
    """A part that is not text (or an assistant's refusal), or is not a part, is the client's error
    naming it (a 400 where the server checks it): this model takes text only; 10,000 parts, none, a
    part without its text or with text that is not a string or not Unicode likewise."""
    e = _refusal(content, role)
    assert e.param == param and re.search(match, str(e)), (e.param, str(e))


@pytest.mark.parametrize("content", [[["hi"]], [[PARTS[0]]], {"type": "text", "text": "hi"}, ["hi"], 5])
def test_content_of_another_shape_is_invalid(content):
    """Nested lists, a bare part, strings in a list: not content at all (the server's 422)."""
    with pytest.raises(ValidationError, match="content"):
        _chat({"role": "user", "content": content})


def test_the_size_limits_count_the_joined_text(tokenizer):
    """Parts each under the prompt's character limit are refused (400, messages) when their joined
    text is over it, on chat and on /tokenize, before the tokenizer sees them; /tokenize answers a
    refused part with a 400 naming it."""
    limits = RequestLimits(context=64, vocab_size=len(tokenizer))
    half = limits.prompt_chars // 2
    parts = [{"type": "text", "text": "x" * half}, {"type": "text", "text": "y" * half}]
    req = _chat({"role": "user", "content": parts})
    chars = chat_chars(req.messages, None)
    assert chars == chat_chars(_chat({"role": "user", "content": "x" * half + "\n" + "y" * half}).messages, None)
    assert limits.size_error({}, prompt_chars=chars, num_messages=1)["param"] == "messages"
    assert limits.size_error({}, prompt_chars=chars - half, num_messages=1) is None
    service = Tokenizing(tokenizer, limits, 64)
    try:
        big = [{"type": "text", "text": "x" * limits.prompt_chars}] * 5  # over the limit for a prompt to truncate
        for content, status, param in ((big, 400, "messages"),
                                       ([{"type": "image_url", "image_url": {"url": "u"}}], 400,
                                        "messages[0].content[0].type")):
            with pytest.raises(Rejected) as e:
                asyncio.run(service.tokenize(_chat({"role": "user", "content": content}, cls=TokenizeChatRequest), ""))
            assert (e.value.status, e.value.param) == (status, param), str(e.value)
        got = asyncio.run(service.tokenize(_chat({"role": "user", "content": PARTS}, cls=TokenizeChatRequest), ""))
        assert got.tokens == chat_prompt(tokenizer, _chat({"role": "user", "content": JOINED},
                                                          cls=TokenizeChatRequest), None)[1]
    finally:
        service.close()


def test_responses_input_parts_join_by_the_same_rule():
    """The Responses API's message items of several input_text parts are the chat message of their
    texts joined as chat's parts are."""
    items = [{"role": "user", "content": [{"type": "input_text", "text": t["text"]} for t in PARTS]}]
    assert ResponsesRequest(input=items).chat_request().messages[0].content == JOINED


def test_offline_chat_takes_text_parts_as_their_joined_text():
    """LLM.chat renders parts as the server does: the same greedy tokens as the joined string; a
    part that is not text is a ValueError naming it."""
    llm = LLM(tiny_model("opt-60x3"), num_cache_blocks=32)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    got = llm.chat([{"role": "user", "content": PARTS}], sp)[0]
    want = llm.chat([{"role": "user", "content": JOINED}], sp)[0]
    assert list(got.prompt_token_ids) == list(want.prompt_token_ids)
    assert got.outputs[0].token_ids == want.outputs[0].token_ids
    with pytest.raises(ValueError, match="this model takes text only") as e:
        llm.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], sp)
    assert e.value.param == "messages[0].content[0].type"


def test_responses_refusals_name_the_responses_fields():
    """A refusal of the chat completion that answers a response names the Responses API's own fields:
    max_output_tokens for chat's max_tokens (its message too), input[i] for messages[i] (the
    instructions come first among the chat's messages), text.format for structured_outputs."""
    from aptray.serve.responses_api import in_responses_terms
    req = ResponsesRequest(instructions="be brief", max_output_tokens=10_000,
                           input=[{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}])
    chat = req.chat_request()
    refusal, _ = RequestLimits(512, 1000).admit([1, 2], chat.sampling(1) | {"max_tokens": 10_000})
    e = in_responses_terms(Rejected.of(refusal), req)
    assert e.param == "max_output_tokens" and "max_tokens" not in str(e) and e.status == 400
    part = in_responses_terms(Rejected("an image", 400, "messages[1].content[0].type"), req)
    assert part.param == "input[0].content[0].type"
    assert in_responses_terms(Rejected("x", 400, "messages[0].content"), req).param == "instructions"
    assert in_responses_terms(Rejected("x", 400, "structured_outputs"), req).param == "text.format"
    same = Rejected("queue full", 429)
    assert in_responses_terms(same, req) is same
