"""Markdown report -> HTML page: the one way every page a person opens in a browser is made.

A report is written as Markdown (index.md, readable as it is and on any code host) and rendered
here with Python-Markdown (tables, table of contents) into index.html beside it, with the shared
stylesheet report.css inlined so a page needs nothing but the files it links. Every link and image
path stays relative to the page, so a report directory can be moved or zipped whole. With
`single_file`, the page's own images are embedded as data URIs so the HTML alone can be shared.
"""

from __future__ import annotations

import base64
import html
import mimetypes
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from tiertune.fileio import atomic_write_text

STYLESHEET = "report.css"


def is_local(url: str) -> bool:
    """A relative link into the report folder (not a web address, an anchor or a data URI)."""
    parts = urlsplit(url)
    return not (parts.scheme or parts.netloc or url.startswith("#") or url.startswith("/"))


def local_file(page_dir: Path, url: str) -> Path:
    """The file a relative link of a page in `page_dir` names (query and anchor dropped)."""
    return page_dir / unquote(urlsplit(url).path)


class _EmbedImages(Treeprocessor):
    """Replace each local <img src> by a data URI and drop the link around it (a link to the SVG
    beside the PNG would point outside the single file)."""

    def __init__(self, md: markdown.Markdown, page_dir: Path):
        super().__init__(md)
        self.page_dir = page_dir

    def run(self, root: ET.Element) -> None:
        for parent in root.iter():
            for i, child in enumerate(list(parent)):
                if child.tag == "a" and len(child) == 1 and child[0].tag == "img" and not (child.text or "").strip():
                    child[0].tail = child.tail
                    parent[i] = child[0]
        for img in root.iter("img"):
            src = img.get("src", "")
            if is_local(src):
                path = local_file(self.page_dir, src)
                mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
                img.set("src", f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}")


class _EmbedImagesExtension(Extension):
    def __init__(self, page_dir: Path):
        super().__init__()
        self.page_dir = page_dir

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.treeprocessors.register(_EmbedImages(md, self.page_dir), "embed_images", 0)


def stylesheet() -> str:
    return resources.files("tiertune.analysis").joinpath(STYLESHEET).read_text(encoding="utf-8")


def render(text: str, page_dir: Path, single_file: bool = False) -> str:
    """The HTML page of Markdown `text` whose relative links start at `page_dir`. The first
    `# heading` is the page title; a table of contents of the `##` sections follows it."""
    extensions: list = ["tables", "toc"]
    if single_file:
        extensions.append(_EmbedImagesExtension(page_dir))
    md = markdown.Markdown(extensions=extensions, extension_configs={"toc": {"toc_depth": "2-2"}},
                           output_format="html")
    body = md.convert(text)
    title = next((line[2:].strip() for line in text.splitlines() if line.startswith("# ")), "tiertune")
    toc = f'<nav class="toc" aria-label="Contents"><p>Contents</p>{md.toc}</nav>' if md.toc_tokens else ""
    head, sep, rest = body.partition("</h1>")
    body = head + sep + toc + rest if sep else toc + body
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{stylesheet()}</style></head>\n"
            f"<body><main>\n{body}\n</main></body></html>\n")


def write_page(md_path: Path, single_file: bool = False) -> Path:
    """Render `md_path` (an index.md) into the .html beside it; returns the HTML path."""
    md_path = Path(md_path)
    out = md_path.with_suffix(".html")
    atomic_write_text(out, render(md_path.read_text(encoding="utf-8"), md_path.parent, single_file))
    return out
