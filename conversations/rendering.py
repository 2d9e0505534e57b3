"""Model replies as HTML: Markdown rendered by markdown-it-py, then cleaned by nh3 (an
allow-list sanitizer), so whatever a model writes cannot run as script in the page.

Fenced code in a language of LANGUAGES is highlighted by Pygments with classes, never inline
styles (the Content-Security-Policy forbids them); static/conversations/code.css colours them."""

from functools import cache, lru_cache

import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from pygments import highlight
from pygments.filter import simplefilter
from pygments.formatters import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers import get_all_lexers, get_lexer_by_name
from pygments.token import STANDARD_TYPES, Text, Whitespace

# The languages highlighted, as named in the class a block gets (`language-python`); every
# alias of the same Pygments lexer (py, js, sh, c++...) counts too. A fixed list rather than
# all ~600 lexers: less lexer code run on what a model writes, and a short class allow-list.
LANGUAGES = frozenset({
    "python", "pycon", "javascript", "typescript", "jsx", "tsx", "json", "yaml", "toml", "ini",
    "xml", "html", "css", "scss", "sql", "bash", "console", "powershell", "batch", "c", "cpp",
    "csharp", "java", "kotlin", "scala", "go", "rust", "swift", "objective-c", "php", "ruby",
    "perl", "lua", "r", "julia", "haskell", "elixir", "erlang", "clojure", "ocaml", "fsharp",
    "dart", "groovy", "docker", "make", "cmake", "nginx", "diff", "markdown", "tex", "graphql",
    "protobuf", "terraform", "matlab", "zig", "text",
})  # fmt: skip

ALLOWED_TAGS = {
    "p", "br", "hr", "strong", "em", "del", "s", "code", "pre", "blockquote",
    "ul", "ol", "li", "a", "h1", "h2", "h3", "h4", "h5", "h6",
    "table", "thead", "tbody", "tr", "th", "td", "span",
}  # fmt: skip
# No "class" here: nh3 panics if a tag has it both here and in ALLOWED_CLASSES.
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    "th": {"style"},
    "td": {"style"},
    "ol": {"start"},
}
ALLOWED_CLASSES = {
    "code": {"highlight"} | {f"language-{name}" for name in LANGUAGES},
    # Pygments' short token classes (k, nf, s2...): a span can carry nothing else.
    "span": set(STANDARD_TYPES.values()) - {""},
}


def _alias_names() -> dict[str, str]:
    # From Pygments' table of lexers, which names every alias without importing any lexer.
    names = {}
    for _name, aliases, _files, _mimetypes in get_all_lexers(plugins=False):
        for name in LANGUAGES.intersection(aliases):
            names.update(dict.fromkeys(aliases, name))
    return names


_LANGUAGE_OF_ALIAS = _alias_names()


@simplefilter
def _plain_whitespace(self, lexer, stream, options):
    # Whitespace has no colour, yet got a span each: a third of a highlighted block's markup.
    for ttype, value in stream:
        yield (Text if ttype in Whitespace else ttype), value


@cache
def _lexer(name: str) -> Lexer:
    # stripnl=False: a block's leading blank lines are the model's, kept as written.
    lexer = get_lexer_by_name(name, stripnl=False)
    lexer.add_filter(_plain_whitespace())
    return lexer


@lru_cache(maxsize=1)
def _formatter() -> HtmlFormatter:
    # Holds no state between calls, so one serves every thread. nowrap: only the token spans.
    return HtmlFormatter(nowrap=True)


def _fence(code: str, info: str, _attrs: str) -> str:
    """A fenced block's whole <pre> (markdown-it uses output starting "<pre" as it is)."""
    name = _LANGUAGE_OF_ALIAS.get(info.lower())
    if name is None:
        # Unknown or no language: plain text, not guess_lexer (slow, and wrong on snippets).
        return f"<pre><code>{escapeHtml(code)}</code></pre>"
    body = highlight(code, _lexer(name), _formatter())
    return f'<pre><code class="language-{name} highlight">{body}</code></pre>'


@lru_cache(maxsize=1)
def _parser() -> MarkdownIt:
    # "html": False renders any raw HTML in the text as text; tables and strikethrough on.
    options = {"html": False, "linkify": False, "highlight": _fence}
    return MarkdownIt("commonmark", options).enable(["table", "strikethrough"])


# Replies rendered lately, by their text: a thread page renders every reply at every view, and
# highlighting costs ~5-7 ms per 40 lines of code (the plain Markdown ~0.5 ms a reply).
RENDERED_CACHE = 512


def render_markdown(text: str) -> SafeString:
    return mark_safe(_rendered(text or ""))


@lru_cache(maxsize=RENDERED_CACHE)
def _rendered(text: str) -> str:
    return sanitize(_parser().render(text))


def sanitize(html: str) -> str:
    """Markdown's HTML cut down to ALLOWED_*: the model's raw HTML is already text, so this is
    the second line, holding even if the parser or Pygments emitted something unexpected."""
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        allowed_classes=ALLOWED_CLASSES,
        url_schemes={"http", "https", "mailto"},
        link_rel="nofollow noopener noreferrer",
        filter_style_properties={"text-align"},
    )
