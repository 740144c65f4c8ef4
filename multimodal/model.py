"""VisionLanguageModel: encode images, project them, splice them into the text, decode.

Each image placeholder token in `input_ids` stands for one image token: a prompt holds, for every
image, `num_image_tokens` consecutive placeholders, and the projected image tokens replace their
embeddings in order. The placeholder is one of Salamandra's reserved control tokens, so the
vocabulary (and the decoder's embedding matrix) keeps its size.

Saved format (`save_pretrained`): a directory with
- `config.json`: {"format": "salamandra-vision", "format_version": 1, "encoder": {...},
  "projector": {...}, "decoder": {...LMConfig fields...}, "image_token_id": int};
  each component section rebuilds its architecture (`OpenCLIPEncoder(**encoder)`,
  `projector.build(**projector)`, `LMConfig(**decoder)`);
- `model.safetensors`: every weight, named `encoder.*` (open_clip's own names), `projector.*`,
  `decoder.*` (Hugging Face Llama names);
- the tokenizer files (`tokenizer.json`, `tokenizer_config.json`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

import projector as projectors
from encoders import OpenCLIPEncoder
from encoders.transforms import ImageTransform, encoder_transform
from lm import Decoder, LMConfig
from lm.attention import SeqLayout
from lm.loss import chunked_cross_entropy, count_labelled, next_token_targets
from lm.tokenizer import Tokenizer, load_tokenizer
from multimodal import generation
from multimodal.batch import Batch
from multimodal import lora as lora_weights
from multimodal.conversation import (IMAGE_MARKER, VIDEO_MARKER, count_images, messages_from_json,
                                     tokenize_conversation, with_image_markers)
from multimodal.layouts import FIXED, ImageLayout
from multimodal.layouts.anyres import AnyresImages
from multimodal.layouts.geometry import Size
from multimodal.layouts.inputs import ImageInputs
from multimodal.layouts.packing import pack_image, pack_video
from multimodal.prompts import caption_prompt
from multimodal.video import read_video

FORMAT = "salamandra-vision"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"


def _placeholder_run_starts(is_image: torch.Tensor, layout: SeqLayout | None) -> torch.Tensor:
    """[B, T] True at the first placeholder of each run; a sample boundary also ends a run."""
    batch, tokens = is_image.shape
    boundary = torch.zeros_like(is_image)
    boundary[:, 0] = True
    if layout is not None and layout.is_packed:
        segments = layout.segment_ids(batch, tokens, is_image.device)
        boundary[:, 1:] |= segments[:, 1:] != segments[:, :-1]
    previous = torch.zeros_like(is_image)
    previous[:, 1:] = is_image[:, :-1]
    return is_image & (~previous | boundary)


def _placeholders_match(is_image: torch.Tensor, run_starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """A bool tensor, computed without leaving the device: as many runs as images, and run i exactly
    counts[i] placeholders long (counts: [images], the images' token counts in placeholder order)."""
    is_image, run_starts = is_image.flatten(), run_starts.flatten()
    images = counts.numel()
    run_of_token = torch.cumsum(run_starts, 0) - 1
    # Tokens of runs past the last image are counted into the last slot; the run count catches them.
    slot = run_of_token.clamp(0, max(images - 1, 0))
    lengths = torch.zeros(max(images, 1), dtype=counts.dtype, device=counts.device)
    lengths = lengths.scatter_add(0, slot, is_image.to(counts.dtype))[:images]
    return (run_starts.sum() == images) & (lengths == counts).all()


def _check_placeholder_token(name: str, token_id: int, tokenizer: Tokenizer, vocab_size: int) -> None:
    if not 0 <= token_id < vocab_size:
        raise ValueError(f"{name} {token_id} is outside the vocabulary (0..{vocab_size - 1})")
    text_specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.unk_id,
                     tokenizer.im_start_id, tokenizer.im_end_id}
    added = tokenizer.backend.get_added_tokens_decoder()
    if token_id in text_specials or not (token_id in added and added[token_id].special):
        # An ordinary piece (a word, a byte) also occurs in text, where it would be taken for an image.
        raise ValueError(f"{name} {token_id} ({tokenizer.id_to_token(token_id)}) is not a free control token; "
                         "use a reserved one, e.g. tokenizer.reserved_token_id(1)")


def _describe_counts(counts: Sequence[int]) -> str:
    return str(counts[0]) if len(set(counts)) == 1 else str(list(counts[:8]))


class VisionLanguageModel(nn.Module):
    def __init__(
        self, encoder: OpenCLIPEncoder, projector: nn.Module, decoder: Decoder, tokenizer: Tokenizer,
        image_token_id: int, loss_chunk_size: int | None = None, layout: ImageLayout = FIXED,
        video_token_id: int | None = None,
    ):
        super().__init__()
        if projector.in_dim != encoder.hidden_size:
            raise ValueError(f"projector input width {projector.in_dim} != encoder width {encoder.hidden_size}")
        if projector.out_dim != decoder.config.d_model:
            raise ValueError(f"projector output width {projector.out_dim} != decoder width {decoder.config.d_model}")
        if tokenizer.vocab_size > decoder.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens but the decoder's vocabulary is "
                             f"{decoder.config.vocab_size}")
        _check_placeholder_token("image_token_id", image_token_id, tokenizer, decoder.config.vocab_size)
        if video_token_id is not None:
            _check_placeholder_token("video_token_id", video_token_id, tokenizer, decoder.config.vocab_size)
            if video_token_id == image_token_id:
                raise ValueError(f"video_token_id and image_token_id are the same token ({image_token_id})")
            if not layout.is_anyres:
                raise ValueError("videos need the anyres layout (OneVision's pooled frames); this model's is fixed")
        self.encoder = encoder
        self.projector = projector
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.video_token_id = video_token_id
        self.loss_chunk_size = loss_chunk_size
        self.layout = layout
        # Sharded training (multimodal.parallel) sets this: every micro-batch then runs the encoder
        # exactly once, a text-only one on a blank image whose features are multiplied by 0, so that
        # every rank joins the encoder's weight gathers (a rank that skipped them would hang the rest).
        self.always_encode = False
        self.lora = None  # LoraSettings when LoRA adapters are in (multimodal.lora)
        if layout.is_anyres:
            self._check_anyres()
            # LLaVA-OneVision's learned end-of-row embedding (its initialisation: N(0, 1/d)).
            width = decoder.config.d_model
            self.image_newline = nn.Parameter(torch.randn(width) / width**0.5)

    def _check_anyres(self) -> None:
        tokens = self.encoder.num_tokens
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"the anyres layout needs a square grid of tokens per view; the encoder gives {tokens}")
        if self.projector.num_output_tokens(tokens) != tokens:
            raise ValueError("the anyres layout needs a projector that keeps every token (mlp or linear), not "
                             f"{self.projector.config().get('kind')!r}")
        self.anyres  # checks the pinpoints against the encoder's image size

    @property
    def anyres(self) -> AnyresImages | None:
        """Every image's and video's token count and views in the anyres layout, the data path's
        too (None in the fixed layout). Derived from the layout and the encoder each time."""
        if not self.layout.is_anyres:
            return None
        return AnyresImages(self.layout, self.encoder.image_size, self.view_side, self.encoder.mean, self.encoder.std)

    @property
    def num_image_tokens(self) -> int:
        """Decoder tokens per image in the fixed layout: the number of placeholders each image needs
        in a prompt. (In the anyres layout the count depends on the image: image_token_counts.)"""
        if self.layout.is_anyres:
            raise ValueError("in the anyres layout an image's token count depends on its size and on the images "
                             "beside it: use image_token_counts(sizes)")
        return self.projector.num_output_tokens(self.encoder.num_tokens)

    @property
    def view_side(self) -> int:
        """Tokens along a side of one view's grid (27 for SigLIP-So400m/14 at 384 px)."""
        return int(round(self.encoder.num_tokens**0.5))

    def image_token_counts(self, sizes: Sequence[Size]) -> list[int]:
        """Placeholders each image of one prompt (or sample) needs, given the images' (height, width)."""
        if self.anyres is None:
            return [self.num_image_tokens] * len(sizes)
        return self.anyres.token_counts(sizes)

    def _input_token_counts(self, images: torch.Tensor | ImageInputs) -> list[int]:
        """The token count of each image of a batch's image input (in placeholder order)."""
        if isinstance(images, ImageInputs):
            return [self.anyres.min_tokens if views == 1 else self.image_token_counts([size])[0]
                    for size, views in zip(images.sizes, images.views)]
        return [self.num_image_tokens] * images.shape[0]

    def image_placeholder(self) -> list[int]:
        return [self.image_token_id] * self.num_image_tokens

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, num_image_tokens, d_model]."""
        if any(p.requires_grad for p in self.encoder.parameters()):
            features = self.encoder(pixels)
        else:
            with torch.no_grad():  # a frozen encoder keeps no activations for backward
                features = self.encoder(pixels)
        return self.projector(features)

    def visual_embeddings(self, pixels: torch.Tensor | ImageInputs | None) -> tuple[torch.Tensor | None,
                                                                                    torch.Tensor | None]:
        """(image tokens, video tokens), each [tokens, d_model] in placeholder order, or None where
        there are none. `pixels` is a [N, 3, H, W] tensor in the fixed layout, ImageInputs in the
        anyres layout; its views and video frames go through the encoder in one pass (sharded
        training needs every micro-batch to call the encoder the same number of times)."""
        if pixels is None:
            return None, None
        if not isinstance(pixels, ImageInputs):
            return self.encode_images(pixels).flatten(0, 1), None
        parts = ([pixels.pixels] if pixels.views else []) + ([pixels.frames] if pixels.frames_per_video else [])
        if not parts:
            return None, None
        features = self.encode_images(parts[0] if len(parts) == 1 else torch.cat(parts))
        views, frames = features.split([sum(pixels.views), sum(pixels.frames_per_video)])
        side, tile = self.view_side, self.encoder.image_size
        images = videos = None
        if pixels.views:
            images = torch.cat([pack_image(image, size, self.layout, side, tile, self.image_newline)
                                for image, size in zip(views.split(pixels.views), pixels.sizes)])
        if pixels.frames_per_video:
            videos = torch.cat([pack_video(video, side, self.image_newline)
                                for video in frames.split(pixels.frames_per_video)])
        return images, videos

    def blank_image_term(self) -> torch.Tensor:
        """0 x the features of one blank image: keeps the encoder and projector in a micro-batch
        without images (always_encode), with gradients of exactly 0."""
        size, device = self.encoder.image_size, next(self.encoder.parameters()).device
        return self.encode_images(torch.zeros(1, 3, size, size, device=device)).sum() * 0

    def fsdp_units(self) -> list[nn.Module]:
        """The modules that sharded training (multimodal.parallel) shards one by one, bottom-up:
        each encoder block, the encoder (its stem: patch and position embeddings), the token
        embedding (unless tied to the output head) and each decoder block. The rest stays with the
        model itself, the root: the projector, the newline, the final norm and the output head,
        whose weight the loss reads without calling it (a unit's weights are gathered only when the
        unit is called)."""
        units: list[nn.Module] = [*self.encoder.blocks, self.encoder]
        if not self.decoder.config.tie_embeddings:
            units.append(self.decoder.model.embed_tokens)
        return units + list(self.decoder.model.layers)

    def video_token_counts(self, frames_per_video: Sequence[int]) -> list[int]:
        """Placeholders each video needs: its frames' pooled grids and one newline."""
        return [self.anyres.video_tokens(frames) for frames in frames_per_video]

    def embed(self, input_ids: torch.Tensor, pixels: torch.Tensor | ImageInputs | None,
              layout: SeqLayout | None = None) -> torch.Tensor:
        """Token embeddings with the image (and video) tokens spliced in at the placeholder positions."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {tuple(input_ids.shape)}")
        if isinstance(pixels, torch.Tensor) and pixels.ndim != 4:
            raise ValueError(f"pixels must be [images, 3, height, width], got shape {tuple(pixels.shape)}")
        if pixels is not None and self.layout.is_anyres == isinstance(pixels, torch.Tensor):
            raise ValueError(f"this model's layout is {self.layout.kind}: give its images as "
                             + ("ImageInputs (model.preprocess)" if self.layout.is_anyres else "a [N, 3, H, W] tensor"))
        is_image = input_ids == self.image_token_id
        counts = [] if pixels is None else self._input_token_counts(pixels)
        self._check_placeholders(is_image, counts, layout)
        videos = pixels.frames_per_video if isinstance(pixels, ImageInputs) else []
        is_video = None
        if self.video_token_id is not None:
            is_video = input_ids == self.video_token_id
            self._check_placeholders(is_video, self.video_token_counts(videos), layout, what="video")
        elif videos:
            raise ValueError("videos were given but this model has no video token (video_token_id)")
        embeds = self.decoder.embed(input_ids)
        images, video = self.visual_embeddings(pixels if counts or videos else None)
        if images is not None:
            # Row-major order of the placeholders is the order of the images.
            embeds = embeds.masked_scatter(is_image[..., None], images.to(embeds.dtype))
        if video is not None:
            embeds = embeds.masked_scatter(is_video[..., None], video.to(embeds.dtype))
        if images is None and video is None and self.always_encode:
            embeds = embeds + self.blank_image_term().to(embeds.dtype)
        return embeds

    def _check_placeholders(self, is_image: torch.Tensor, counts: list[int], layout: SeqLayout | None,
                            what: str = "image") -> None:
        """Every image is one unbroken run of exactly its token count (`counts`, in placeholder
        order) of placeholders inside one sample, and there are as many runs as images: anything
        else would put image tokens where they do not belong.

        On CPU the check reads the runs back and says what is wrong. On an accelerator, reading
        anything back would make the host wait for the GPU in every training step; there the same
        condition is computed on the device and queued as an assertion (`_placeholders_match`),
        which stops the run at the next synchronisation if it fails."""
        run_starts = _placeholder_run_starts(is_image, layout)
        if is_image.device.type != "cpu":
            expected = torch.tensor(counts, dtype=torch.long).to(is_image.device, non_blocking=True)
            torch._assert_async(
                _placeholders_match(is_image, run_starts, expected),
                f"{what} placeholders do not match the {what}s: expected {len(counts)} unbroken runs of "
                f"{_describe_counts(counts)} placeholders within samples (run the batch on CPU for details)",
            )
            return
        run_of_token = torch.cumsum(run_starts.flatten(), 0) - 1
        lengths = torch.bincount(run_of_token[is_image.flatten()]).tolist() if bool(is_image.any()) else []
        placeholders, expected = sum(lengths), sum(counts)
        if placeholders != expected:
            if not counts:
                raise ValueError(f"the batch holds {placeholders} {what} placeholder tokens but 0 {what}s were given")
            if len(set(counts)) == 1:
                per_image = counts[0]
                raise ValueError(
                    f"the batch holds {placeholders} {what} placeholder tokens ({placeholders / per_image:g} {what}s' "
                    f"worth at {per_image} tokens per {what}) but {len(counts)} {what}s were given")
            raise ValueError(f"the batch holds {placeholders} {what} placeholder tokens but its {len(counts)} {what}s "
                             f"need {expected} ({_describe_counts(counts)} tokens per {what})")
        if lengths != counts:
            raise ValueError(f"{what} placeholders must come in unbroken runs of {_describe_counts(counts)} (each "
                             f"{what}'s token count) within one sample; found runs of {lengths[:8]}")

    def forward(self, batch: Batch, return_logits: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(loss, logits). The loss (mean over labelled next-token targets) is computed without full
        logits; logits [B, T, vocab] are returned when there are no labels or when asked for."""
        if batch.labels is not None and batch.labels.shape != batch.input_ids.shape:
            raise ValueError(f"labels {tuple(batch.labels.shape)} do not match input_ids {tuple(batch.input_ids.shape)}")
        targets = labelled = None
        if batch.labels is not None:
            # Counted before the model's kernels are queued, read after: no wait for the GPU.
            targets = next_token_targets(batch.labels, batch.layout)
            labelled = count_labelled(targets)
        embeds = self.embed(batch.input_ids, batch.pixels, batch.layout)
        hidden = self.decoder.hidden_states(inputs_embeds=embeds, layout=batch.layout)
        loss = None
        if targets is not None:
            loss = chunked_cross_entropy(hidden, self.decoder.lm_head.weight, targets, self.loss_chunk_size,
                                         num_labelled=labelled())
        logits = self.decoder.lm_head(hidden) if return_logits or batch.labels is None else None
        return loss, logits

    # --- inference ---------------------------------------------------------------------------

    @property
    def image_transform(self) -> ImageTransform:
        """The encoder's eval preprocessing (PIL image -> normalized tensor), built on first use."""
        transform = self.__dict__.get("_image_transform")
        if transform is None:
            transform = encoder_transform(self.encoder)
            self.__dict__["_image_transform"] = transform
        return transform

    def preprocess(self, images: Sequence[Image.Image],
                   videos: Sequence[Sequence[Image.Image]] = ()) -> torch.Tensor | ImageInputs | None:
        """The encoder's input for the images (and videos: each a list of frames) of one prompt
        (None for none), on the encoder's device and dtype: [N, 3, S, S] pixels in the fixed layout;
        in the anyres layout ImageInputs, tiles for an image alone, one padded view each for several,
        every video frame squashed to one view."""
        if len(images) == 0 and len(videos) == 0:
            return None
        weight = next(self.encoder.parameters())
        if not self.layout.is_anyres:
            if videos:
                raise ValueError("videos need the anyres layout and a video token; this model's layout is fixed")
            return torch.stack([self.image_transform(image) for image in images]).to(weight.device, weight.dtype)
        if videos and self.video_token_id is None:
            raise ValueError("videos were given but this model has no video token (video_token_id)")
        views = self.anyres.views(images)
        frames = [self.anyres.video_views(video) for video in videos]
        tile = self.encoder.image_size
        inputs = ImageInputs(torch.cat(views) if views else torch.zeros(0, 3, tile, tile),
                             [(image.height, image.width) for image in images], [len(v) for v in views],
                             torch.cat(frames) if frames else None, [len(f) for f in frames])
        return inputs.to(weight.device, weight.dtype)

    def generate(
        self, prompts: Sequence[Sequence[int]], pixels: torch.Tensor | None = None,
        config: generation.GenerationConfig | None = None, **options: Any,
    ) -> list[generation.GeneratedIds]:
        """New token ids per prompt, each list with its `finish_reason` ("stop", "length", or
        "context": the end of the decoder's context); see `multimodal.generation.generate`. `options`
        override fields of `config` (max_new_tokens, temperature, top_p, seed, stop_ids, compile:
        the compiled decoding step)."""
        return generation.generate(self, prompts, pixels, generation.generation_config(config, **options))

    def caption(
        self, image: Image.Image | Sequence[Image.Image], language: str = "en", prompt: str | None = None,
        batch_size: int = 16, **generation_options: Any,
    ) -> str | list[str]:
        """A caption of `image` (a str), or of each image of a list (a list, decoded `batch_size`
        at a time). The question is `prompt`, by default the canonical caption prompt of `language`
        (any of Salamandra's 35 languages: multimodal.prompts), asked as in training: one user turn
        with the image before the question. Each caption is a `GeneratedText`, a str with its
        `finish_reason`."""
        single = isinstance(image, Image.Image)
        images = [image] if single else list(image)
        question = caption_prompt(language) if prompt is None else prompt
        captions = self.answer(images, [question] * len(images), batch_size, **generation_options)
        return captions[0] if single else captions

    def answer(self, images: Sequence[Image.Image], questions: Sequence[str], batch_size: int = 16,
               **generation_options: Any) -> list[generation.GeneratedText]:
        """One answer per (image, question) pair: a single user turn with the image before the
        question (a question may place the image marker itself), decoded `batch_size` pairs at a
        time; each a `GeneratedText`."""
        images = list(images)
        if len(images) != len(questions):
            raise ValueError(f"{len(images)} images but {len(questions)} questions")
        for index, item in enumerate(images):
            if not isinstance(item, Image.Image):
                raise TypeError(f"image {index} is a {type(item).__name__}, not a PIL.Image.Image")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        config = generation.generation_config(**generation_options)
        answers = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            # The same user turn as multimodal.conversation.caption_messages builds for training.
            # Each image is alone in its prompt: its own views, and its own token count (anyres).
            prompts = [self._prompt_ids([{"role": "user", "content": question if IMAGE_MARKER in question
                                          else f"{IMAGE_MARKER}\n{question}"}], [image])
                       for image, question in zip(chunk, questions[start:start + batch_size])]
            pixels = self.preprocess(chunk) if not self.layout.is_anyres else ImageInputs.cat(
                [self.preprocess([image]) for image in chunk])
            new_ids = generation.generate(self, prompts, pixels, config)
            answers += [generation.GeneratedText(self.tokenizer.decode(i), i.finish_reason) for i in new_ids]
        return answers

    def chat(
        self, messages: Sequence[Mapping[str, Any]], images: Image.Image | Sequence[Image.Image] | None = None,
        videos: Sequence[Sequence[Image.Image] | str | Path | bytes] | None = None, **generation_options: Any,
    ) -> generation.GeneratedText:
        """The assistant's answer to `messages` ({"role", "content"} dicts; `<image>` in a content
        marks where each of `images` goes, in order; without markers the images go at the start of
        the first user turn), a str with its `finish_reason` ("stop", "length" or "context").
        `videos` (each a list of PIL frames, or a video file's path or bytes, read with PyAV up to
        the layout's frames_upbound; models with a video token) go where `<video>` markers say, or
        after the images at the start of the first user turn.

        A chat too long for the decoder's context loses its oldest exchanges (see `_chat_inputs`);
        the answer's `dropped_messages` says how many messages, after the leading system messages."""
        config = generation.generation_config(**generation_options)
        ids, pixels, dropped = self._chat_inputs(messages, images, config.max_new_tokens, videos)
        new_ids = generation.generate(self, [ids], pixels, config)[0]
        return generation.GeneratedText(self.tokenizer.decode(new_ids), new_ids.finish_reason, dropped)

    def stream_chat(
        self, messages: Sequence[Mapping[str, Any]], images: Image.Image | Sequence[Image.Image] | None = None,
        videos: Sequence[Sequence[Image.Image] | str | Path | bytes] | None = None, **generation_options: Any,
    ) -> generation.TextStream:
        """`chat`, as text pieces while they are generated; joined they equal `chat`'s answer. The
        stream's `dropped_messages` is set from the start, its `finish_reason` once it is exhausted."""
        config = generation.generation_config(**generation_options)
        ids, pixels, dropped = self._chat_inputs(messages, images, config.max_new_tokens, videos)
        return generation.TextStream(self, ids, pixels, config, dropped)

    def _prompt_ids(self, messages: Sequence[Mapping[str, str]], images: Sequence[Image.Image] | None = None,
                    videos: Sequence[Sequence[Image.Image]] = ()) -> list[int]:
        """Prompt ids, each image (video) marker expanded to its image's (video's) count; in the fixed
        layout every image has the same count, and `images` may be left out."""
        counts = (self.num_image_tokens if images is None
                  else self.image_token_counts([(image.height, image.width) for image in images]))
        return tokenize_conversation(messages, self.tokenizer, self.image_token_id, counts, add_generation_prompt=True,
                                     video_token_id=self.video_token_id,
                                     video_token_counts=self.video_token_counts([len(v) for v in videos])).input_ids

    def _chat_inputs(
        self, messages: Sequence[Mapping[str, Any]], images: Image.Image | Sequence[Image.Image] | None,
        max_new_tokens: int, videos: Sequence[Sequence[Image.Image] | str | Path | bytes] | None = None,
    ) -> tuple[list[int], torch.Tensor | ImageInputs | None, int]:
        """Prompt ids and pixels of a chat, and how many messages were dropped to fit the context.

        When the prompt leaves the answer less room than max_new_tokens or a quarter of the
        decoder's context (whichever is less) within max_seq_len, the oldest exchanges (a user
        message and the messages after it up to the next one) go, one at a time, after the leading
        system messages and never the latest user message. Images placed without markers go with
        the first user message kept; an image marked in a dropped message goes with it. A prompt that
        still fills the whole context is refused, with what to shorten. (A chat with videos is not
        shortened: one too long is refused.)"""
        if isinstance(images, Image.Image):
            images = [images]
        images = list(images or [])
        videos = [read_video(video, self.layout.frames_upbound) if isinstance(video, (str, Path, bytes))
                  else list(video) for video in videos or []]
        if videos and self.video_token_id is None:
            raise ValueError("videos were given but this model has no video token (video_token_id)")
        # Also accepts LLaVA roles (human / gpt) and content given as a list of text / image parts.
        messages = list(messages)
        llava = bool(messages) and isinstance(messages[0], Mapping) and "from" in messages[0]
        messages = messages_from_json({"conversations" if llava else "messages": messages})
        if messages[-1]["role"] == "assistant":
            raise ValueError("the last message is the assistant's; chat answers a user (or system) message")
        if videos:  # before the images' markers, so that images come first, as in OneVision's template
            messages = with_image_markers(messages, len(videos), VIDEO_MARKER)
        ids = self._prompt_ids(with_image_markers(messages, len(images)), images, videos)  # checks the markers too
        limit = self.decoder.config.max_seq_len
        # A quarter at most: a max_new_tokens near the context's length would otherwise cost a
        # short context (the demo's is 256) every earlier turn.
        room = min(max_new_tokens, limit // 4)
        system = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
        latest = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=system)
        start, kept_images = system, images
        marked, system_images = count_images(messages), count_images(messages[:system])
        while len(ids) + room > limit and start < latest and not videos:
            start = next(i for i in range(start + 1, latest + 1) if messages[i]["role"] == "user")
            kept = messages[:system] + messages[start:]
            if marked:
                kept_images = images[:system_images] + images[count_images(messages[:start]):]
            ids = self._prompt_ids(with_image_markers(kept, len(kept_images)), kept_images)
        if len(ids) >= limit:
            counts = self.image_token_counts([(image.height, image.width) for image in kept_images])
            with_images = f" with {len(kept_images)} images of {_describe_counts(counts)} tokens" if kept_images else ""
            dropped = f", the {start - system} messages before it dropped" if start > system else ""
            raise ValueError(
                f"the chat's prompt (system messages and the latest user message{with_images}{dropped}) has "
                f"{len(ids)} tokens and fills the decoder's context of {limit} tokens (max_seq_len), leaving no "
                "room for an answer: shorten the latest message or the system messages, or send fewer images"
            )
        return ids, self.preprocess(kept_images, videos), start - system

    def config(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "encoder": self.encoder.config(),
            "projector": self.projector.config(),
            "decoder": self.decoder.config.to_dict(),
            "image_token_id": self.image_token_id,
            "layout": self.layout.to_dict(),
            "video_token_id": self.video_token_id,
        }

    def save_pretrained(self, directory: str | Path, state_dict: Mapping[str, torch.Tensor] | None = None) -> None:
        """Weights (safetensors), config and tokenizer into `directory`. `state_dict`: the weights
        to write instead of this module's own (a sharded model's, gathered). LoRA adapters go apart,
        into peft's files beside them (multimodal.lora), the weights under their plain names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = lora_weights.base_state_dict(self) if self.lora is not None else self.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
        if self.decoder.config.tie_embeddings:
            state.pop("decoder.lm_head.weight")  # safetensors refuses shared storage
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(self.config(), indent=2) + "\n")
        self.tokenizer.save(directory)
        stale = directory / lora_weights.ADAPTER_CONFIG
        if self.lora is not None:
            lora_weights.save_adapters(self, directory)
        elif stale.exists():  # an earlier save with adapters in the same directory: they are not this model's
            stale.unlink()
            (directory / lora_weights.ADAPTER_WEIGHTS).unlink(missing_ok=True)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> "VisionLanguageModel":
        directory = Path(directory)
        config_path = directory / "config.json"
        if not config_path.exists():
            raise FileNotFoundError(f"{directory} has no config.json: not a saved VisionLanguageModel")
        config = json.loads(config_path.read_text())
        if config.get("format") != FORMAT:
            raise ValueError(f"{config_path} is not a {FORMAT} config (format={config.get('format')!r}); "
                             "a Hugging Face LLaVA directory needs `salamandra-vl import` first")
        if config.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{config_path} has format_version {config.get('format_version')}; "
                             f"this version of salamandra-vision reads {FORMAT_VERSION}")
        # Built on the meta device and filled by assignment: no random initialization of a copy
        # that the checkpoint overwrites anyway.
        with torch.device("meta"):
            model = cls(
                OpenCLIPEncoder(**config["encoder"]),
                projectors.build(**config["projector"]),
                Decoder(LMConfig.from_dict(config["decoder"])),
                load_tokenizer(directory),
                config["image_token_id"],
                layout=ImageLayout.from_dict(config.get("layout")),  # absent before the anyres layout: fixed
                video_token_id=config.get("video_token_id"),
            )
        state = load_file(str(directory / WEIGHTS_FILE))
        if model.decoder.config.tie_embeddings:
            state["decoder.lm_head.weight"] = state["decoder.model.embed_tokens.weight"]
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match config.json: "
                             f"missing {missing[:8]}, unexpected {unexpected[:8]}")
        # Each tensor keeps the dtype it was saved in (say a bf16 decoder beside an fp32 encoder)
        # unless one dtype is asked for.
        state = {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
                 for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        if model.decoder.config.tie_embeddings:
            model.decoder.lm_head.weight = model.decoder.model.embed_tokens.weight
        leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if leftover:
            raise RuntimeError(f"tensors not restored from the checkpoint: {leftover[:8]}")
        if (directory / lora_weights.ADAPTER_CONFIG).exists():
            lora_weights.load_adapters(model, directory)
        return model.eval()
