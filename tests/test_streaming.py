"""The serving stream without Ray: incremental detokenization (against full decodes, on byte-level
and SentencePiece-style tokenizers with characters split over tokens), what a client stream
relays (stop-string hold-back, the final text), the router's outbox, SSE events rendered from
templates (against the pydantic models), app args, and the benchmark's rate search."""
import asyncio
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aptray.model.factory import make_tokenizer
from aptray.outputs import IncrementalDetokenizer, token_bytes, token_text
from aptray.sampling_params import SamplingParams
from aptray.serve.args import AppArgs
from aptray.serve.streams import ClientStream, Outbox
from aptray.stop import StopChecker

TEXTS = ["héllo wörld, naïve café", "你好，世界", "emoji 🙂🙃 and a family 👩‍👩‍👧", "Ελληνικά и русский",
         "tabs\tand\nnewlines  double  spaces", "the answer is 42!", " leading space", "x\u0301 combining"]


def sentencepiece_like_tokenizer():
    """A Llama-2-style tokenizer made offline: "▁" for spaces, BPE with byte fallback (<0xXX> tokens
    for every character it lacks) and a decoder that strips one leading space."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in ["▁", *"abcdefghijklmnopqrstuvwxyz", "he", "▁t", "▁the", "an", "▁an", "▁a"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("h", "e"), ("▁", "t"), ("▁t", "he"), ("a", "n"), ("▁", "an"), ("▁", "a")]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


TOKENIZERS = {"byte-level": make_tokenizer(), "sentencepiece": sentencepiece_like_tokenizer()}


def _stream_decode(tokenizer, ids: list[int], step: int = 1) -> tuple[list[str], str]:
    """Deltas of an incremental decode fed `step` tokens at a time, and what finish() adds."""
    d = IncrementalDetokenizer(tokenizer)
    deltas = [d.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return deltas, d.finish()


def _after_a_prompt(tokenizer, ids: list[int]) -> str:
    """ids' text as the full decode of a prompt and them shows it after the prompt's text: with the space
    a SentencePiece first piece begins with, which tokenizer.decode(ids) alone strips."""
    prompt = tokenizer.encode("the", add_special_tokens=False)
    full = tokenizer.decode(prompt + ids, skip_special_tokens=True)
    prompt_text = tokenizer.decode(prompt)
    assert full.startswith(prompt_text)
    return full[len(prompt_text):]


def _check(tokenizer, ids: list[int], step: int = 1) -> None:
    full = _after_a_prompt(tokenizer, ids)
    deltas, rest = _stream_decode(tokenizer, ids, step)
    sent = ""
    for delta in deltas:
        sent += delta
        assert full.startswith(sent), (ids, sent, full)  # never a character the full decode does not have
    assert sent + rest == full


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_incremental_decode_equals_full_decode_on_split_characters(name):
    tokenizer = TOKENIZERS[name]
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert len(ids) > len(text.encode()) // 4  # multi-byte characters are spread over tokens
        for step in (1, 2, 3):
            _check(tokenizer, ids, step)
    # a character cut in half is held back, not relayed as U+FFFD
    ids = tokenizer.encode("é", add_special_tokens=False)  # its two bytes (after a "▁" for sentencepiece)
    assert len(ids) >= 2 and IncrementalDetokenizer(tokenizer).add(ids[:-1]) == ""


def test_token_bytes_rebuild_characters_split_over_tokens():
    """outputs.token_bytes (chat log-probabilities' `bytes`): where a character is split over tokens and
    each token's text alone reads U+FFFD, the tokens' bytes joined are the text's UTF-8 (byte-level BPE:
    every text; SentencePiece byte fallback: a text of such characters, after the space its first piece
    begins with, as the text reads after a prompt)."""
    byte_level, split = TOKENIZERS["byte-level"], 0
    for text in TEXTS:
        ids = byte_level.encode(text, add_special_tokens=False)
        split += sum("\ufffd" in byte_level.decode([t]) for t in ids)
        assert b"".join(token_bytes(byte_level, t) for t in ids) == text.encode(), text
        # the ingress passes the text it has cached: the same bytes
        assert [token_bytes(byte_level, t, token_text(byte_level, t)) for t in ids] == [
            token_bytes(byte_level, t) for t in ids]
    assert split > 20  # the texts' characters are split over tokens (CJK, Greek, emoji)
    sentencepiece = TOKENIZERS["sentencepiece"]
    ids = sentencepiece.encode("你好，世界🙂", add_special_tokens=False)
    assert b"".join(token_bytes(sentencepiece, t) for t in ids) == " 你好，世界🙂".encode()
    assert token_bytes(sentencepiece, sentencepiece.convert_tokens_to_ids("<0xE4>")) == b"\xe4"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_an_output_joins_its_prompt_and_its_token_texts_join_into_it(name):
    """A completion's text is what the decode of prompt and output shows after the prompt (the first
    SentencePiece piece keeps its space: "▁an" after "the" reads " an"), streamed or whole, and the
    log-probabilities' token texts and bytes join into it."""
    tokenizer = TOKENIZERS[name]
    prompt = tokenizer.encode("the", add_special_tokens=False)
    for text in [" an the a", " héllo wörld", " 你好，世界"]:
        output = tokenizer.encode(text, add_special_tokens=False)
        whole = tokenizer.decode(prompt + output)
        streamed = IncrementalDetokenizer(tokenizer)
        relayed = "".join(streamed.add([t]) for t in output) + streamed.finish()
        assert tokenizer.decode(prompt) + relayed == whole
        stops = StopChecker(SamplingParams(max_tokens=100), None, 512, tokenizer)
        assert stops.final_text(output) == relayed
        assert b"".join(token_bytes(tokenizer, t) for t in output) == relayed.encode()
        if all("\ufffd" not in token_text(tokenizer, t) for t in output):
            assert "".join(token_text(tokenizer, t) for t in output) == relayed
    sentencepiece = TOKENIZERS["sentencepiece"]
    assert token_text(sentencepiece, sentencepiece.convert_tokens_to_ids("▁the")) == " the"


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_incremental_decode_equals_full_decode_on_any_ids(name, data):
    """Any ids, special tokens and lone continuation bytes included; a trailing incomplete character
    comes out of finish() as the full decode shows it."""
    tokenizer = TOKENIZERS[name]
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    _check(tokenizer, ids, data.draw(st.integers(1, 4)))


def test_incremental_decode_is_linear():
    """Each token decodes a window of a few tokens, not the whole output."""
    tokenizer = TOKENIZERS["byte-level"]
    calls = []

    class Counting:
        encode = tokenizer.encode

        def decode(self, ids, **kw):
            calls.append(len(ids))
            return tokenizer.decode(ids, **kw)
    ids = tokenizer.encode(" ".join(TEXTS) * 4, add_special_tokens=False)
    d = IncrementalDetokenizer(Counting())
    for t in ids:
        d.add([t])
    assert len(ids) > 300 and max(calls) <= 8
    assert d.text + d.finish() == tokenizer.decode(ids)


def test_client_stream_holds_back_a_possible_stop_string_and_ends_with_the_engine_text():
    tokenizer = TOKENIZERS["byte-level"]
    text = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer.encode(text, add_special_tokens=False)
    last = next(i for i in range(len(ids)) if "lazy" in tokenizer.decode(ids[:i + 1]))  # the engine stops here
    s = ClientStream(tokenizer, True, 1.0, 1.0, ["lazy", "xy"], prompt_tokens=3)
    relayed = ""
    for i, t in enumerate(ids[:last]):
        relayed += s.advance([t])
        decoded = tokenizer.decode(ids[:i + 1])
        assert decoded.startswith(relayed) and len(decoded) - len(relayed) >= min(len(decoded), 3)
    cut = text[:text.find("lazy")]  # the engine's final text is cut at the stop string
    new, rest = s.finish(ids[:last + 1], cut)
    assert new == [ids[last]] and relayed + rest == cut
    chunk = s.chunk("r", new, rest, "stop")
    assert chunk["finished"] and chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": last + 1}


def test_client_stream_resumes_after_what_the_client_has():
    tokenizer = TOKENIZERS["byte-level"]
    ids = tokenizer.encode("héllo wörld again", add_special_tokens=False)
    whole = tokenizer.decode(ids)
    first = ClientStream(tokenizer, True, 1.0, 1.0, [], 1)
    seen_text = "".join(first.advance([t]) for t in ids[:5])
    again = ClientStream(tokenizer, True, 1.0, 1.0, [], 1, epoch=1)
    again.resume_at(ids[:5], seen_text)
    rest = "".join(again.advance([t]) for t in ids[5:])
    assert seen_text + rest + again.finish(ids, whole)[1] == whole
    assert again.chunk("r", [], "")["epoch"] == 1


def test_outbox_hands_over_everything_pending_and_a_new_reader_replaces_the_old():
    async def run():
        box = Outbox()
        box.put([{"n": 0}])  # before anyone reads: kept
        box.bind(asyncio.get_running_loop())
        reader = box.new_reader()
        assert await box.get(reader) == [{"n": 0}]
        producer = threading.Thread(target=lambda: [box.put([{"n": i}]) for i in range(1, 201)])
        producer.start()
        got = []
        while len(got) < 200:
            got += await asyncio.wait_for(box.get(reader), 5)
        producer.join()
        assert [c["n"] for c in got] == list(range(1, 201))
        waiting = asyncio.ensure_future(box.get(reader))
        await asyncio.sleep(0)
        newer = box.new_reader()
        assert await asyncio.wait_for(waiting, 5) is None  # the superseded reader ends
        box.put([{"n": "x"}])
        assert await asyncio.wait_for(box.get(newer), 5) == [{"n": "x"}]
    asyncio.run(run())


@pytest.mark.parametrize("text", ["plain", 'quo"te \\ back', "new\nline\ttab\x00\x1f", "é 你好 🙂", "\x01aptray-text\x01",
                                  "\u2028\u2029", ""])
def test_sse_templates_render_what_the_models_render(text):
    from aptray.serve.openai_api import (ChatChunkChoice, ChatCompletionChunk, ChatDelta, CompletionChoice,
                                         CompletionResponse)
    from aptray.serve.sse import ChatEvents, CompletionEvents, sse

    c = CompletionEvents("cmpl-1", "m", include_usage=True)
    assert c.text(text) == sse(CompletionResponse(id="cmpl-1", model="m", created=c.created,
                                                  choices=[CompletionChoice(text=text)]))
    h = ChatEvents("chat-1", "m", include_usage=False)
    assert h.text(text) == sse(ChatCompletionChunk(id="chat-1", model="m", created=h.created,
                                                   choices=[ChatChunkChoice(delta=ChatDelta(content=text))]))
    last = {"text": text, "finished": True, "finish_reason": "length", "usage": {"prompt_tokens": 2,
                                                                                "completion_tokens": 3}}
    events = c.render([{"text": "a", "finished": False}, last]).split("\n\n")[:-1]
    assert len(events) == 3 and '"finish_reason":"length"' in events[1] and '"total_tokens":5' in events[2]


def test_app_args_executor():
    assert AppArgs.parse({}).executor == "auto" and AppArgs.parse({"executor": "ray"}).executor == "ray"
    with pytest.raises(ValueError, match="executor"):
        AppArgs.parse({"executor": "gpu"})
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        AppArgs.parse({"executor": "local", "tensor_parallel_size": "2"})
    assert not AppArgs.parse({}).on_shards
    assert AppArgs.parse({"tensor_parallel_size": 2}).on_shards
    assert AppArgs.parse({"executor": "ray"}).on_shards
    assert AppArgs.parse({"tensor_parallel_size": 2}).router_resources(True) == {"num_cpus": 0}
    assert AppArgs.parse({}).router_resources(True)["num_gpus"] == 1


def test_bench_rate_search():
    from loadgen.bench_http_vs_engine import effective, next_probe

    assert effective({16: 1.0, 32: 0.95, 64: 0.5}) == 32 and next_probe({16: 1.0, 32: 0.95, 64: 0.5}, .9, 1.5, .1,
                                                                        1e3) == 48
    assert next_probe({16: 1.0, 32: 1.0}, .9, 1.5, .1, 1e3) == 48  # all pass: go higher, the grid is no cap
    assert effective({16: 1.0, 32: 0.2, 64: 1.0}) == 16  # a pass above a failure does not count
    assert next_probe({16: 1.0, 17: 0.1}, .9, 1.5, .1, 1e3) is None  # within resolution
    assert effective({8: 0.0}) == 0 and next_probe({8: 0.0}, .9, 1.5, .1, 1e3) == 4
    rng = random.Random(0)  # bisection converges on a monotone curve
    top = rng.uniform(20, 400)
    curve = {16.0: 1.0}
    while (r := next_probe(curve, .9, 1.5, .05, 4096)) is not None:
        curve[r] = 1.0 if r <= top else 0.0
    assert 0.95 * top <= effective(curve) <= top
