"""Generation at the end of the decoder's context: answers stop there and say so; a chat that
outgrows the context drops its oldest exchanges. The references are brute force: the same weights
with a longer context decoding without limit, a full-forward argmax loop, and every trimming of a
chat tried in turn."""

import copy
import io
import re
import sys

import pytest
import torch
from PIL import Image

from multimodal.cli import main
from multimodal.conversation import tokenize_conversation, with_image_markers
from multimodal.generation import GenerationConfig, generate, stream
from tests.multimodal.tiny import build_tiny_vlm

RED = Image.new("RGB", (32, 32), (220, 30, 30))
BLUE = Image.new("RGB", (40, 32), (30, 30, 220))
NEVER = GenerationConfig(max_new_tokens=400, stop_ids=())  # longer than any room below


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tokenizer):
    """The tiny model with random weights, whose greedy argmax still moves from step to step."""
    return build_tiny_vlm(tokenizer).eval()


def with_context(vlm, max_seq_len: int):
    """The same weights, with a context of max_seq_len tokens."""
    short = copy.deepcopy(vlm)
    short.decoder.config.max_seq_len = max_seq_len
    return short


def prompt(vlm, text: str, images: int = 0) -> list[int]:
    messages = [{"role": "user", "content": "<image>\n" * images + text}]
    return tokenize_conversation(messages, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens,
                                 add_generation_prompt=True).input_ids


def argmax_loop(vlm, prompt_ids, pixels, new_tokens) -> list[int]:
    """No cache, no context check: the full forward pass over the whole sequence at every step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(new_tokens):
            embeds = vlm.embed(torch.tensor([ids]), pixels)
            ids.append(int(vlm.decoder(inputs_embeds=embeds)[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_an_answer_stops_at_the_end_of_the_context_with_the_tokens_of_an_unlimited_one(model):
    ids, pixels = prompt(model, "Describe the image.", 1), model.preprocess([RED])
    unlimited = generate(model, [ids], pixels, NEVER)[0]  # max_seq_len 512: room for all 400
    assert unlimited.finish_reason == "length" and len(unlimited) == 400
    assert len(set(unlimited[:10])) >= 3  # not a degenerate model
    for room in (1, 2, 9):
        short = with_context(model, len(ids) + room)
        out = generate(short, [ids], pixels, NEVER)[0]
        assert out == unlimited[:room] == argmax_loop(model, ids, pixels, room)
        assert out.finish_reason == "context"
        # The same through the text interfaces.
        pieces = stream(short, ids, pixels, NEVER)
        assert pieces.finish_reason is None
        assert "".join(pieces) == model.tokenizer.decode(out) and pieces.finish_reason == "context"


def test_the_reason_is_the_first_limit_reached(model):
    ids, pixels = prompt(model, "Describe the image.", 1), model.preprocess([RED])
    unlimited = generate(model, [ids], pixels, NEVER)[0]
    short = with_context(model, len(ids) + 6)
    for max_new_tokens, reason in ((5, "length"), (6, "length"), (7, "context")):
        out = generate(short, [ids], pixels, GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=()))[0]
        assert (out, out.finish_reason) == (unlimited[:min(max_new_tokens, 6)], reason)
    # A stop token before either limit: the answer up to it, "stop".
    stop_id = unlimited[3]
    first = unlimited.index(stop_id)
    out = generate(short, [ids], pixels, GenerationConfig(max_new_tokens=50, stop_ids=(stop_id,)))[0]
    assert (out, out.finish_reason) == (unlimited[:first], "stop")


def test_batched_rows_reach_their_own_limits(model):
    # Rows of different lengths: one runs into the context, one into max_new_tokens, one stops.
    cases = [(prompt(model, "Describe the image.", 2), [RED, BLUE]), (prompt(model, "Describe the image.", 1), [RED]),
             (prompt(model, "Describe la imagen en español, por favor."), [])]
    unlimited = [generate(model, [ids], model.preprocess(images), NEVER)[0] for ids, images in cases]
    lengths = [len(ids) for ids, _ in cases]
    limit = max(lengths) + 5
    short = with_context(model, limit)
    rooms = [limit - n for n in lengths]
    max_new_tokens = rooms[1] - 3
    assert rooms[0] < max_new_tokens
    # A stop token that the third row says early and the others not before their limits.
    seen = set(unlimited[0][:rooms[0]]) | set(unlimited[1][:max_new_tokens])
    stop_id = next(t for t in unlimited[2][:min(max_new_tokens, rooms[2]) - 1] if t not in seen)
    config = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=(stop_id,))
    out = generate(short, [ids for ids, _ in cases], short.preprocess([RED, BLUE, RED]), config)

    def cut(tokens, n):
        return tokens[:min([n] + [i for i, t in enumerate(tokens) if t == stop_id])]

    assert out[0] == cut(unlimited[0], rooms[0]) and out[0].finish_reason == "context"
    assert out[1] == cut(unlimited[1], config.max_new_tokens) and out[1].finish_reason == "length"
    assert out[2] == cut(unlimited[2], rooms[2]) and out[2].finish_reason == "stop"
    for (ids, images), row in zip(cases, out):  # batched equals alone
        alone = generate(short, [ids], short.preprocess(images), config)[0]
        assert (alone, alone.finish_reason) == (row, row.finish_reason)


def test_a_prompt_that_fills_the_context_is_refused_and_one_token_less_gets_one_token(model):
    ids = prompt(model, "Describe the image.", 1)
    pixels = model.preprocess([RED])
    with pytest.raises(ValueError, match=rf"prompt 0 has {len(ids)} tokens, which fills the decoder's context "
                                         rf"of {len(ids)} tokens .* shorten the prompt"):
        generate(with_context(model, len(ids)), [ids], pixels)
    out = generate(with_context(model, len(ids) + 1), [ids], pixels, NEVER)[0]
    assert len(out) == 1 and out.finish_reason == "context"
    # caption: a str with its reason.
    caption = with_context(model, len(ids) + 3).caption(RED, prompt="Describe the image.", max_new_tokens=50,
                                                         stop_ids=())
    assert isinstance(caption, str) and caption.finish_reason == "context"
    assert caption == model.tokenizer.decode(generate(model, [ids], pixels, NEVER)[0][:3])


def exchanges(n: int) -> list[dict[str, str]]:
    chat = []
    for i in range(n):
        chat += [{"role": "user", "content": f"Question {i}: describe la imagen."},
                 {"role": "assistant", "content": f"Answer {i}: un círculo rojo sobre un fondo azul."}]
    return chat


def prompt_of(vlm, messages, images) -> list[int]:
    marked = with_image_markers(messages, len(images))
    return tokenize_conversation(marked, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens,
                                 add_generation_prompt=True).input_ids


def brute_force_trim(vlm, messages, images, room, keep_marked_images):
    """Every cut in turn, from none: the first that leaves `room` (or the last possible cut).
    Returns (dropped messages, prompt ids)."""
    system = 1 if messages[0]["role"] == "system" else 0
    starts = [i for i in range(system, len(messages)) if i == system or messages[i]["role"] == "user"]
    for start in starts:
        kept = messages[:system] + messages[start:]
        kept_images = keep_marked_images(start) if keep_marked_images else images
        ids = prompt_of(vlm, kept, kept_images)
        if len(ids) + room <= vlm.decoder.config.max_seq_len or start == starts[-1]:
            return start - system, ids, kept_images


@pytest.mark.parametrize("system", [False, True])
def test_a_chat_too_long_for_the_context_drops_its_oldest_exchanges(model, system):
    messages = ([{"role": "system", "content": "You describe images."}] if system else []) + exchanges(5)
    messages.append({"role": "user", "content": "And now?"})
    full = prompt_of(model, messages, [RED])
    for limit, max_new_tokens in ((len(full) + 10, 10), (len(full) + 9, 10), (len(full) - 20, 8), (len(full) // 2, 100)):
        short = with_context(model, limit)
        room = min(max_new_tokens, limit // 4)
        dropped, expected_ids, _ = brute_force_trim(short, messages, [RED], room, None)
        ids, pixels, got = short._chat_inputs(messages, [RED], max_new_tokens)
        assert (got, ids) == (dropped, expected_ids)
        assert torch.equal(pixels, short.preprocess([RED]))  # the image goes with the first user message kept
        assert (dropped == 0) == (len(full) + room <= limit) and dropped % 2 == 0
        if dropped:
            assert short.tokenizer.decode(ids).count("Question") == 5 - dropped // 2
        answer = short.chat(messages, images=[RED], max_new_tokens=max_new_tokens, stop_ids=())
        assert answer.dropped_messages == dropped
        kept = messages[:int(system)] + messages[int(system) + dropped:]
        again = short.chat(kept, images=[RED], max_new_tokens=max_new_tokens, stop_ids=())
        assert (answer, again.dropped_messages) == (again, 0)
        assert answer.finish_reason == ("length" if len(ids) + max_new_tokens <= limit else "context")
        streamed = short.stream_chat(messages, images=[RED], max_new_tokens=max_new_tokens, stop_ids=())
        assert streamed.dropped_messages == dropped and "".join(streamed) == answer
        assert streamed.finish_reason == answer.finish_reason


def test_images_marked_in_dropped_messages_go_with_them(model):
    messages = [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": "A circle."},
                {"role": "user", "content": "Question: describe la imagen."}, {"role": "assistant", "content": "No."},
                {"role": "user", "content": "<image>\nAnd this one?"}]
    full = prompt_of(model, messages, [RED, BLUE])
    without_first = prompt_of(model, messages[2:], [BLUE])
    for limit, dropped, kept_images in ((len(full) + 10, 0, [RED, BLUE]), (len(without_first) + 10, 2, [BLUE]),
                                        (len(without_first) + 9, 4, [BLUE])):
        ids, pixels, got = with_context(model, limit)._chat_inputs(messages, [RED, BLUE], 10)
        assert (got, ids) == (dropped, prompt_of(model, messages[dropped:], kept_images))
        assert torch.equal(pixels, model.preprocess(kept_images))


def test_a_latest_message_that_alone_fills_the_context_is_a_clear_error(model):
    messages = exchanges(2) + [{"role": "user", "content": "Describe la imagen en español, por favor. " * 8}]
    alone = prompt_of(model, messages[-1:], [RED])
    short = with_context(model, len(alone))
    with pytest.raises(ValueError, match=rf"latest user message with 1 images of 16 tokens, the 4 messages before "
                                         rf"it dropped\) has {len(alone)} tokens and fills the decoder's context "
                                         rf"of {len(alone)} tokens .* shorten the latest message"):
        short.chat(messages, images=[RED])
    with pytest.raises(ValueError, match=r"latest user message\) has"):
        with_context(model, len(prompt_of(model, messages[-1:], []))).chat(messages[-1:])


def test_cli_chat_drops_old_turns_and_notes_cut_off_answers(model, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (48, 40), (200, 30, 30)).save(tmp_path / "image.png")
    first = prompt_of(model, [{"role": "user", "content": "Describe the image."}], [RED])
    short = with_context(model, len(first) + 40)
    short.save_pretrained(tmp_path / "ckpt")
    lines = ["Describe the image."] * 3 + ["Describe la imagen en español, por favor. " * 20, "Still there?", ""]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    args = ["chat", "--checkpoint", str(tmp_path / "ckpt"), "--image", str(tmp_path / "image.png")]
    assert main(args + ["--max-new-tokens", "30"]) == 0
    out, err = capsys.readouterr()
    limit = len(first) + 40
    # The random model never says <|im_end|>: every answer is cut off, first by --max-new-tokens,
    # then, as the history grows, by the context, until older turns go.
    assert "[cut off at --max-new-tokens (30 tokens)]" in err
    dropped = re.findall(rf"\[the chat outgrew the model's context of {limit} tokens: dropped its (\d+) oldest messages\]",
                         err)
    assert dropped and all(int(n) % 2 == 0 for n in dropped)
    # The over-long message is refused and the chat goes on: five answers, each cut off.
    assert f"fills the decoder's context of {limit} tokens" in err
    assert err.count("[cut off") == 4
    # The default --max-new-tokens (256) is longer than the whole context: answers run to its end.
    monkeypatch.setattr(sys, "stdin", io.StringIO("Describe the image.\n"))
    assert main(args) == 0
    assert f"[cut off: the prompt and the answer filled the model's context of {limit} tokens" in capsys.readouterr().err


def test_the_compiled_step_stops_at_the_end_of_the_context_as_eager_does(model, monkeypatch):
    from lm import decode

    # aot_eager: the static cache and the compiled step's plumbing, compiled in seconds (see
    # tests/multimodal/test_compiled_generation.py).
    monkeypatch.setattr(decode, "COMPILE_BACKEND", "aot_eager")
    prompts = [prompt(model, "Describe the image.", 2), prompt(model, "Describe the image.", 1)]
    short = with_context(model, len(prompts[0]) + 4)  # row 0 has 4 tokens of room, row 1 has 20
    pixels = short.preprocess([RED, BLUE, RED])
    eager = short.generate(prompts, pixels, max_new_tokens=12, stop_ids=())
    compiled = short.generate(prompts, pixels, max_new_tokens=12, stop_ids=(), compile=True)
    assert [(ids, ids.finish_reason) for ids in compiled] == [(ids, ids.finish_reason) for ids in eager]
    assert [len(ids) for ids in eager] == [4, 12] and [ids.finish_reason for ids in eager] == ["context", "length"]
