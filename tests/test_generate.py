"""Generation helpers against references: chat templates as transformers renders them, and a
streamer that releases exactly the text of the ids decoded at once."""

from __future__ import annotations

import pytest
import torch

from llamalab.config import ModelConfig
from llamalab.generate import TextStreamer, greedy_generate, render_chat_template
from llamalab.model import Transformer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}"
          "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
          "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + "
          "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there!  "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]


def _hf_tokenizer(template: str) -> "transformers.PreTrainedTokenizerFast":
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                chat_template=template)


@pytest.mark.parametrize("template", [CHATML, LLAMA3], ids=["chatml", "llama3"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_as_transformers(template: str, add_generation_prompt: bool) -> None:
    want = _hf_tokenizer(template).apply_chat_template(MESSAGES, tokenize=False,
                                                       add_generation_prompt=add_generation_prompt)
    got = render_chat_template(template, MESSAGES, add_generation_prompt=add_generation_prompt,
                               bos_token="<s>", eos_token="</s>")
    assert got == want


def test_chat_template_raise_exception_and_sandbox() -> None:
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        render_chat_template(LLAMA3, [{"role": "tool", "content": "x"}], bos_token="<s>")
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", MESSAGES)


def test_streamer_never_splits_a_character() -> None:
    """Byte-level BPE pieces of 'naïve 🦙 €' pushed one at a time: each piece is whole text and the
    pieces join to tokenizers' own decode of all ids."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=260, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["plain ascii words only"], trainer)
    text = "naïve 🦙 costs 3 €"
    ids = tok.encode(text).ids
    assert len(ids) > len(text)  # multi-byte characters really are split across tokens
    streamer = TextStreamer(tok.decode)
    pieces = [streamer.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text


def test_greedy_generate_matches_transformers_and_respects_vocab_limit() -> None:
    """Greedy ids equal transformers' greedy generate with the padded rows suppressed."""
    from llamalab.checkpoint.convert import config_to_hf, hf_state_dict_to_meta

    torch.manual_seed(3)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, max_seq_len=64)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config_to_hf(cfg))).eval()
    ours = Transformer(cfg)
    ours.load_state_dict(hf_state_dict_to_meta(hf.state_dict(), cfg))
    ours.eval()
    prompt = [5, 17, 42, 8]
    limit = 50
    got = greedy_generate(ours, prompt, 20, vocab_limit=limit)
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                           pad_token_id=0, suppress_tokens=list(range(limit, 96)))[0, len(prompt):].tolist()
    assert got.ids == want and max(got.ids) < limit
    stop = got.ids[5]
    stopped = greedy_generate(ours, prompt, 20, vocab_limit=limit, stop_ids={stop})
    assert stopped.stopped_by == "stop_token" and stopped.ids == got.ids[:got.ids.index(stop) + 1]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        greedy_generate(ours, prompt, 61)
