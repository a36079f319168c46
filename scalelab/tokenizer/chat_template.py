"""A checkpoint's own Jinja chat template, rendered the way ``transformers`` renders it.

Published chat models ship their prompt format as a Jinja template (``chat_template`` in
``tokenizer_config.json``, or ``chat_template.jinja``). ``apply_chat_template`` renders it in a
sandbox with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson``
filter that does not HTML-escape, the ``raise_exception`` and ``strftime_now`` helpers, and the
tokenizer's named special tokens (``bos_token``, ``eos_token``, ...) as variables. This module sets up
the same environment, so the text (and so the tokens) equals what ``transformers`` would produce;
tests check it byte for byte. ``{% generation %}`` blocks (TRL's assistant-mask markers) render
their body unchanged.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from scalelab.errors import ScalelabError


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: rendered as its body (we find assistant spans ourselves)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes <, > and &, which would change the prompt text
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ScalelabError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_template(source: str, messages: list[dict], add_generation_prompt: bool,
                    special_tokens: dict[str, str]) -> str:
    """The prompt text for ``messages``; ``special_tokens`` maps bos_token, eos_token, ... to their strings."""
    template = compile_template(source)
    try:
        return template.render(messages=messages, tools=None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise ScalelabError(f"the model's chat template refused the conversation: {e}") from None
