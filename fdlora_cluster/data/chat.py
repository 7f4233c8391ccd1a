"""Chat rows: a conversation rendered into segments, the loss on the assistant turns only.

With a tokenizer that has a chat template (`tokenizer_config.json`'s `chat_template`), the
conversation is rendered by that template, so training sees exactly the text the model will be
prompted with. Each assistant turn's text is what rendering up to and including the turn adds to
rendering up to it with the generation prompt (the usual prefix trick): that piece, the template's
end-of-turn marker included, is trained; everything else is masked. No eos is appended (the
template's end-of-turn marker is what ends a reply).

Without a template (the built-in byte tokenizer, or a base model's tokenizer that ships none) the
plain fallback below is used, and `check_responses_fit` logs that it was:

    system: You answer in one word.
    user: Is 'disk panic' abnormal?
    assistant: yes<eos>user: And 'disk read'?
    assistant: no<eos>

Every message but an assistant's is `role: content` and a newline; an assistant turn is the
header `assistant: ` (masked) and then its content and eos (trained).
"""

from __future__ import annotations

from .errors import DataError

ASSISTANT = "assistant"


def has_chat_template(tok) -> bool:
    return bool(getattr(tok, "chat_template", None))


def plain_prompt(messages) -> str:
    """The fallback rendering of every message before the last assistant turn's content, as one
    string (newlines where the token stream has eos): the row's `prompt` for logs and representations."""
    text = "".join(f"{role}: {content}\n" for role, content in messages[:-1])
    return text + f"{ASSISTANT}: "


def _plain_segments(tok, messages) -> list[tuple[list[int], bool]]:
    segs, text = [], ""
    for role, content in messages:
        if role == ASSISTANT:
            segs.append((tok.encode(text + f"{ASSISTANT}: "), False))
            segs.append((tok.encode(content) + [tok.eos_id], True))
            text = ""
        else:
            text += f"{role}: {content}\n"
    return segs


def _template_segments(tok, messages, where: str) -> list[tuple[list[int], bool]]:
    def render(upto: int, generation_prompt: bool) -> str:
        try:
            return tok.render_chat(messages[:upto], add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises whatever the template says (TemplateError, ...), so any
            raise DataError(f"{where}: the tokenizer's chat template refuses this conversation "
                            f"({type(e).__name__}: {e})") from None
    segs, done = [], ""
    for k, (role, _) in enumerate(messages):
        if role != ASSISTANT:
            continue
        context, full = render(k, True), render(k + 1, False)
        if not (context.startswith(done) and full.startswith(context)):
            # e.g. templates that drop earlier turns' reasoning: then no turn is a prefix of the next
            raise DataError(f"{where}: the tokenizer's chat template does not render this conversation turn by "
                            f"turn (rendering up to message {k} is not a prefix of rendering message {k} too), "
                            "so the assistant turns cannot be told apart for the loss")
        segs.append((tok.encode(context[len(done):]), False))
        segs.append((tok.encode(full[len(context):]), True))
        done = full
    return segs


def chat_segments(tok, messages, where: str = "") -> list[tuple[list[int], bool]]:
    """(token ids, trained?) pieces of a conversation of (role, content) pairs ending with an
    assistant turn: the tokenizer's chat template when it has one, else the plain fallback."""
    if has_chat_template(tok):
        return _template_segments(tok, messages, where)
    return _plain_segments(tok, messages)
