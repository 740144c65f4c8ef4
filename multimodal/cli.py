"""salamandra-vl: the command line.

  salamandra-vl fit --config configs/demo-stage1.yaml     train (LightningCLI; every option of the
  salamandra-vl validate --config ...                     Trainer, model and data is a flag or YAML key)
  salamandra-vl demo                                      the offline demo, end to end
  salamandra-vl caption --checkpoint DIR IMAGE...         one caption per image
  salamandra-vl chat --checkpoint DIR [--image IMG]       interactive chat, streamed answers
  salamandra-vl info DIR                                  what a saved checkpoint holds
  salamandra-vl export --to hf-llava CHECKPOINT OUT       write a Hugging Face LLaVA directory
                       (--to hf-llava-onevision: LLaVA-OneVision, for models in the anyres layout)
  salamandra-vl import --from hf-llava DIR OUT            read one back into our format
                       (--from hf-llava-onevision)
  salamandra-vl consolidate CKPT_DIR OUT                  a sharded (fsdp2) checkpoint -> save_pretrained
  salamandra-vl merge CHECKPOINT OUT                      fold LoRA adapters into the weights
  salamandra-vl serve --checkpoint DIR [--port 8000]       an OpenAI-compatible chat server (images, streaming)
  salamandra-vl evaluate --checkpoint DIR --data SHARDS --out DIR [--task caption|vqa|choice]
                                                          metrics.json and predictions.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

LIGHTNING_COMMANDS = ("fit", "validate")


def describe_checkpoint(directory: str) -> dict:
    from multimodal.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(directory)
    return {
        "encoder": model.encoder.config()["model_name"],
        "image_size": model.encoder.image_size,
        "feature_layer": model.encoder.feature_layer,
        "projector": model.projector.config(),
        "decoder_layers": model.decoder.config.n_layers,
        "decoder_width": model.decoder.config.d_model,
        "vocab_size": model.decoder.config.vocab_size,
        "max_seq_len": model.decoder.config.max_seq_len,
        "image_token_id": model.image_token_id,
        "image_token": model.tokenizer.id_to_token(model.image_token_id),
        "layout": model.layout.kind,
        **({"tokens_per_image": model.num_image_tokens} if not model.layout.is_anyres else {
            "tokens_per_view": model.view_side ** 2, "max_tiles": model.layout.max_tiles,
            "grid_pinpoints": len(model.layout.grid_pinpoints),
            # Examples from LLaVA-OneVision's processor arithmetic (layouts/geometry.py).
            "tokens_per_image_480x640": model.image_token_counts([(480, 640)])[0],
            "tokens_per_image_among_several": model.image_token_counts([(480, 640)] * 2)[0],
            "video_token_id": model.video_token_id,
            "tokens_per_video_frame": model.video_token_counts([1])[0] - 1,
        }),
        "parameters": {
            name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ("encoder", "projector", "decoder")
        },
    }


def run_lightning(argv: Sequence[str] | None) -> int:
    """fit / validate through LightningCLI (training_cli.TrainingCLI); argv None: the command line
    (sys.argv), which LightningCLI then reads itself (given both, it warns that they might disagree)."""
    from multimodal.data.resume import ResumeMismatch
    from multimodal.training import ShardDataModule, VLMModule
    from multimodal.training_cli import TrainingCLI

    try:
        TrainingCLI(
            VLMModule, ShardDataModule, args=None if argv is None else list(argv),
            save_config_kwargs={"overwrite": True},
            # Checkpoints are written atomically unless the config names other plugins.
            trainer_defaults={"plugins": [{"class_path": "multimodal.checkpoint_io.AtomicCheckpointIO"}]},
            parser_kwargs={"description": "Train or validate a salamandra-vision model (PyTorch Lightning)."},
        )
    except ResumeMismatch as error:
        print(f"salamandra-vl: {error}", file=sys.stderr)
        return 2
    return 0


def load_images(paths: Sequence[str]):
    from PIL import Image

    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read image {path}: {error}") from None
    return images


def caption_command(args: argparse.Namespace) -> int:
    from multimodal.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    images = load_images(args.images)
    captions = model.caption(images, language=args.language, prompt=args.prompt, max_new_tokens=args.max_new_tokens)
    for path, caption in zip(args.images, captions):
        print(f"{path}\t{caption}" if len(images) > 1 else caption)
        note = finish_note(caption.finish_reason, args.max_new_tokens, model.decoder.config.max_seq_len)
        if note:
            print(f"{path}: {note}" if len(images) > 1 else note, file=sys.stderr)
    return 0


def finish_note(reason: str | None, max_new_tokens: int, context: int) -> str | None:
    """The one-line note for an answer that did not end by itself (None for one that did)."""
    if reason == "length":
        return f"[cut off at --max-new-tokens ({max_new_tokens} tokens)]"
    if reason == "context":
        return f"[cut off: the prompt and the answer filled the model's context of {context} tokens (max_seq_len)]"
    return None


def chat_command(args: argparse.Namespace) -> int:
    from multimodal.conversation import IMAGE_MARKER
    from multimodal.model import VisionLanguageModel

    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    images = load_images(args.image)
    context = model.decoder.config.max_seq_len
    messages: list[dict[str, str]] = []
    print("Chat with the model; an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        try:
            answer = model.stream_chat(messages, images=images or None, max_new_tokens=args.max_new_tokens)
        except ValueError as error:  # a message too long for the context: say so, and go on without it
            print(f"salamandra-vl chat: {error}", file=sys.stderr)
            messages.pop()
            continue
        if answer.dropped_messages:
            # The chat has no system message: the dropped ones are the first, and stay dropped.
            del messages[:answer.dropped_messages]
            print(f"[the chat outgrew the model's context of {context} tokens: dropped its "
                  f"{answer.dropped_messages} oldest messages]", file=sys.stderr)
        pieces = []
        for piece in answer:
            print(piece, end="", flush=True)
            pieces.append(piece)
        print()
        note = finish_note(answer.finish_reason, args.max_new_tokens, context)
        if note:
            print(note, file=sys.stderr)
        # An answer that says "<image>" would read as an image marker in the next prompt, and take
        # the image (or mismatch it) there: the history keeps the rest of the answer.
        messages.append({"role": "assistant", "content": "".join(pieces).replace(IMAGE_MARKER, "")})
    return 0


def relaunch_with_passive_openmp(argv: list[str]) -> None:
    """Run this command again, in place, with OMP_WAIT_POLICY=PASSIVE unless the variable is set.

    With its default (active) policy, an OpenMP thread that finds no work spins: on a 2-core
    machine, torch's two threads then wait on each other whenever anything else runs on a core
    (the data loader's worker, other processes), and a stage 2 step took up to 9x as long under
    load (5.9 s against 0.75 s, measured side by side). The policy is read once, when torch loads
    OpenMP, hence a new process. `argv`: the salamandra-vl arguments that run this command."""
    if os.environ.get("OMP_WAIT_POLICY"):
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "multimodal.cli", *argv])


def demo_command(args: argparse.Namespace) -> int:
    out = args.out or ("runs/fidelity" if args.study == "fidelity" else "runs/demo")
    # Before the demo's modules are imported: the relaunched process imports them anyway.
    relaunch_with_passive_openmp(["demo", "--out", str(out), "--seed", str(args.seed),
                                  *(["--study", args.study] if args.study else [])])
    if args.study == "fidelity":
        from multimodal.demo.study import run_fidelity_study

        run_fidelity_study(out, seed=args.seed)
        return 0
    from multimodal.demo import run_demo

    run_demo(out, seed=args.seed)
    return 0


def info_command(args: argparse.Namespace) -> int:
    print(json.dumps(describe_checkpoint(args.checkpoint), indent=2))
    return 0


def export_command(args: argparse.Namespace) -> int:
    if args.target == "hf-llava-onevision":
        from multimodal.export_onevision import export_hf_llava_onevision as export
    else:
        from multimodal.export import export_hf_llava as export
    print(export(args.checkpoint, args.out))
    return 0


def import_command(args: argparse.Namespace) -> int:
    from multimodal.export import import_hf_llava

    model_type = "llava_onevision" if args.source == "hf-llava-onevision" else "llava"
    print(import_hf_llava(args.hf_dir, args.out, timm_model_name=args.timm_model, model_type=model_type))
    return 0


def merge_command(args: argparse.Namespace) -> int:
    from multimodal.export import check_out_dir
    from multimodal.lora import merge_lora
    from multimodal.model import VisionLanguageModel

    out = Path(args.out)
    check_out_dir(out)
    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    if model.lora is None:
        raise ValueError(f"{args.checkpoint} has no LoRA adapters to merge")
    merge_lora(model).save_pretrained(out)
    print(out)
    return 0


def consolidate_command(args: argparse.Namespace) -> int:
    from multimodal.consolidate import consolidate

    print(consolidate(args.checkpoint_dir, args.out))
    return 0


def evaluate_command(args: argparse.Namespace) -> int:
    from multimodal.evaluation.run import evaluate_checkpoint

    languages = [code.strip() for code in args.languages.split(",") if code.strip()] if args.languages else None
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.out, task=args.task, languages=languages,
                                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                  compile=args.compile, limit=args.limit)
    print(json.dumps({"items": metrics["items"], "skipped": metrics["skipped"], **metrics.get("overall", {})}))
    return 0


def serve_command(args: argparse.Namespace) -> int:
    # Spinning OpenMP threads would take the cores that the HTTP side and the clients need.
    flags = [f"--{name.replace('_', '-')}" for name in ("allow_local_images", "allow_remote_images")
             if getattr(args, name)]
    options = [("--checkpoint", args.checkpoint), ("--host", args.host), ("--port", args.port),
               ("--max-batch", args.max_batch), ("--max-image-bytes", args.max_image_bytes),
               ("--model-name", args.model_name), ("--api-key", args.api_key)]
    relaunch_with_passive_openmp(["serve", *flags, *[str(v) for option in options if option[1] is not None
                                                      for v in option]])
    try:
        import uvicorn
    except ImportError:
        raise ValueError("serving needs FastAPI and uvicorn: pip install 'salamandra-vision[serve]'") from None

    from multimodal.model import VisionLanguageModel
    from multimodal.serving.app import create_app
    from multimodal.serving.requests import ImagePolicy

    model = VisionLanguageModel.from_pretrained(args.checkpoint)
    model_id = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    policy = ImagePolicy(allow_local=args.allow_local_images, allow_remote=args.allow_remote_images,
                         max_bytes=args.max_image_bytes)
    app = create_app(model, model_id, max_batch=args.max_batch, api_key=args.api_key or os.environ.get(
        "SALAMANDRA_VL_API_KEY"), policy=policy)
    print(f"serving {model_id!r} on http://{args.host}:{args.port}/v1 (batches of up to {args.max_batch})",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salamandra-vl",
        description="Vision-language adapters for the Salamandra language models.",
        epilog="fit and validate are LightningCLI commands: salamandra-vl fit --help lists their options.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name in LIGHTNING_COMMANDS:
        commands.add_parser(name, help=f"{name} with PyTorch Lightning from YAML configs (see configs/)", add_help=False)

    demo = commands.add_parser(
        "demo", help="the offline demo: synthetic multilingual captions, three training stages, evaluation",
        description="Generate a synthetic captioning data set, pre-train a tiny Salamandra-architecture decoder, "
                    "train stage 1 (projector) and stage 2 (everything), then caption held-out images in English, "
                    "Spanish and Catalan. No download; a few minutes on a laptop CPU.",
    )
    demo.add_argument("--out", default=None, help="output directory (default: runs/demo, runs/fidelity for the study)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--study", choices=["fidelity"], default=None,
                      help="fidelity: stage 2 twice from the demo's stage 1, on English-only captions alone and with "
                           "multilingual text-only chats mixed in; language fidelity per language (study.json, "
                           "fidelity.png)")
    demo.set_defaults(run=demo_command)

    caption = commands.add_parser(
        "caption", help="caption images with a saved checkpoint (one caption per image)",
        description="Print one caption per image, in the asked language.",
    )
    caption.add_argument("--checkpoint", required=True, help="directory written by save_pretrained (or the demo)")
    caption.add_argument("--language", default="en", help="language of the caption: any of Salamandra's 35, as an ISO 639-1 code (default: en)")
    caption.add_argument("--prompt", default=None, help="instead of the language's default caption prompt")
    caption.add_argument("--max-new-tokens", type=int, default=64)
    caption.add_argument("images", nargs="+", help="image files")
    caption.set_defaults(run=caption_command)

    chat = commands.add_parser(
        "chat", help="chat with a checkpoint (interactive, streams the answer)",
        description="Interactive chat; each answer is streamed as it is generated.",
    )
    chat.add_argument("--checkpoint", required=True)
    chat.add_argument("--image", action="append", default=[], help="an image to talk about (repeatable)")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(run=chat_command)

    info = commands.add_parser(
        "info", help="describe a saved checkpoint (components, tokens per image, parameter counts)",
        description="Print, as JSON, what a checkpoint saved with VisionLanguageModel.save_pretrained holds.",
    )
    info.add_argument("checkpoint", help="directory written by save_pretrained")
    info.set_defaults(run=info_command)

    export = commands.add_parser(
        "export", help="convert a checkpoint to the Hugging Face LLaVA format",
        description="Write a directory that transformers.AutoProcessor and LlavaForConditionalGeneration load "
                    "with no extra code: LlavaConfig (CLIP or SigLIP vision config matching the open_clip tower), "
                    "safetensors weights in the llava-hf layout, the image processor, the tokenizer with its chat "
                    "template, and the processor settings that expand one image token into the model's number "
                    "of image tokens. What the LLaVA layout cannot hold (pixel-shuffle projector, MLP depth other "
                    "than 2, the projector's 'positions' embedding, 'longest' resize, towers with layer scale or "
                    "register tokens, ...) is refused before anything is written.",
        epilog="Hugging Face's default (torchvision) image processor may round a resized pixel a level or two "
               "away from ours; AutoProcessor.from_pretrained(OUT, backend='pil') matches ours bit for bit.",
    )
    export.add_argument("--to", required=True, choices=["hf-llava", "hf-llava-onevision"], dest="target",
                        help="target format: hf-llava (transformers' LlavaForConditionalGeneration; the fixed "
                             "layout) or hf-llava-onevision (LlavaOnevisionForConditionalGeneration; the anyres "
                             "layout)")
    export.add_argument("checkpoint", help="directory written by save_pretrained (or the demo)")
    export.add_argument("out", help="output directory (new or empty)")
    export.set_defaults(run=export_command)

    import_ = commands.add_parser(
        "import", help="convert a Hugging Face LLaVA directory into a salamandra-vision checkpoint",
        description="Read a transformers LLaVA directory (CLIP or SigLIP vision tower, Llama decoder, Salamandra "
                    "tokenizer) and write it in the save_pretrained format that caption, chat and "
                    "VisionLanguageModel.from_pretrained read.",
    )
    import_.add_argument("--from", required=True, choices=["hf-llava", "hf-llava-onevision"], dest="source",
                         help="source format: hf-llava (transformers' LlavaForConditionalGeneration) or "
                              "hf-llava-onevision (LlavaOnevisionForConditionalGeneration, e.g. salamandra-7b-vision)")
    import_.add_argument("--timm-model", default=None,
                         help="SigLIP towers only: the registered timm model with the tower's architecture "
                              "(default: the first timm '*siglip*' model that matches)")
    import_.add_argument("hf_dir", help="Hugging Face LLaVA model directory")
    import_.add_argument("out", help="output directory (new or empty)")
    import_.set_defaults(run=import_command)

    merge = commands.add_parser(
        "merge", help="fold a checkpoint's LoRA adapters into its weights",
        description="Write a save_pretrained directory whose weights include the LoRA adapters of CHECKPOINT "
                    "(the same function, no adapters left). export does this itself.",
    )
    merge.add_argument("checkpoint", help="a save_pretrained directory with adapter_config.json")
    merge.add_argument("out", help="output directory (new or empty)")
    merge.set_defaults(run=merge_command)

    consolidate = commands.add_parser(
        "consolidate", help="turn a sharded (fsdp2) checkpoint directory into a save_pretrained directory",
        description="Join the weights of a sharded checkpoint written by `fit --trainer.strategy fsdp2` (a directory "
                    "with meta.pt and one file per rank) into the save_pretrained format that caption, chat, info "
                    "and export read. One process, no process group, any number of ranks; the optimizer state is "
                    "left out.",
    )
    consolidate.add_argument("checkpoint_dir", help="a sharded checkpoint directory (…/checkpoints/step=N.ckpt)")
    consolidate.add_argument("out", help="output directory (new or empty)")
    consolidate.set_defaults(run=consolidate_command)

    serve = commands.add_parser(
        "serve", help="an OpenAI-compatible chat server (POST /v1/chat/completions, images, streaming)",
        description="Serve a checkpoint through OpenAI's chat-completions API (FastAPI + uvicorn): text and "
                    "image_url parts, streaming, concurrent requests decoded together in batches. The official "
                    "openai client and curl work unchanged.",
    )
    serve.add_argument("--checkpoint", required=True, help="directory written by save_pretrained")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this key (default: $SALAMANDRA_VL_API_KEY, or none)")
    serve.add_argument("--max-batch", type=int, default=8, help="requests decoded together (1: no batching)")
    serve.add_argument("--model-name", default=None, help="the model id clients name (default: the directory name)")
    serve.add_argument("--allow-local-images", action="store_true", help="accept file:// image URLs")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    serve.add_argument("--max-image-bytes", type=int, default=20 * 2**20)
    serve.set_defaults(run=serve_command)

    evaluate = commands.add_parser(
        "evaluate", help="score a checkpoint on evaluation shards (captions, VQA, multiple choice)",
        description="Generate an answer for every item of the shards (greedy, batched) and write predictions.jsonl "
                    "and metrics.json: CIDEr-D, BLEU-4 and chrF++ for captions, VQA accuracy, multiple-choice "
                    "accuracy, and language fidelity, overall and per language. The shard format is in "
                    "docs/evaluation.md.",
    )
    evaluate.add_argument("--checkpoint", required=True, help="directory written by save_pretrained")
    evaluate.add_argument("--data", required=True, nargs="+", help="shard paths or brace patterns")
    evaluate.add_argument("--out", required=True, help="output directory")
    evaluate.add_argument("--task", choices=["caption", "vqa", "choice"], default="caption")
    evaluate.add_argument("--languages", default=None,
                          help="comma-separated language codes to evaluate (default: every language in the data)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N items")
    evaluate.add_argument("--compile", action="store_true", help="compile the decoding step (worth it on a GPU)")
    evaluate.set_defaults(run=evaluate_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        return run_lightning(None if from_command_line else argv)
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"salamandra-vl {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
