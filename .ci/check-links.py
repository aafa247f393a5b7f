#!/usr/bin/env python3
"""Check the relative links of the Markdown documentation (Python 3 stdlib only).

Every relative link and `#anchor` in README.md, docs/**/*.md, fuzz/README.md
and deploy/**/*.md must resolve: the file (or directory) exists, and an anchor
into a Markdown file matches one of its headings, slugged the way GitHub does
it. External links (http, https, mailto) are not fetched (CI has no network):
they are counted as skipped. A bad link fails with file:line and the link.

Usage: .ci/check-links.py [FILE.md ...]   (default: the files above)
"""

import glob
import os
import re
import sys
from urllib.parse import unquote

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_GLOBS = ["README.md", "docs/**/*.md", "fuzz/README.md", "deploy/**/*.md"]
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, //host

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"""<a\s[^>]*(?:name|id)\s*=\s*["']([^"']+)["']""", re.I)
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); target may be <in angle brackets>.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)(?:\s+[^)]*)?\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
AUTOLINK = re.compile(r"<((?:https?|mailto):[^>\s]+)>", re.I)


def lines_outside_code(path):
    """(line number, text) of the lines outside fenced code blocks: a fenced
    block holds neither links nor headings."""
    fence = None
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            m = FENCE.match(line)
            if fence:
                if m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence):
                    fence = None
                continue
            if m:
                fence = m.group(1)
                continue
            yield number, line.rstrip("\n")


def slug(heading):
    """GitHub's anchor for a heading: the rendered text, lowercased, without
    punctuation (letters, digits, `_` and `-` stay), spaces turned into `-`."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links: their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


_anchors = {}


def anchors(path):
    """Every anchor a Markdown file offers: heading slugs (a repeated slug gets
    -1, -2 ... as on GitHub) and explicit <a name|id="..."> anchors."""
    if path not in _anchors:
        found, seen = set(), {}
        for _, line in lines_outside_code(path):
            found.update(HTML_ANCHOR.findall(line))
            h = HEADING.match(line)
            if not h:
                continue
            base = slug(h.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
        _anchors[path] = found
    return _anchors[path]


def links(path):
    """(line number, target) of every link in a Markdown file."""
    for number, line in lines_outside_code(path):
        # Inline code holds no links: blank it out, keeping the columns.
        line = INLINE_CODE.sub(lambda c: " " * len(c.group(0)), line)
        for m in INLINE_LINK.finditer(line):
            yield number, m.group(1)
        m = REFERENCE_DEF.match(line)
        if m:
            yield number, m.group(1)
        for m in AUTOLINK.finditer(line):
            yield number, m.group(1)


def check(path, counts):
    """The bad links of one file, as `file:line: message` strings."""
    errors = []
    rel = os.path.relpath(path, ROOT)
    for number, target in links(path):
        target = target.strip("<>")
        where = f"{rel}:{number}: {target}"
        if EXTERNAL.match(target):
            counts["external"] += 1
            continue
        counts["checked"] += 1
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if not file_part:
            dest = path
        elif file_part.startswith("/"):
            dest = os.path.join(ROOT, file_part.lstrip("/"))
        else:
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
        if os.path.relpath(dest, ROOT).split(os.sep)[0] == "..":
            errors.append(f"{where}: points outside the repository")
            continue
        if not os.path.exists(dest):
            errors.append(f"{where}: no such file {os.path.relpath(dest, ROOT)}")
            continue
        if anchor and dest.endswith(".md") and os.path.isfile(dest):
            offered = anchors(dest)
            if unquote(anchor) not in offered and unquote(anchor).lower() not in offered:
                errors.append(f"{where}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    return errors


def main(argv):
    if argv:
        files = [os.path.abspath(a) for a in argv]
    else:
        files = sorted({os.path.normpath(f) for g in DEFAULT_GLOBS
                        for f in glob.glob(os.path.join(ROOT, g), recursive=True)})
    counts = {"checked": 0, "external": 0}
    errors = []
    for path in files:
        errors += check(path, counts)
    for e in errors:
        print(f"FAIL: {e}", file=sys.stderr)
    print(f"links: {len(files)} Markdown files, {counts['checked']} relative links checked, "
          f"{len(errors)} bad, {counts['external']} external skipped (not fetched)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
