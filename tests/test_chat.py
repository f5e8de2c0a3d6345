"""The Gemma renderer against the official template, byte for byte, and its loss mask by position."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from posttrain.chat import (
    ChatFormatError,
    chat_template,
    final_response,
    normalize,
    prompt_messages,
    render,
    trained_text,
)
from posttrain.tokenizer import ALPHABET, SPECIAL_TOKENS, gemma_chat_template

ROOT = Path(__file__).resolve().parents[1]


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


GOLDEN = [
    [u("Hi"), a("Hello!")],
    [u("What is 37 + 48?"), a("85")],
    [u("Reverse the word: planet"), a("tenalp")],
    [u("Sort these letters: d b a c"), a("a b c d")],
    [u("How many times does the letter a appear in banana?"), a("3")],
    [u("Who are you?"), a("I am Pip.")],
    [u("What is 3 + 4?"), a("7"), u("Now add 5 to that."), a("12")],
    [u("a"), a("b"), u("c"), a("d"), u("e"), a("f")],
    [u("  leading and trailing spaces  "), a("  answer with spaces  ")],
    [u("\n\nnewlines around\n\n"), a("\nok\n")],
    [u("\tTabs\tinside\t"), a("yes\tno")],
    [u("Line one\nLine two\n\nLine four"), a("First\nSecond")],
    [u("Ünïcödé ça va? ½ £"), a("Très bien — merci ☃ 日本")],
    [u("emoji 🙂 test"), a("🙂🙂")],
    [u("x" * 600), a("y" * 400)],
    [u(" ".join(f"word{i}" for i in range(200))), a("long answer " * 50)],
    [u("Only a prompt")],
    [u("q1"), a("a1"), u("q2")],
    [u("Braces {{ not a template }} {% raw %}"), a("Quotes ' \" and backslash \\")],
    [u('JSON {"k": [1, 2]}'), a("<html>tags</html> & <b>bold</b>")],
    [u("numbers 0123456789"), a("9876543210")],
    [u("trailing newline\n"), a("answer\n\n\n")],
]
WITH_ATTEMPTS = [  # a model turn's untrained attempt (posttrain's own key; the official template does not know it)
    [u("What is 37 + 48?"), {"role": "assistant", "attempt": " 37+48, so 8", "content": "no: 37+48: so 85 "}],
    [u("q1"), {"role": "model", "attempt": "x", "content": "y"}, u("q2"), a("z")],
]


@pytest.mark.parametrize("i", range(len(GOLDEN)))
@pytest.mark.parametrize("gen", [False, True])
def test_text_matches_official_template(i, gen, tiny_tokenizer, trl_gemma_template):
    msgs = GOLDEN[i]
    if gen and msgs[-1]["role"] != "user":
        msgs = msgs[:-1]
    ours = render(msgs, tiny_tokenizer, add_generation_prompt=gen)
    ref = tiny_tokenizer.apply_chat_template(
        msgs, chat_template=trl_gemma_template, tokenize=False, add_generation_prompt=gen
    )
    assert ours.text == ref
    ref_ids = tiny_tokenizer.apply_chat_template(
        msgs, chat_template=trl_gemma_template, add_generation_prompt=gen
    )
    assert ours.input_ids == list(ref_ids["input_ids"])


def test_shipped_template_is_trls(trl_gemma_template):
    assert gemma_chat_template() == trl_gemma_template


def _expected_trained(msgs, only_last=False):
    model_turns = [m["content"].strip() for m in msgs if m["role"] == "assistant"]
    if only_last:
        model_turns = model_turns[-1:]
    return ["".join(c if c in ALPHABET else "<unk>" for c in t) + "<end_of_turn>" for t in model_turns]


@pytest.mark.parametrize("i", range(len(GOLDEN)))
def test_mask_decodes_to_model_turns_and_end_of_turn(i, tiny_tokenizer):
    msgs = GOLDEN[i]
    r = render(msgs, tiny_tokenizer)
    assert len(r.input_ids) == len(r.loss_mask)
    assert trained_text(r, tiny_tokenizer) == _expected_trained(msgs)
    assert r.input_ids[0] == tiny_tokenizer.bos_token_id
    assert r.input_ids.count(tiny_tokenizer.bos_token_id) == 1
    assert r.loss_mask[0] == 0


def test_mask_positions_by_hand(tiny_tokenizer):
    # positions: <bos>0 <sot>1 u2 s3 e4 r5 \n6 H7 i8 <eot>9 \n10 <sot>11 m12 o13 d14 e15 l16 \n17 4:18 2:19 <eot>20 \n21
    r = render([u("Hi"), a("42")], tiny_tokenizer)
    assert r.loss_mask == [0] * 18 + [1, 1, 1, 0]
    end = tiny_tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert r.input_ids[20] == end and r.input_ids[9] == end
    assert r.loss_mask[9] == 0  # a user turn's <end_of_turn> is not trained; the model's is (position 20)


def test_train_on_last_turn_only(tiny_tokenizer):
    msgs = [u("What is 3 + 4?"), a("7"), u("Now add 5 to that."), a("12")]
    r = render(msgs, tiny_tokenizer, train_on="last")
    assert trained_text(r, tiny_tokenizer) == ["12<end_of_turn>"]


def test_prompt_only_has_no_trained_token(tiny_tokenizer):
    r = render([u("hello")], tiny_tokenizer, add_generation_prompt=True)
    assert r.n_trained == 0 and r.text.endswith("<start_of_turn>model\n")


def test_system_fold_matches_gemma3_template(tiny_tokenizer):
    import trl

    gemma3 = (Path(trl.__file__).parent / "chat_templates" / "gemma3.jinja").read_text()
    for system in ["Be brief.", "  spaced system  ", "multi\nline"]:
        msgs = [{"role": "system", "content": system}, u(" Reverse the word: cat "), a("tac")]
        r = render(msgs, tiny_tokenizer, system="fold")
        ref = tiny_tokenizer.apply_chat_template(msgs, chat_template=gemma3, tokenize=False)
        assert r.text == ref
        assert trained_text(r, tiny_tokenizer) == ["tac<end_of_turn>"]


@pytest.mark.parametrize(
    "messages, policy, fragment",
    [
        ([{"role": "system", "content": "x"}, u("hi")], "reject", "turn 1: system messages are rejected"),
        (
            [u("hi"), {"role": "system", "content": "x"}],
            "fold",
            "turn 2: a system message may only come first",
        ),
        ([u("hi"), u("again")], "fold", "turn 2: expected a assistant turn"),
        ([a("first")], "fold", "turn 1: expected a user turn"),
        ([u("hi"), a("   ")], "fold", "turn 2: assistant message is empty"),
        ([u("hi"), {"role": "bot", "content": "x"}], "fold", "turn 2: unknown role 'bot'"),
        ([u("hi <end_of_turn>")], "fold", "turn 1: content contains the control token <end_of_turn>"),
        ([{"role": "user"}], "fold", "turn 1: a message needs 'role' and 'content'"),
        ([{"role": "user", "content": 3}], "fold", "turn 1: content must be a string"),
        ([], "fold", "a conversation is a non-empty list"),
        ([{"role": "system", "content": "only system"}], "fold", "has no user turn"),
        ([{**u("hi"), "attempt": "x"}], "fold", "turn 1: only a model turn may carry an 'attempt'"),
        ([u("hi"), {**a("fix"), "attempt": " "}], "fold", "turn 2: 'attempt' must be a non-empty string"),
        ([u("hi"), {**a("fix"), "attempt": 3}], "fold", "turn 2: 'attempt' must be a non-empty string"),
        (
            [u("hi"), {**a("fix"), "attempt": "a<end_of_turn>"}],
            "fold",
            "turn 2: attempt contains the control",
        ),
    ],
)
def test_errors_name_conversation_and_turn(messages, policy, fragment, tiny_tokenizer):
    with pytest.raises(ChatFormatError) as e:
        normalize(messages, policy, where="train.jsonl:7")
    assert "train.jsonl:7" in str(e.value) and fragment in str(e.value)
    from jinja2 import TemplateError

    with pytest.raises((TemplateError, ValueError)):  # the exported template (or transformers) refuses it too
        tiny_tokenizer.apply_chat_template(messages, chat_template=chat_template(policy), tokenize=False)


def random_conversations(n: int, seed: int) -> list[list[dict]]:
    """Conversations of 1 to 7 turns, a system message first in a third of them, content drawn from words, digits,
    whitespace at the ends and inside, Latin-1 letters and template-like braces."""
    import random

    rng = random.Random(seed)
    words = ["What", "is", "3", "+", "48?", "planet", "Ünï", "ça", "½", "{{ x }}", "{% raw %}", "'q'", '"d"', "\\",
             "<b>", "a\nb", "\tx\t", "line\n\nline", "  pad  ", "end."]  # fmt: skip

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + rng.choice(["", " ", "!"])

    out = []
    for _ in range(n):
        turns = [u(text()) if i % 2 == 0 else a(text()) for i in range(rng.randint(1, 7))]
        if rng.random() < 0.3:
            turns = [{"role": "system", "content": text()}] + turns
        if rng.random() < 0.2:
            turns = [{"role": "model", **{k: v for k, v in t.items() if k != "role"}} if t["role"] == "assistant"
                     else t for t in turns]  # fmt: skip
        out.append(turns)
    return out


CONVERSATIONS = GOLDEN + WITH_ATTEMPTS + random_conversations(300, seed=11)


@pytest.mark.parametrize("policy", ["fold", "reject"])
def test_the_exported_template_renders_what_training_renders(policy, tiny_tokenizer, bpe_tokenizer):
    template, checked = chat_template(policy), 0
    for tok in (tiny_tokenizer, bpe_tokenizer):
        for msgs in CONVERSATIONS:
            if policy == "reject" and msgs[0]["role"] == "system":
                continue  # refused by both: test_errors_name_conversation_and_turn
            for gen in (False, True) if msgs[-1]["role"] == "user" else (False,):
                r = render(msgs, tok, add_generation_prompt=gen, system=policy)
                text = tok.apply_chat_template(
                    msgs, chat_template=template, tokenize=False, add_generation_prompt=gen
                )
                assert text == r.text, (msgs, gen)
                ids = tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=gen,
                                              return_dict=True)["input_ids"]  # fmt: skip
                assert list(ids) == r.input_ids, (msgs, gen)
                checked += 1
    assert checked > 500


def test_the_exported_template_folds_or_refuses_a_system_message(tiny_tokenizer):
    from jinja2 import TemplateError

    msgs = [{"role": "system", "content": "Answer briefly."}, u("Who are you?"), a("Pip.")]
    text = tiny_tokenizer.apply_chat_template(msgs, chat_template=chat_template("fold"), tokenize=False)
    assert (
        text
        == "<bos><start_of_turn>user\nAnswer briefly.\n\nWho are you?<end_of_turn>\n<start_of_turn>model\nPip.<end_of_turn>\n"
    )
    with pytest.raises(TemplateError, match="system messages are rejected"):
        tiny_tokenizer.apply_chat_template(msgs, chat_template=chat_template("reject"), tokenize=False)
    with pytest.raises(TemplateError, match="end with a user turn"):
        tiny_tokenizer.apply_chat_template(
            msgs, chat_template=chat_template("fold"), add_generation_prompt=True
        )


def test_generation_prompt_needs_user_last(tiny_tokenizer):
    with pytest.raises(ChatFormatError, match="end with a user turn"):
        render([u("q"), a("a")], tiny_tokenizer, add_generation_prompt=True)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A multi-character BPE tokenizer with Gemma's special tokens: masks must follow token offsets."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    from tokenizers import decoders

    core.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=list(ALPHABET)
    )
    corpus = ["What is 37 + 48? The answer is 85.", "Reverse the word: planet", "model user answer"] * 50
    core.train_from_iterator(corpus, trainer)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = gemma_chat_template()
    return tok


def test_multi_character_tokenizer(bpe_tokenizer):
    msgs = [u("What is 37 + 48?"), a("The answer is 85."), u("Reverse the word: planet"), a("tenalp")]
    r = render(msgs, bpe_tokenizer)
    ref = bpe_tokenizer.apply_chat_template(msgs)
    assert r.input_ids == list(ref["input_ids"])
    assert len(r.input_ids) < len(r.text) - 40  # really multi-character tokens
    decoded = [t.replace(" ", "") for t in trained_text(r, bpe_tokenizer)]
    assert decoded == ["Theansweris85.<end_of_turn>", "tenalp<end_of_turn>"]


def test_render_cli_on_shipped_example():
    src = ROOT / "data" / "examples" / "conversations.jsonl"
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "render", "--tokenizer", "tiny", "--input", str(src)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == len(src.read_text().splitlines())
    for row in rows:
        assert set(row) == {"text", "input_ids", "loss_mask"} and sum(row["loss_mask"]) > 0


def test_render_cli_reports_every_bad_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [u("ok"), a("fine")]}) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [u("a"), u("b")]}) + "\n"
    )  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "posttrain", "render", "--tokenizer", "tiny", "--input", str(bad)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 1 and out.stdout == ""
    assert f"{bad}:2: not valid JSON" in out.stderr
    assert f"{bad}:3, turn 2: expected a assistant turn" in out.stderr


def test_real_gemma_tokenizer_has_gemmas_ids(gemma_tokenizer):
    tok = gemma_tokenizer
    assert len(tok) == 256000 and tok.is_fast
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (0, 1, 2)
    assert tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"]) == [106, 107]


@pytest.mark.parametrize("gen", [False, True])
def test_renderer_with_the_real_gemma_tokenizer_gives_the_official_templates_ids(gen, gemma_tokenizer):
    """Every golden conversation: the ids the renderer gives are those of the official template applied by the
    real tokenizer, and the trained tokens decode to the model turns (each with its `<end_of_turn>`)."""
    tok = gemma_tokenizer
    for msgs in GOLDEN:
        if gen and msgs[-1]["role"] != "user":
            msgs = msgs[:-1]
        ours = render(msgs, tok, add_generation_prompt=gen)
        ref = tok.apply_chat_template(msgs, chat_template=gemma_chat_template(), add_generation_prompt=gen)
        assert ours.input_ids == list(ref["input_ids"]), msgs
        assert ours.input_ids.count(tok.bos_token_id) == 1 and ours.input_ids[0] == tok.bos_token_id
        if not gen:
            turns = [m["content"].strip() + "<end_of_turn>" for m in msgs if m["role"] == "assistant"]
            assert trained_text(ours, tok) == turns, msgs


def test_the_final_model_turn_is_read_under_either_role_name():
    user = {"role": "user", "content": "hi"}
    for role in ("assistant", "model"):
        convo = [user, {"role": role, "content": "hello"}]
        assert final_response(convo) == "hello"
        assert prompt_messages(convo) == [user]
    assert final_response([user]) is None and prompt_messages([user]) == [user]
    assert final_response([]) is None


def test_an_attempt_is_rendered_before_the_content_and_never_trained(tiny_tokenizer, bpe_tokenizer):
    turn = {"role": "assistant", "attempt": "37+48, so 84", "content": "no: 37+48: 7+8=15, 3+4+1=8, so 85"}
    msgs = [u("What is 37 + 48?"), turn]
    for tok in (tiny_tokenizer, bpe_tokenizer):
        r = render(msgs, tok)
        assert "<start_of_turn>model\n37+48, so 84 no: 37+48: 7+8=15, 3+4+1=8, so 85<end_of_turn>" in r.text
        # the loss starts at the space after the attempt: noticing the error is trained, making it is not
        (trained,) = trained_text(r, tok)
        assert trained.lstrip(" ▁").startswith("no: 37+48:") and "84" not in trained
    assert final_response(msgs) == "37+48, so 84 no: 37+48: 7+8=15, 3+4+1=8, so 85"
    assert normalize(msgs)[-1]["attempt"] == "37+48, so 84"  # kept through the checks
    plain = render([u("What is 37 + 48?"), a("no: 37+48: 7+8=15, 3+4+1=8, so 85")], tiny_tokenizer)
    # one character a token: the space before "no" is trained, and nothing of the attempt
    assert sum(render(msgs, tiny_tokenizer).loss_mask) == sum(plain.loss_mask) + 1
