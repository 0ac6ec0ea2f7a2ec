"""analysis/html.py: a report's Markdown becomes one HTML page with relative links, a table of
contents and the shared stylesheet; with single_file its images are inside the page."""

import base64

from tiertune.analysis.html import render, stylesheet, write_page

PAGE = """# tiertune report: m on h

## Policies compared

Simulated on `h`; see [the trace](runs/trace.json).

[![Policies compared](figs/compare.png)](figs/compare.svg)

| policy | iteration (s) |
|---|---|
| fuyou | 9.83 |
| [other](other/index.html) | 1.2 |

## What if: the planned schedule

Replayed.
"""


def test_a_page_renders_markdown_with_relative_links_and_a_table_of_contents(tmp_path):
    page = render(PAGE, tmp_path)
    assert "<title>tiertune report: m on h</title>" in page
    assert stylesheet() in page
    assert '<nav class="toc"' in page and 'href="#policies-compared"' in page and 'id="policies-compared"' in page
    assert page.index("</h1>") < page.index('<nav class="toc"') < page.index("<h2")
    assert '<a href="figs/compare.svg"><img alt="Policies compared" src="figs/compare.png"></a>' in page
    assert '<a href="runs/trace.json">the trace</a>' in page and '<a href="other/index.html">other</a>' in page
    assert "<code>h</code>" in page and "<table>" in page and "<td>9.83</td>" in page
    for markdown in ("](", "`", "| policy", "|---", "## "):
        assert markdown not in page.split("</style>")[1]


def test_a_single_file_page_carries_its_images_and_no_link_to_the_files_beside_them(tmp_path):
    png = b"\x89PNG\r\n\x1a\n not a real image, bytes are what counts"
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "compare.png").write_bytes(png)
    page = render(PAGE, tmp_path, single_file=True)
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert "compare.svg" not in page and "figs/compare.png" not in page
    assert '<a href="runs/trace.json">' in page


def test_write_page_puts_the_html_beside_the_markdown(tmp_path):
    md = tmp_path / "index.md"
    md.write_text(PAGE)
    out = write_page(md)
    assert out == tmp_path / "index.html" and out.read_text() == render(PAGE, tmp_path)
