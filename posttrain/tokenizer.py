"""The tiny recipe's tokenizer: one token per character, Gemma's special tokens at Gemma's ids.

Character level lets models of a few hundred thousand parameters learn digit and letter tasks (every digit and
letter is its own token, so "37 + 48" and "planet" are spelled out). Ids: `<pad>`=0, `<eos>`=1, `<bos>`=2,
`<unk>`=3, `<start_of_turn>`=4, `<end_of_turn>`=5, then newline, printable ASCII and Latin-1 letters. Characters
outside the alphabet become `<unk>`. The official Gemma chat template is attached, so `apply_chat_template`
works on it as on a real Gemma tokenizer. Built offline with `tokenizers`; saved with `save_pretrained`.
"""

from __future__ import annotations

from importlib import resources

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127)) + "".join(chr(c) for c in range(0xA1, 0x100))


def gemma_chat_template() -> str:
    """The official Gemma/Gemma 2 chat template (identical to TRL's `chat_templates/gemma.jinja`)."""
    return resources.files("posttrain").joinpath("templates/gemma.jinja").read_text()


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        model_max_length=4096,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = gemma_chat_template()
    return tok
