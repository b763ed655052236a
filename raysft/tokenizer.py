"""The model's tokenizer as raysft uses it everywhere (data, training, generation, final/): its chat template (the
configured fallback if it ships none) and `model.add_special_tokens` added.

Light (transformers' tokenizers, no peft, no model code): the driver tokenizes and checks data with it, and a Ray
run's driver never needs the model stack (peft imports bitsandbytes, which loads torch._inductor: seconds of every
run's and every sweep trial's start). A process loads it once and passes it on.
"""

from __future__ import annotations

import logging

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from raysft.chat_template import check_chat_template
from raysft.config import ModelConfig
from raysft.model_source import model_location

log = logging.getLogger(__name__)

# Raw strings: Jinja itself must see the '\n' escapes, as in the templates shipped with models. Plain turns render
# as ChatML always has; tools, tool calls and tool results as Hermes / Qwen2.5 write them (the tool schemas in the
# system turn, each call as JSON in <tool_call> tags inside the assistant turn, results as 'tool' turns); reasoning
# in <think> tags ahead of the reply, as Qwen3 writes it (read under the names other renderers than transformers
# may pass it with, too: the template is saved with the run and may be served elsewhere).
CHATML_TEMPLATE = (
    r"{%- if tools -%}"
    r"{{- '<|im_start|>system\n' -}}"
    r"{%- if messages and messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\n\n' -}}{%- endif -%}"
    r"{{- '# Tools\n\nYou may call one or more functions. Their signatures are within <tools></tools>:\n<tools>' -}}"
    r"{%- for tool in tools -%}{{- '\n' + (tool | tojson) -}}{%- endfor -%}"
    r"{{- '\n</tools>\n\nFor each call, reply with a JSON object holding the function name and arguments within "
    r"<tool_call></tool_call> tags:\n<tool_call>\n' -}}"
    r"""{{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}"""
    r"{%- endif -%}"
    r"{%- for message in messages -%}"
    r"{%- if not (tools and loop.first and message['role'] == 'system') -%}"
    r"{{- '<|im_start|>' + message['role'] + '\n' -}}"
    r"{%- set reasoning = message.reasoning_content or message.reasoning or message.thinking -%}"
    r"{%- if message['role'] == 'assistant' and reasoning -%}"
    r"{{- '<think>\n' + reasoning + '\n</think>\n\n' -}}"
    r"{%- endif -%}"
    r"{{- message['content'] -}}"
    r"{%- if message['role'] == 'assistant' and message.tool_calls -%}"
    r"{%- for call in message.tool_calls -%}"
    r"{%- set function = call.function if call.function is defined else call -%}"
    r"{%- if message['content'] or not loop.first -%}{{- '\n' -}}{%- endif -%}"
    r"""{{- '<tool_call>\n{"name": ' + (function.name | tojson) + ', "arguments": ' -}}"""
    r"{%- if function.arguments is string -%}{{- function.arguments -}}"
    r"{%- else -%}{{- function.arguments | tojson -}}{%- endif -%}"
    r"{{- '}\n</tool_call>' -}}"
    r"{%- endfor -%}"
    r"{%- endif -%}"
    r"{{- '<|im_end|>\n' -}}"
    r"{%- endif -%}"
    r"{%- endfor -%}"
    r"{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

CHATML_MARKERS = ("<|im_start|>", "<|im_end|>")
"""The control tokens CHATML_TEMPLATE writes: added to a tokenizer that lacks them when the template is the fallback."""


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> bool:
    """Give `tokenizer` a chat template: a Jinja string always wins; ``"chatml"`` or None only fill a gap.

    Returns whether raysft's ChatML fallback was put in (so its markers may need adding as tokens).

    Example:
        >>> ensure_chat_template(tokenizer, "chatml")  # doctest: +SKIP
        False
    """
    if template is not None and template != "chatml":
        tokenizer.chat_template = template
        return False
    if tokenizer.chat_template:
        return False
    if template is None:
        log.warning(
            "The tokenizer %s has no chat template; using ChatML. Set model.chat_template to choose another.",
            tokenizer.name_or_path or type(tokenizer).__name__,
        )
    tokenizer.chat_template = CHATML_TEMPLATE
    return True


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer with a chat template (the configured fallback if it ships none) and
    `model.add_special_tokens` added (by default: the ChatML markers, when the fallback needs them)."""
    return load_tokenizer_and_new_ids(cfg)[0]


def load_tokenizer_and_new_ids(cfg: ModelConfig) -> tuple[PreTrainedTokenizerBase, list[int]]:
    """:func:`load_tokenizer`, and the ids of the tokens it added that the tokenizer did not hold before: the
    embedding rows that training must create (:func:`load_model`'s `num_tokens`) and train (:func:`apply_lora`).

    Example:
        >>> tokenizer, new_ids = load_tokenizer_and_new_ids(ModelConfig(name_or_path="base-model-dir"))  # doctest: +SKIP
    """
    location, kwargs = model_location(cfg)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    chatml_fallback = ensure_chat_template(tokenizer, cfg.chat_template)
    own = cfg.chat_template in (None, "chatml")  # raysft's ChatML fills a gap only: then the tokenizer's is used
    check_chat_template(tokenizer, f"the chat template of the tokenizer in {location}" if own else "the template")
    wanted = cfg.add_special_tokens
    if wanted is None:  # the default: what the fallback template writes
        wanted = list(CHATML_MARKERS) if chatml_fallback else []
    special = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    missing = [token for token in wanted if token not in special]
    new_ids: list[int] = []
    if missing:
        known = tokenizer.get_vocab()
        # Special: never split, written only by the template (data spelling them stays text unless
        # data.parse_special_tokens), skipped when decoding generated text.
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
        new_ids = sorted(tokenizer.convert_tokens_to_ids(token) for token in missing if token not in known)
        log.warning(
            "Added %s to the tokenizer of %s as special tokens%s.", ", ".join(missing), cfg.name_or_path,
            f": {len(new_ids)} new embedding row(s), initialized to the mean of the others and trained" if new_ids else "",
        )
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss (labels IGNORE_INDEX), so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, new_ids
