"""Model replies rendered from Markdown: fenced code highlighted by Pygments with classes only,
and everything still inert after the sanitizer."""

import html
import re

import pytest

from conversations.rendering import ALLOWED_CLASSES, LANGUAGES, render_markdown, sanitize


def fenced(info: str, code: str) -> str:
    return f"```{info}\n{code}\n```\n"


def block_text(rendered: str) -> str:
    """What a reader sees of the one <pre> block: its text with the markup gone, unescaped."""
    (pre,) = re.findall(r"<pre>.*?</pre>", rendered, re.S)
    return html.unescape(re.sub(r"<[^>]*>", "", pre))


def test_a_python_block_gets_token_classes_and_no_styles():
    rendered = render_markdown(fenced("python", "def f(a):\n    return a  # done"))
    assert '<pre><code class="language-python highlight">' in rendered
    assert '<span class="k">def</span> <span class="nf">f</span>' in rendered, "spaces bare"
    assert '<span class="c1"># done</span>' in rendered
    assert "style=" not in rendered


@pytest.mark.parametrize("info", ["py", "PY", "python3", "python {linenos=true}"])
def test_aliases_and_case_name_the_same_language(info):
    assert 'class="language-python highlight"' in render_markdown(fenced(info, "x = 1"))


@pytest.mark.parametrize("info", ["python", "nosuchlanguage", ""])
def test_code_is_escaped_exactly_once(info):
    code = '\nif a < b && "x" != \'y\':\n    s = "&lt; stays &amp; as typed"'
    rendered = render_markdown(fenced(info, code))
    assert block_text(rendered) == code + "\n", "leading blank line and text kept as written"
    assert "&lt;" in rendered and "&amp;&amp;" in rendered
    assert "&amp;lt; stays &amp;amp; as typed" in rendered  # the model's own entities, as text
    assert "&amp;amp;&amp;" not in rendered and "&amp;lt; b" not in rendered


@pytest.mark.parametrize("info", ["nosuchlanguage", ""])
def test_an_unknown_or_missing_language_is_plain_code(info):
    rendered = render_markdown(fenced(info, "def f(a): return a < 1"))
    assert "<pre><code>def f(a): return a &lt; 1\n</code></pre>" in rendered
    assert "<span" not in rendered


@pytest.mark.parametrize("name", sorted(LANGUAGES))
def test_every_language_listed_is_highlighted_under_its_name(name):
    rendered = render_markdown(fenced(name, "x = 1"))
    assert f'<pre><code class="language-{name} highlight">' in rendered


def test_pygments_classes_survive_the_sanitizer():
    reply = "".join(
        fenced(info, code)
        for info, code in [
            ("python", '@d\nclass A(B):\n    """Doc."""\n    x: int = 0x1F or f"{y}\\n"'),
            ("js", "const a = /re/g; // c\nlet s = `t ${u}`;"),
            ("bash", 'for f in *.txt; do echo "$f"; done'),
            ("diff", "--- a\n+++ b\n@@ -1 +1 @@\n-old\n+new"),
            ("html", '<a href="x">y</a><!-- c -->'),
        ]
    )
    rendered = render_markdown(reply)
    classes = re.findall(r'<span class="([^"]*)">', rendered)
    assert {"k", "nc", "sd", "mh", "sa", "si", "se", "c1", "sr", "nv", "gd", "gi", "nt"} <= set(
        classes
    )
    assert "<span>" not in rendered, "no class Pygments emitted was stripped"


RAW_HTML = (
    '<script>alert(1)</script> <span style="color:red">s</span> '
    '<span onclick="alert(2)">o</span> <span class="evil">e</span> '
    '<img src=x onerror="alert(3)"> <a href="javascript:alert(4)">j</a>'
)


@pytest.mark.parametrize(
    "reply",
    [
        RAW_HTML,
        fenced("python", RAW_HTML),
        fenced("", RAW_HTML),
        fenced('"><script>alert(5)</script>', "x"),
        fenced('x" onclick="alert(6)', "x"),
        fenced("python\" onclick='alert(7)'", "x"),
        f"`{RAW_HTML}`",
        "[j](javascript:alert(8)) <javascript:alert(9)>",
    ],
)
def test_what_the_model_writes_stays_inert(reply):
    rendered = render_markdown(reply)
    assert not re.search(r"<(script|img)\b", rendered)
    assert not re.search(r"<[^>]*\s(style|on\w+)=", rendered)
    assert not re.search(r'<a\b[^>]*href="javascript:', rendered)
    for classes in re.findall(r'<(?:span|code) class="([^"]*)"', rendered):
        assert set(classes.split()) <= ALLOWED_CLASSES["span"] | ALLOWED_CLASSES["code"]


def test_the_sanitizer_keeps_only_allowed_classes_and_no_styles_or_handlers():
    dirty = (
        '<pre><code class="language-python highlight language-evil" style="x" onclick="y">'
        '<span class="k evil" style="color:red" onmouseover="z">def</span>'
        '<span class="language-python">x</span><script>alert(1)</script></code></pre>'
        '<p class="k">p</p><a href="javascript:alert(1)" class="nf">a</a>'
    )
    assert sanitize(dirty) == (
        '<pre><code class="language-python highlight"><span class="k">def</span>'
        '<span class="">x</span></code></pre><p>p</p><a rel="nofollow noopener noreferrer">a</a>'
    )


def test_inline_code_tables_and_links_are_unchanged():
    rendered = render_markdown(
        "`a < b` and **bold**\n\n| l | r |\n|:--|--:|\n| 1 | 2 |\n\n"
        "[site](https://example.test) [bad](javascript:alert(1))"
    )
    assert "<code>a &lt; b</code>" in rendered and "<strong>bold</strong>" in rendered
    assert '<th style="text-align:left">l</th>' in rendered
    assert '<td style="text-align:right">2</td>' in rendered
    assert '<a href="https://example.test" rel="nofollow noopener noreferrer">site</a>' in rendered
    assert "[bad](javascript:alert(1))" in rendered, "not a link: markdown-it refuses the URL"
