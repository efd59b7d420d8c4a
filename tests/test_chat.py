"""Chat formats against their references: Llama 2 as the tokenizer.model that HF's Llama-2-chat
template + transformers' LlamaTokenizer encode it, Llama 3 as tiktoken encodes Meta's rendered
format, and a checkpoint's own template as transformers' apply_chat_template renders it."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from llamalab.generate.chat import chat_format, chat_stop_ids, encode_chat
from llamalab.tokenizer import load_tokenizer, train_sentencepiece
from chat_templates import LLAMA2_HF_TEMPLATE

transformers = pytest.importorskip("transformers")

DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": " What is 2+2? "},
          {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"}]



@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama2tok")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(f"What is {i}+{i}? It is {2 * i}. Answer briefly, please. [INST] SYS" for i in range(500)))
    model = train_sentencepiece([corpus], folder / "tokenizer", vocab_size=300)
    model.rename(folder / "tokenizer.model")
    return folder


def test_llama2_format_matches_hf_template_and_llama_tokenizer(sp_dir: Path) -> None:
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    assert chat_format(tok) == "llama2" and chat_stop_ids(tok) == {tok.eos_id}
    ref = transformers.LlamaTokenizer.from_pretrained(str(sp_dir), legacy=True)
    want = ref.apply_chat_template(DIALOG, chat_template=LLAMA2_HF_TEMPLATE, tokenize=True, return_dict=False)
    got = encode_chat(tok, DIALOG)
    assert got == list(want)
    assert got.count(tok.bos_id) == 2 and got.count(tok.eos_id) == 1  # one closed exchange, one open


def test_llama2_rejects_a_broken_conversation(sp_dir: Path) -> None:
    tok = load_tokenizer(sp_dir / "tokenizer.model")
    with pytest.raises(ValueError, match="alternate"):
        encode_chat(tok, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="last message"):
        encode_chat(tok, DIALOG[:3])
    with pytest.raises(ValueError, match="role 'tool'"):
        encode_chat(tok, [{"role": "tool", "content": "x"}])


def test_llama3_format_matches_tiktoken_on_metas_text(tmp_path: Path) -> None:
    """Byte-only ranks keep the file tiny; the structure (headers, eot, no special parsing of content) is the test."""
    tiktoken = pytest.importorskip("tiktoken")
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    tok = load_tokenizer(path)
    assert chat_format(tok) == "llama3"
    sp = tok.special_tokens
    assert chat_stop_ids(tok) >= {sp["<|eot_id|>"], sp["<|end_of_text|>"]}

    ref = tiktoken.Encoding("ref", pat_str=r"[\s\S]", mergeable_ranks={bytes([b]): b for b in range(256)},
                            special_tokens=dict(sp))
    dialog = [*DIALOG[:3], {"role": "user", "content": "Is <|eot_id|> special?"}]
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in dialog
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    want = ref.encode(text.replace("Is <|eot_id|>", "Is \0"), allowed_special="all")
    # The user's literal "<|eot_id|>" is text, not the special token: encode it as plain bytes.
    nul = want.index(0)
    want[nul:nul + 1] = ref.encode("<|eot_id|>", disallowed_special=())
    assert encode_chat(tok, dialog) == want


def test_template_format_matches_apply_chat_template(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    chatml = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
              "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    backend = tokenizers.Tokenizer(tokenizers.models.BPE())
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([m["content"] for m in DIALOG] * 10, trainer)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>",
                                               eos_token="<|im_end|>", chat_template=chatml)
    ref.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert chat_format(tok) == "template"
    for add in (True, False):
        want = ref.apply_chat_template(DIALOG, tokenize=True, add_generation_prompt=add, return_dict=False)
        assert encode_chat(tok, DIALOG, add_generation_prompt=add) == list(want)
    assert tok.special_tokens["<|im_end|>"] in chat_stop_ids(tok)
