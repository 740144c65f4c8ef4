"""The offline demo: the whole recipe in miniature on a laptop CPU, with no download.

Read in this order:
- synthetic/    the data set: scenes of shapes, their images, their captions in three languages,
                language identification, splits and WebDataset shards;
- config.py     DemoConfig (sizes and steps), the tiny vision tower and the projector;
- chats.py      text-only chats for pre-training the decoder; the tokenizer's corpus;
- vision.py     contrastive pre-training of the vision tower with open_clip;
- evaluation.py captioning held-out images and scoring them;
- runner.py     run_demo: data, tokenizer, tower, then the training stages and the evaluation.
"""

from multimodal.demo.config import DEMO_ENCODER, DEMO_PROJECTOR, QUICK, DemoConfig
from multimodal.demo.runner import run_demo

__all__ = ["DEMO_ENCODER", "DEMO_PROJECTOR", "QUICK", "DemoConfig", "run_demo"]
