"""kohya's long captions: 75-token chunks encoded separately and joined (max_token_length 150/225)."""

import pytest
import torch
from test_train import make_style

from sdlora.config import ModelConfig, load_config
from sdlora.models import load, longprompt
from sdlora.training.loop import Trainer

WORDS = ["lake", "mountains", "sunset", "forest", "clouds", "river", "snow", "meadow", "flowers", "stars"]


def long_caption(n_tokens: int, tokenizer, offset: int = 0) -> str:
    """A caption of exactly n_tokens CLIP tokens (one token per word)."""
    words = [WORDS[(i + offset) % len(WORDS)] for i in range(n_tokens)]
    text = " ".join(words)
    assert longprompt.token_count(tokenizer, text) == n_tokens
    return text


@pytest.fixture
def mini_base(mini_base_dir):
    return load.load_base(ModelConfig(base=str(mini_base_dir)))


def encode(base, captions, length):
    ids = longprompt.tokenize_long(base.tokenizers, captions, length)
    with torch.no_grad():
        return longprompt.encode_long(base.family, base.text_encoders, ids).hidden


def test_a_150_token_caption_changes_the_conditioning_past_token_77(mini_base):
    tok = mini_base.tokenizers[0]
    head = long_caption(100, tok)
    a = head + " " + long_caption(40, tok, offset=0)
    b = head + " " + long_caption(40, tok, offset=3)  # differs only after token 100
    short_a, short_b = encode(mini_base, [a], 75), encode(mini_base, [b], 75)
    assert short_a.shape[1] == 77 and torch.equal(short_a, short_b)  # cut at 75: the end is lost
    long_a, long_b = encode(mini_base, [a], 150), encode(mini_base, [b], 150)
    assert long_a.shape[1] == 152  # BOS + 2 x 75 + EOS, as kohya
    assert torch.equal(long_a[:, :77], long_b[:, :77])  # the first chunk is the same text
    assert not torch.allclose(long_a[:, 77:], long_b[:, 77:])


def test_chunks_are_encoded_separately_and_joined_as_kohya_does(mini_base):
    tok = mini_base.tokenizers[0]
    caption = long_caption(90, tok)
    ids = longprompt.tokenize_long(mini_base.tokenizers, [caption], 150)[0]  # (1, 2, 77)
    assert ids.shape == (1, 2, 77)
    assert ids[0, 0, 0] == ids[0, 1, 0] == tok.bos_token_id and ids[0, 0, 76] == tok.eos_token_id
    assert ids[0, 1, 16] == tok.eos_token_id  # the second chunk: BOS, 15 tokens, EOS, padding
    with torch.no_grad():
        per_chunk = mini_base.text_encoders[0](ids[0])[0]  # (2, 77, d): each chunk on its own
    joined = encode(mini_base, [caption], 150)[0]
    torch.testing.assert_close(joined, torch.cat([per_chunk[0, :1], per_chunk[0, 1:76], per_chunk[1, 1:76],
                                                  per_chunk[1, 76:]]))
    assert longprompt.count_cut(tok, [caption, "lake"], 75) == 1 and longprompt.count_cut(tok, [caption], 150) == 0


def test_training_with_long_captions_warns_about_cut_ones(tmp_path, mini_base_dir):
    path = make_style(tmp_path, mini_base_dir, n=2)
    tok = load.load_base(ModelConfig(base=str(mini_base_dir))).tokenizers[0]
    (tmp_path / "images" / "img0.txt").write_text("clrscn, " + long_caption(160, tok))
    messages = []
    Trainer(load_config(path), log=messages.append)
    assert any("1 caption(s) are longer than dataset.max_token_length = 75" in m and "150" in m for m in messages)
    cfg = load_config(path, ["dataset.max_token_length=225", "train.epochs=1", "train.overwrite=true"])
    messages.clear()
    trainer = Trainer(cfg, log=messages.append)
    assert not any("longer than" in m for m in messages)
    result = trainer.run()
    assert result.steps == 2
