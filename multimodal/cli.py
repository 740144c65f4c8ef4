"""salamandra-vl: the command line.

Now: `info` (describe a saved checkpoint). Training (`fit`, `validate`), `demo`, `caption`, `chat`
and `export` arrive with the data-and-training and Hugging Face interop work.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence


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
        "image_token_id": model.image_token_id,
        "image_token": model.tokenizer.id_to_token(model.image_token_id),
        "tokens_per_image": model.num_image_tokens,
        "parameters": {
            name: sum(p.numel() for p in getattr(model, name).parameters())
            for name in ("encoder", "projector", "decoder")
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="salamandra-vl",
        description="Vision-language adapters for the Salamandra language models.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser(
        "info", help="describe a saved checkpoint (components, tokens per image, parameter counts)",
        description="Print, as JSON, what a checkpoint saved with VisionLanguageModel.save_pretrained holds.",
    )
    info.add_argument("checkpoint", help="directory written by save_pretrained")
    args = parser.parse_args(argv)
    if args.command == "info":
        try:
            print(json.dumps(describe_checkpoint(args.checkpoint), indent=2))
        except (FileNotFoundError, ValueError) as error:
            print(f"salamandra-vl info: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
