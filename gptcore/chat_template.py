"""A model's chat template, rendered the way transformers renders it: the same sandbox, same output.

Chat templates come with downloaded models, so they are untrusted code: they run in jinja2's
ImmutableSandboxedEnvironment with the settings, filters and globals of transformers'
`apply_chat_template` (trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not escape
HTML, `raise_exception`, `strftime_now`, a plain `dict` and a `namespace` refusing private names),
so the text a template renders here is the text it renders there. `{% generation %}` blocks (for
assistant masks) are accepted and render their body.

What it is not: tokenization. The rendered text is encoded with Tokenizer.encode, which maps the
special-token text in it to the special ids.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A template that does not compile, or that refuses the messages (its raise_exception)."""


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it for
    masks)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing underscore names so a template cannot reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja2's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"a chat template may not set {name!r} on a namespace"
            )


class _Dict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type's other attributes."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes <, > and & for HTML; chat text must stay as it is.
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(template)


def check_template(template: str) -> None:
    """ChatTemplateError when `template` is not valid Jinja."""
    try:
        _compile(template)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e}") from e


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **variables: Any,
) -> str:
    """The text of `messages` in `template`; `special_tokens` (bos_token, eos_token, ...) and
    `variables` (tools, documents, anything the template reads) are visible to it."""
    chat = [
        {k: v for k, v in dict(m).items() if v is not None} for m in messages
    ]  # as transformers drops None
    try:
        return _compile(template).render(
            messages=chat,
            add_generation_prompt=add_generation_prompt,
            tools=variables.pop("tools", None),
            documents=variables.pop("documents", None),
            **{**dict(special_tokens or {}), **variables},
        )
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
