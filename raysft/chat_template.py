"""What a chat template's failure says, and the template check made once before any data is read.

Its own module, light (jinja2 only): the tokenize actors of Ray Data need it per row, and importing raysft.model there
would import peft and bitsandbytes into every actor (seconds, and bitsandbytes' CPU notice on every worker).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jinja2

from raysft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SAMPLE_CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]


def chat_template_fault(err: jinja2.TemplateError, tokenizer: PreTrainedTokenizerBase, template: str | None = None
                        ) -> str:
    """What a template error says to the user, blaming the template or the row, whichever is at fault.

    A template's own `raise_exception(...)` (transformers raises a plain jinja2.TemplateError for it) is the
    template's rule refusing the conversation: the row. Invalid Jinja or an operation Jinja's sandbox forbids
    (SecurityError) is the template's fault, whatever the row. Anything else (an undefined value the template
    needs, ...) depends on both. `template` names the template when known (default: both places it may come from).

    Example:
        >>> chat_template_fault(jinja2.TemplateError("Conversation roles must alternate"), tokenizer)  # doctest: +SKIP
        'the chat template refused the conversation: Conversation roles must alternate; fix the row, ...'
    """
    template = template or (f"the chat template (model.chat_template when set, else the one of the tokenizer in "
                            f"{tokenizer.name_or_path or type(tokenizer).__name__})")
    if type(err) is jinja2.TemplateError:
        return (f"the chat template refused the conversation: {err}; fix the row, or set model.chat_template to a "
                "template that renders it")
    if isinstance(err, (jinja2.exceptions.SecurityError, jinja2.TemplateSyntaxError)):
        what = "does what Jinja's sandbox forbids" if isinstance(err, jinja2.exceptions.SecurityError) else "is not valid Jinja"
        return (f"{template} {what} ({type(err).__name__}: {err}): the template is at fault, not the row; fix the "
                "template, or set model.chat_template to one that works (`chatml`, or a Jinja string)")
    return (f"{template} failed on this conversation ({type(err).__name__}: {err}): the row lacks something the "
            "template expects, or the template has a bug; check the row against the template, or set "
            "model.chat_template to a template that renders it")


def check_chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """ConfigError when the chat template (`template` names it) cannot render even a plain user/assistant exchange
    (invalid Jinja, an operation the sandbox forbids): found once, before any data is read, not once per row."""
    try:
        tokenizer.apply_chat_template(_SAMPLE_CONVERSATION, tokenize=False)
    except (jinja2.exceptions.SecurityError, jinja2.TemplateSyntaxError) as err:
        raise ConfigError([f"model.chat_template: {chat_template_fault(err, tokenizer, template)}"]) from None
    except jinja2.TemplateError:
        pass  # a rule about conversations (raise_exception) or a missing value: judged per row, where rows are named
