"""Template round trip: our export's tokenizer in transformers' apply_chat_template = encode_conversation."""

from __future__ import annotations

from typing import Any

import pytest
from llmtrain.runtime.chat import DEFAULT_CHAT_TEMPLATE, encode_conversation, encode_prompt, render
from llmtrain.runtime.export import TokenizerFiles, export_model

from tests.unit.test_export import EOT, model_config, random_gpt, tokenizer  # noqa: F401

SYSTEM = {"role": "system", "content": "Answer with the function's name."}
TURNS = [
    {"role": "user", "content": "Return the absolute value of the argument."},
    {"role": "assistant", "content": "abs"},
    {"role": "user", "content": "  Split a pathname into a pair (head, tail).\n\tDone? 日本 🦙"},
    {"role": "assistant", "content": " os.path.split\n"},
]
CUSTOM = (  # a template declared in spec.data.tokenizer.chatTemplate travels the same way
    "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}"
    "{% endgeneration %}{% else %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer: TokenizerFiles) -> dict[str, Any]:  # noqa: F811
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    out: dict[str, Any] = {}
    for name, template in (("default", None), ("custom", CUSTOM)):
        tok = TokenizerFiles(tokenizer.json_bytes, tokenizer.eot_token, tokenizer.eot_id, template)
        path = tmp_path_factory.mktemp(name) / "hf"
        export_model(
            random_gpt(model_config(tok, tied=True)).state_dict(),
            model_config(tok, tied=True),
            str(path),
            tok,
        )
        out[name] = AutoTokenizer.from_pretrained(path)
    out["ours"] = Tokenizer.from_str(tokenizer.json_bytes.decode())
    return out


def hf_encode(hf_tok: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    got = hf_tok.apply_chat_template(
        messages, tokenize=True, return_assistant_tokens_mask=True, return_dict=True
    )
    return list(got["input_ids"]), list(got["assistant_masks"])


@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
@pytest.mark.parametrize("turns", [2, 4], ids=["one-turn", "two-turns"])
@pytest.mark.parametrize("which", ["default", "custom"])
def test_apply_chat_template_equals_encode_conversation(
    exported: dict[str, Any], system: bool, turns: int, which: str
) -> None:
    hf_tok = exported[which]
    template = DEFAULT_CHAT_TEMPLATE if which == "default" else CUSTOM
    msgs = ([SYSTEM] if system else []) + TURNS[:turns]
    ids, mask = encode_conversation(exported["ours"], msgs, template, eos_token=EOT)
    assert hf_encode(hf_tok, msgs) == (ids, mask)
    assert sum(mask) > 0 and ids.count(hf_tok.eos_token_id) == turns // 2  # the end-of-text *id*, per answer
    # Inference: the prompt transformers builds is the one we serve from.
    prompt = hf_tok.apply_chat_template(
        msgs[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert list(prompt) == encode_prompt(exported["ours"], msgs[:-1], template, eos_token=EOT)
    assert hf_tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) == render(
        msgs[:-1], template, add_generation_prompt=True, eos_token=EOT
    )


def test_one_whitespace_apart_is_caught(exported: dict[str, Any]) -> None:
    """Negative control: a template one space away from the exported one gives other ids."""
    msgs = [SYSTEM, *TURNS]
    shifted = DEFAULT_CHAT_TEMPLATE.replace("### User:\\n", "### User: \\n", 1)
    assert shifted != DEFAULT_CHAT_TEMPLATE
    ids, _ = encode_conversation(exported["ours"], msgs, shifted, eos_token=EOT)
    assert hf_encode(exported["default"], msgs)[0] != ids
