"""VisionLanguageModel: image splicing, the chunked loss, freezing, the saved format."""

import json

import pytest
import torch
import torch.nn.functional as F

from lm import Decoder, LMConfig, SeqLayout
from lm.loss import IGNORE_INDEX
from multimodal import Batch, VisionLanguageModel

from tests.multimodal.tiny import build_tiny_vlm
from tests.numerics import assert_close_scaled


def sample_ids(vlm, n_images: int, text_before: int = 3, text_after: int = 4) -> list[int]:
    """A prompt: some text, then each image's placeholders separated by text."""
    g = torch.Generator().manual_seed(n_images * 31 + text_before)
    text = lambda n: torch.randint(110, vlm.decoder.config.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    ids = text(text_before)
    for _ in range(n_images):
        ids += vlm.image_placeholder() + text(2)
    return ids + text(text_after)


def test_image_embeddings_land_exactly_at_placeholder_positions(vlm):
    rows = [sample_ids(vlm, 2), sample_ids(vlm, 1, text_before=10)]
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [vlm.tokenizer.pad_id] * (width - len(r)) for r in rows])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        embeds = vlm.embed(input_ids, pixels)
        image_tokens = vlm.projector(vlm.encoder(pixels))
        text_embeds = vlm.decoder.model.embed_tokens.weight
    # Brute force: walk the rows, consuming image tokens in order.
    next_image, next_token = 0, 0
    for r in range(2):
        for t in range(width):
            token = input_ids[r, t].item()
            if token == vlm.image_token_id:
                assert torch.equal(embeds[r, t], image_tokens[next_image, next_token])
                next_token += 1
                if next_token == vlm.num_image_tokens:
                    next_image, next_token = next_image + 1, 0
            else:
                assert torch.equal(embeds[r, t], text_embeds[token])
    assert next_image == 3 and next_token == 0


def test_placeholder_count_mismatch_names_both_counts(vlm):
    ids = torch.tensor([sample_ids(vlm, 2)])
    with pytest.raises(ValueError, match=r"32 image placeholder tokens \(2 images' worth at 16 tokens per image\) but 1 images"):
        vlm(Batch(ids, pixels=torch.randn(1, 3, 32, 32)))
    with pytest.raises(ValueError, match="but 0 images"):
        vlm(Batch(ids))
    broken = torch.tensor([sample_ids(vlm, 1)[:-6] + sample_ids(vlm, 0)])
    broken[0, 5] = 200  # one placeholder overwritten: 15 left
    with pytest.raises(ValueError, match="15 image placeholder tokens"):
        vlm(Batch(broken, pixels=torch.randn(1, 3, 32, 32)))


def test_placeholder_runs_must_be_whole_images_within_one_sample(vlm):
    one = sample_ids(vlm, 1)
    start = one.index(vlm.image_token_id)
    split = one[:start + 8] + [200] + one[start + 8:start + 16] + one[start + 16:]  # a run broken by text
    pixels = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"unbroken runs of 16 .each image.s token count. within one sample; found runs of \[8, 8\]"):
        vlm(Batch(torch.tensor([split]), pixels=pixels))
    # 1.5 images' worth in one row and 0.5 in the other add up to 2 but are no images at all.
    rows = [one[:start] + vlm.image_placeholder() + [vlm.image_token_id] * 8 + [201] * 8,
            [vlm.image_token_id] * 8 + [201] * (len(one) + 8)]
    width = max(map(len, rows))
    ids = torch.tensor([r + [201] * (width - len(r)) for r in rows])
    with pytest.raises(ValueError, match=r"found runs of \[24, 8\]"):
        vlm(Batch(ids, pixels=torch.randn(2, 3, 32, 32)))
    # In a packed row, a run may not straddle two samples.
    packed = torch.tensor([[201] * 4 + [vlm.image_token_id] * 16 + [201] * 4])
    layout = SeqLayout.packed([[12, 12]])
    with pytest.raises(ValueError, match=r"found runs of \[8, 8\]"):
        vlm(Batch(packed, pixels=pixels, layout=layout))
    with pytest.raises(ValueError, match=r"pixels must be \[images, 3, height, width\]"):
        vlm(Batch(torch.tensor([one]), pixels=torch.randn(3, 32, 32)))
    with pytest.raises(ValueError, match=r"labels \(1, 3\) do not match input_ids"):
        vlm(Batch(torch.tensor([one]), labels=torch.zeros(1, 3, dtype=torch.long), pixels=pixels))


def test_mixed_dtypes_survive_save_and_load(vlm, tmp_path):
    vlm.decoder.to(torch.bfloat16)
    vlm.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.encoder.parameters()} == {torch.float32}


def test_logits_equal_decoder_on_spliced_embeddings(vlm):
    ids = torch.tensor([sample_ids(vlm, 1)])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        loss, logits = vlm(Batch(ids, pixels=pixels))
        expected = vlm.decoder(inputs_embeds=vlm.embed(ids, pixels))
    assert loss is None
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_chunked_loss_equals_full_logits_loss(tokenizer):
    vlm = build_tiny_vlm(tokenizer).eval()
    vlm.loss_chunk_size = 5
    ids = torch.tensor([sample_ids(vlm, 1), sample_ids(vlm, 1, text_before=3, text_after=4)])
    labels = ids.clone()
    labels[ids == vlm.image_token_id] = IGNORE_INDEX
    labels[:, :5] = IGNORE_INDEX
    pixels = torch.randn(2, 3, 32, 32)
    loss, logits = vlm(Batch(ids, labels, pixels), return_logits=True)
    full = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)
    assert_close_scaled(loss, full, rel=5e-6, msg="loss")
    grads = torch.autograd.grad(loss, list(vlm.projector.parameters()), retain_graph=True)
    full_grads = torch.autograd.grad(full, list(vlm.projector.parameters()))
    for (name, _), a, b in zip(vlm.projector.named_parameters(), grads, full_grads):
        assert_close_scaled(a, b, rel=1e-5, msg=name)


def test_packed_loss_equals_samples_run_alone(tokenizer):
    vlm = build_tiny_vlm(tokenizer).eval()
    samples = [sample_ids(vlm, 1), sample_ids(vlm, 0, text_before=9), sample_ids(vlm, 2, text_before=2)]
    images = [1, 0, 2]
    pixels = torch.randn(3, 3, 32, 32)
    lengths = [len(s) for s in samples]
    row = sum(samples, []) + [tokenizer.pad_id] * 3
    ids = torch.tensor([row])
    labels = ids.clone()
    labels[ids == vlm.image_token_id] = IGNORE_INDEX
    labels[0, sum(lengths):] = IGNORE_INDEX
    with torch.no_grad():
        packed_loss, _ = vlm(Batch(ids, labels, pixels, SeqLayout.packed([lengths])))
        total, count, first_image = 0.0, 0, 0
        for sample, n in zip(samples, images):
            s_ids = torch.tensor([sample])
            s_labels = s_ids.clone()
            s_labels[s_ids == vlm.image_token_id] = IGNORE_INDEX
            s_pixels = pixels[first_image : first_image + n] if n else None
            first_image += n
            _, logits = vlm(Batch(s_ids, pixels=s_pixels))
            targets = s_labels[0, 1:]
            keep = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[0, :-1][keep], targets[keep], reduction="sum")
            count += int(keep.sum())
    assert_close_scaled(packed_loss, total / count, rel=1e-5)


def test_frozen_encoder_and_decoder_only_projector_gets_gradients(tokenizer):
    vlm = build_tiny_vlm(tokenizer).train()
    vlm.encoder.requires_grad_(False)
    vlm.decoder.requires_grad_(False)
    ids = torch.tensor([sample_ids(vlm, 1)])
    labels = ids.masked_fill(ids == vlm.image_token_id, IGNORE_INDEX)
    loss, _ = vlm(Batch(ids, labels, torch.randn(1, 3, 32, 32)))
    loss.backward()
    for name, p in vlm.named_parameters():
        if name.startswith("projector."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_saved_model_round_trips(vlm, tmp_path):
    vlm.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["format"] == "salamandra-vision" and config["image_token_id"] == vlm.image_token_id
    assert config["projector"]["kind"] == "mlp" and config["decoder"]["vocab_size"] == vlm.tokenizer.vocab_size
    assert (tmp_path / "tokenizer.json").exists() and (tmp_path / "model.safetensors").exists()
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    for name, tensor in vlm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([sample_ids(vlm, 1)])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(Batch(ids, pixels=pixels))[1], vlm(Batch(ids, pixels=pixels))[1],
                                   atol=0, rtol=0)
    assert loaded.tokenizer.encode("Un cercle vermell") == vlm.tokenizer.encode("Un cercle vermell")


def test_siglip_pixel_shuffle_model_round_trips(tokenizer, tmp_path):
    vlm = build_tiny_vlm(tokenizer, "pixel_shuffle", tower="siglip", factor=2).eval()
    assert vlm.encoder.num_tokens == 16 and vlm.num_image_tokens == 4
    vlm.save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert loaded.num_image_tokens == 4 and loaded.projector.factor == 2 and loaded.encoder.mean == (0.5,) * 3
    for name, tensor in vlm.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.tensor([sample_ids(vlm, 2)])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(Batch(ids, pixels=pixels))[1], vlm(Batch(ids, pixels=pixels))[1],
                                   atol=0, rtol=0)


def test_bf16_checkpoint_loads_in_its_dtype(vlm, tmp_path):
    vlm.to(torch.bfloat16).save_pretrained(tmp_path)
    loaded = VisionLanguageModel.from_pretrained(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in VisionLanguageModel.from_pretrained(tmp_path, dtype=torch.float32).parameters()} == {
        torch.float32}


def test_from_pretrained_refuses_other_directories(vlm, tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        VisionLanguageModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    with pytest.raises(ValueError, match="not a salamandra-vision config"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_image_token_must_be_a_reserved_token(vlm, tokenizer):
    with pytest.raises(ValueError, match="is not a free control token"):
        VisionLanguageModel(vlm.encoder, vlm.projector, vlm.decoder, tokenizer, tokenizer.im_end_id)
    with pytest.raises(ValueError, match="<0xC4>.* is not a free control token"):
        VisionLanguageModel(vlm.encoder, vlm.projector, vlm.decoder, tokenizer, tokenizer.token_to_id("<0xC4>"))
    small = Decoder(LMConfig.from_name("tiny", vocab_size=200))
    with pytest.raises(ValueError, match="tokenizer has 420 tokens but the decoder's vocabulary is 200"):
        VisionLanguageModel(vlm.encoder, vlm.projector, small, tokenizer, 6)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        VisionLanguageModel(vlm.encoder, vlm.projector, vlm.decoder, tokenizer, 10**6)


def test_placeholders_written_in_a_chat_message_feed_the_model(vlm):
    # The README's recipe: placeholder tokens written as text become exactly num_image_tokens ids.
    placeholders = vlm.tokenizer.id_to_token(vlm.image_token_id) * vlm.num_image_tokens
    ids = vlm.tokenizer.encode_chat([{"role": "user", "content": placeholders + "\nDescribe the image."}])
    assert ids.count(vlm.image_token_id) == vlm.num_image_tokens
    with torch.no_grad():
        _, logits = vlm(Batch(torch.tensor([ids]), pixels=torch.randn(1, 3, 32, 32)))
    assert logits.shape == (1, len(ids), vlm.decoder.config.vocab_size)
