"""KV-cached generation against a full-forward argmax loop; batching, stopping, sampling, streaming,
and the caption / chat entry points of VisionLanguageModel."""

import copy
import math
import random

import pytest
import torch
from PIL import Image

from lm.loss import IGNORE_INDEX
from multimodal import Batch
from multimodal.conversation import caption_messages, tokenize_conversation
from multimodal.generation import GenerationConfig, IncrementalDecoder, generate, stream
from tests.multimodal.tiny import build_tiny_vlm

RED = Image.new("RGB", (32, 32), (220, 30, 30))
BLUE = Image.new("RGB", (40, 32), (30, 30, 220))
RED_CAPTION = "A red circle on a blue background."
BLUE_CAPTION = "Un cercle 🦎 vermell sobre un fons blau."  # the emoji is outside the vocabulary: 4 byte tokens
TEXT_QUESTION = "Describe la imagen en español."
TEXT_ANSWER = "Un círculo rojo sobre un fondo azul."

# A model that answers something depends on the image and on the question: the tiny decoder,
# trained until it has memorized three conversations (its random init would repeat one token).
CONVERSATIONS = [
    ([{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": RED_CAPTION}], [RED]),
    ([{"role": "user", "content": "<image>\nDescribe the image."}, {"role": "assistant", "content": BLUE_CAPTION}], [BLUE]),
    ([{"role": "user", "content": TEXT_QUESTION}, {"role": "assistant", "content": TEXT_ANSWER}], []),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's matrices are too small for intra-op threads to help; their synchronization
    # costs more than the work, ten to twenty times more when other processes share the cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tokenizer, one_thread):
    vlm = build_tiny_vlm(tokenizer)
    rows = [tokenize_conversation(m, tokenizer, vlm.image_token_id, vlm.num_image_tokens) for m, _ in CONVERSATIONS]
    width = max(len(r.input_ids) for r in rows)
    ids = torch.tensor([r.input_ids + [tokenizer.pad_id] * (width - len(r.input_ids)) for r in rows])
    labels = torch.tensor([r.labels + [IGNORE_INDEX] * (width - len(r.labels)) for r in rows])
    pixels = vlm.preprocess([image for _, images in CONVERSATIONS for image in images])
    optimizer = torch.optim.AdamW(vlm.parameters(), lr=3e-3, weight_decay=0.0)
    vlm.train()
    for _ in range(70):
        loss, _ = vlm(Batch(ids, labels, pixels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1
    return vlm.eval()


def prompt(vlm, text: str, images: int = 0) -> list[int]:
    messages = [{"role": "user", "content": "<image>\n" * images + text}]
    return tokenize_conversation(messages, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens,
                                 add_generation_prompt=True).input_ids


def argmax_loop(vlm, prompt_ids, pixels, max_new_tokens, stop_ids) -> list[int]:
    """The reference: no cache, the full forward pass over the whole sequence at every step."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            embeds = vlm.embed(torch.tensor([ids]), pixels)
            token = int(vlm.decoder(inputs_embeds=embeds)[0, -1].argmax())
            if token in stop_ids:
                break
            ids.append(token)
    return ids[len(prompt_ids):]


def answer_ids(vlm, answer: str) -> list[int]:
    """The ids the model learned for `answer` (its label tokens, without <|im_end|>)."""
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}]
    labels = tokenize_conversation(messages, vlm.tokenizer, vlm.image_token_id, vlm.num_image_tokens).labels
    return [t for t in labels if t != IGNORE_INDEX][:-1]


CASES = {
    "image": ("Describe the image.", [RED]),
    "other-image": ("Describe the image.", [BLUE]),
    "text": (TEXT_QUESTION, []),
    "two-images": ("Compare.", [BLUE, RED]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("stop", ["default", "never"])
def test_greedy_equals_argmax_loop_over_full_forward(trained, case, stop):
    text, images = CASES[case]
    ids, pixels = prompt(trained, text, len(images)), trained.preprocess(images)
    config = GenerationConfig(max_new_tokens=14, stop_ids=None if stop == "default" else ())
    stop_ids = (trained.tokenizer.im_end_id, trained.tokenizer.eos_id) if stop == "default" else ()
    out = generate(trained, [ids], pixels, config)[0]
    assert out == argmax_loop(trained, ids, pixels, 14, stop_ids)
    assert len(set(out)) >= 5  # the argmax moves from step to step: not a degenerate model
    if stop == "never":
        assert len(out) == 14


def test_the_trained_answers_come_out_and_stop_at_im_end(trained):
    # Sanity of the fixture, and the natural stop: the memorized answer, then <|im_end|>, not returned.
    out = generate(trained, [prompt(trained, "Describe the image.", 1)], trained.preprocess([BLUE]))[0]
    assert out == answer_ids(trained, BLUE_CAPTION)
    assert trained.tokenizer.decode(out) == BLUE_CAPTION


def test_batched_prompts_of_different_lengths_equal_one_by_one(trained):
    cases = [  # (prompt ids, images): lengths differ by image count and text
        (prompt(trained, "Describe the image.", 1), [RED]),
        (prompt(trained, TEXT_QUESTION), []),
        (prompt(trained, "Compare these two pictures, please.", 2), [BLUE, RED]),
        ([trained.tokenizer.bos_id], []),
        (prompt(trained, "Describe the image.", 1), [BLUE]),
    ]
    assert len({len(ids) for ids, _ in cases}) == 4
    pixels = trained.preprocess([image for _, images in cases for image in images])
    for config in (GenerationConfig(max_new_tokens=12), GenerationConfig(max_new_tokens=12, stop_ids=())):
        batched = generate(trained, [ids for ids, _ in cases], pixels, config)
        alone = [generate(trained, [ids], trained.preprocess(images), config)[0] for ids, images in cases]
        assert batched == alone
    assert batched[0] != batched[4]  # the images really went to their own rows


def test_rows_stop_independently_and_decoding_ends_when_all_stopped(trained):
    calls = []
    hook = trained.decoder.model.norm.register_forward_hook(lambda *_: calls.append(1))
    try:
        prompts = [prompt(trained, "Describe the image.", 1), prompt(trained, TEXT_QUESTION)]
        out = generate(trained, prompts, trained.preprocess([RED]), GenerationConfig(max_new_tokens=60))
    finally:
        hook.remove()
    assert out == [answer_ids(trained, RED_CAPTION), answer_ids(trained, TEXT_ANSWER)]
    assert len(out[0]) != len(out[1])
    # One prefill, then one step per token until the longer answer's stop token was chosen.
    assert len(calls) == 1 + max(map(len, out))


def test_custom_stop_token_after_k_steps_and_eos_stops(trained):
    ids, pixels = prompt(trained, "Describe the image.", 1), trained.preprocess([RED])
    full = generate(trained, [ids], pixels, GenerationConfig(max_new_tokens=8, stop_ids=()))[0]
    k = next(i for i in range(3, 8) if full[i] not in full[:i])
    assert generate(trained, [ids], pixels, GenerationConfig(stop_ids=(full[k],)))[0] == full[:k]

    # Force EOS: a bias in the output head makes it win at every step.
    forced = copy.deepcopy(trained)
    head = forced.decoder.lm_head
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[forced.tokenizer.eos_id] = 1e4
    forced.decoder.lm_head = biased
    assert generate(forced, [ids, prompt(forced, TEXT_QUESTION)], pixels) == [[], []]
    eos = forced.tokenizer.eos_id
    assert generate(forced, [ids], pixels, GenerationConfig(max_new_tokens=3, stop_ids=()))[0] == [eos] * 3


@pytest.mark.parametrize("max_new_tokens", [1, 7])
def test_max_new_tokens_is_respected(trained, max_new_tokens):
    prompts = [prompt(trained, "Describe the image.", 1), prompt(trained, TEXT_QUESTION)]
    out = generate(trained, prompts, trained.preprocess([RED]), GenerationConfig(max_new_tokens=max_new_tokens))
    assert [len(o) for o in out] == [max_new_tokens] * 2


# --- sampling ---------------------------------------------------------------------------------


def test_sampling_is_reproducible_by_seed_and_tiny_top_p_is_greedy(trained):
    ids, pixels = prompt(trained, "Describe the image.", 1), trained.preprocess([RED])

    def sample(**options):
        return generate(trained, [ids, ids], torch.cat([pixels, pixels]),
                        GenerationConfig(max_new_tokens=16, stop_ids=(), **options))

    assert sample(temperature=2.0, seed=3) == sample(temperature=2.0, seed=3)
    draws = {str(sample(temperature=2.0, seed=seed)) for seed in range(4)}
    assert len(draws) == 4
    greedy = sample()
    assert sample(temperature=1.5, top_p=1e-6, seed=5) == greedy
    assert greedy[0] == greedy[1]


def test_a_seeded_sample_does_not_depend_on_the_rest_of_the_batch(trained):
    """Each row draws from its own generator: a prompt sampled with a seed gets the same tokens
    alone and beside other prompts with other settings (what a serving batch mixes)."""
    ids, pixels = prompt(trained, "Describe the image.", 1), trained.preprocess([RED])
    other = prompt(trained, "Compare.")
    mine = GenerationConfig(max_new_tokens=12, temperature=1.5, top_p=0.9, seed=11, stop_ids=())
    alone = generate(trained, [ids], pixels, mine)[0]
    neighbours = [GenerationConfig(max_new_tokens=5, temperature=2.0, seed=1), mine, GenerationConfig(max_new_tokens=3)]
    batched = generate(trained, [other, ids, other], pixels, neighbours)
    assert batched[1] == alone and len(alone) == 12
    assert generate(trained, [ids, ids], torch.cat([pixels, pixels]), mine) == [alone, alone]


def chi_square(counts: torch.Tensor, probs: torch.Tensor, total: int) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected >= 10 times, the rest pooled; and its degrees of freedom."""
    expected = probs * total
    big = expected >= 10
    observed_bins = torch.cat([counts[big], counts[~big].sum()[None]])
    expected_bins = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = expected_bins > 0
    statistic = ((observed_bins[keep] - expected_bins[keep]) ** 2 / expected_bins[keep]).sum()
    return float(statistic), int(keep.sum()) - 1


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float, keep=None):
    """softmax(logits / T) restricted to the nucleus (or to `keep`) and renormalized, and the nucleus."""
    probs = torch.softmax(logits / temperature, -1)
    if keep is None:
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[mass_before < top_p]] = True
    probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(), keep


@pytest.mark.parametrize("temperature, top_p", [(2.5, 1.0), (1.5, 0.6)])
def test_first_token_frequencies_follow_the_tempered_nucleus_distribution(trained, temperature, top_p):
    # Cut mid-turn, where the trained model is unsure what comes next.
    ids = prompt(trained, "Compare.")[:-3]
    with torch.no_grad():
        logits = trained.decoder(torch.tensor([ids]))[0, -1].double()
    probs, nucleus = nucleus_distribution(logits, temperature, top_p)
    assert probs.max() < 0.5 and int(nucleus.sum()) >= 5  # spread enough for the test to mean something
    total = 4000
    # One seed per row: a seed fixes a prompt's sample whatever the batch, so the rows of one seed
    # would all draw the same token.
    out = generate(trained, [ids] * total, None,
                   [GenerationConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=seed, stop_ids=())
                    for seed in range(total)])
    counts = torch.bincount(torch.tensor([o[0] for o in out]), minlength=len(probs)).double()
    assert counts[~nucleus].sum() == 0  # nothing outside the nucleus
    statistic, dof = chi_square(counts, probs, total)
    assert dof >= 5
    bound = dof + 6 * math.sqrt(2 * dof)  # the statistic has mean dof and sd sqrt(2 dof)
    assert statistic < bound
    # The check has power: the same counts are far off when the temperature is ignored.
    untempered, _ = nucleus_distribution(logits, 1.0, top_p, keep=nucleus)
    assert chi_square(counts, untempered, total)[0] > 10 * bound


# --- streaming --------------------------------------------------------------------------------


def test_stream_pieces_join_to_the_generated_text_with_a_split_emoji(trained):
    ids, pixels = prompt(trained, "Describe the image.", 1), trained.preprocess([BLUE])
    emoji_bytes = [trained.tokenizer.token_to_id(f"<0x{b:02X}>") for b in "🦎".encode()]
    generated = generate(trained, [ids], pixels)[0]
    assert any(generated[i:i + 4] == emoji_bytes for i in range(len(generated)))  # the emoji is 4 tokens
    pieces = list(stream(trained, ids, pixels))
    assert "".join(pieces) == trained.tokenizer.decode(generated) == BLUE_CAPTION
    # The emoji's four byte tokens come out at once, never as replacement characters.
    assert any("🦎" in p for p in pieces) and all(pieces) and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 10  # it really streams


def test_incremental_decoder_matches_full_decode_on_random_token_sequences(tokenizer):
    byte_ids = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    utf8 = [tokenizer.token_to_id(f"<0x{b:02X}>") for b in "é🦎ñ€".encode()]
    rng = random.Random(0)
    for _ in range(200):
        ids = []
        for _ in range(rng.randint(1, 30)):
            kind = rng.random()
            if kind < 0.4:
                ids.append(rng.randrange(104 + 256, tokenizer.vocab_size))  # learned pieces
            elif kind < 0.6:
                start = rng.randrange(len(utf8))
                ids += utf8[start:start + rng.randint(1, 4)]  # whole or broken characters
            elif kind < 0.8:
                ids.append(rng.choice(byte_ids))
            else:
                ids.append(rng.randrange(0, 10))  # specials, skipped by decode
        decoder = IncrementalDecoder(tokenizer)
        pieces = [decoder.push(i) for i in ids] + [decoder.finish()]
        assert "".join(pieces) == tokenizer.decode(ids)


def test_stream_leaves_no_inference_mode_or_eval_behind(trained):
    trained.train()
    trained.encoder.eval()  # a frozen encoder stays in eval while the rest trains
    try:
        for _ in stream(trained, prompt(trained, TEXT_QUESTION), None):
            assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()
            assert trained.decoder.training and not trained.encoder.training
        generate(trained, [prompt(trained, TEXT_QUESTION)])
        assert trained.training and trained.decoder.training and not trained.encoder.training
    finally:
        trained.eval()


# --- caption and chat -------------------------------------------------------------------------


def test_caption_of_an_image_is_a_str_and_of_a_list_a_list(trained):
    assert trained.caption(RED) == RED_CAPTION
    assert trained.caption([RED, BLUE, RED], batch_size=2) == [RED_CAPTION, BLUE_CAPTION, RED_CAPTION]
    assert trained.caption([]) == []
    assert isinstance(trained.caption(BLUE.convert("L"), language="ca", max_new_tokens=3), str)


def test_caption_asks_as_training_does(trained):
    for language in ("en", "es", "ca"):
        messages = caption_messages("unused", language)[:1]  # the user turn, with the canonical prompt
        ids = tokenize_conversation(messages, trained.tokenizer, trained.image_token_id, trained.num_image_tokens,
                                    add_generation_prompt=True).input_ids
        expected = trained.tokenizer.decode(generate(trained, [ids], trained.preprocess([BLUE]))[0])
        assert trained.caption(BLUE, language=language) == expected
    custom = trained.caption(RED, prompt="Describe the image.", max_new_tokens=5)
    assert custom == trained.tokenizer.decode(answer_ids(trained, RED_CAPTION)[:5])


def test_chat_with_images_with_and_without_markers(trained):
    marked = [{"role": "user", "content": "<image>\nDescribe the image."}]
    plain = [{"role": "user", "content": "Describe the image."}]
    assert trained.chat(marked, images=[BLUE]) == trained.chat(plain, images=BLUE) == BLUE_CAPTION
    assert trained.chat([{"role": "user", "content": TEXT_QUESTION}]) == TEXT_ANSWER
    llava = [{"from": "human", "value": "<image>\nDescribe the image."}]
    assert trained.chat(llava, images=[RED]) == RED_CAPTION
    assert "".join(trained.stream_chat(plain, images=[BLUE])) == BLUE_CAPTION
    two = trained.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare."}],
                       images=[RED, BLUE], max_new_tokens=4)
    assert isinstance(two, str)


def test_errors_say_what_was_wrong(trained):
    limit = trained.decoder.config.max_seq_len
    too_long = [trained.tokenizer.bos_id] * limit
    with pytest.raises(ValueError, match=rf"prompt 1 has {limit} tokens, which fills the decoder's context of {limit}"):
        generate(trained, [[1, 2], too_long])
    # A prompt that leaves less room than max_new_tokens is answered up to the end of the context
    # (tests/multimodal/test_context_limit.py).
    assert len(generate(trained, [too_long[:-10]], None, GenerationConfig(max_new_tokens=10, stop_ids=()))[0]) == 10
    with pytest.raises(ValueError, match="no prompts"):
        generate(trained, [])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate(trained, [[]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        GenerationConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        GenerationConfig(temperature=-1.0)
    with pytest.raises(TypeError, match="unknown generation options"):
        trained.caption(RED, max_tokens=5)
    with pytest.raises(ValueError, match="2 <image> markers but 1 images"):
        trained.chat([{"role": "user", "content": "<image><image> Compare."}], images=[RED])
    with pytest.raises(ValueError, match="last message is the assistant"):
        trained.chat([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    with pytest.raises(ValueError, match="1 images were given"):
        generate(trained, [prompt(trained, "Compare.", 2)], trained.preprocess([RED]))
    with pytest.raises(ValueError, match="no caption prompts for language 'xx'"):
        trained.caption(RED, language="xx")
    with pytest.raises(TypeError, match="not a PIL.Image"):
        trained.caption([RED, torch.zeros(3, 32, 32)])


def test_generation_runs_in_the_model_dtype(trained):
    half = copy.deepcopy(trained).to(torch.bfloat16)
    out = half.chat([{"role": "user", "content": "Describe the image."}], images=[RED], max_new_tokens=6)
    assert isinstance(out, str)
    ids = generate(half, [prompt(half, TEXT_QUESTION), [half.tokenizer.bos_id]], None,
                   GenerationConfig(max_new_tokens=5, temperature=1.0, top_p=0.9, seed=0, stop_ids=()))
    assert [len(i) for i in ids] == [5, 5]
