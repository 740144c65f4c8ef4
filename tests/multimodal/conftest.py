import pytest

from lm.tokenizer import train_tokenizer
from tests.multimodal.tiny import TEXTS, build_tiny_vlm


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=420)


@pytest.fixture
def vlm(tokenizer):
    return build_tiny_vlm(tokenizer).eval()
