#!/usr/bin/env python3
"""Regenerates the committed seed corpus (fuzz/corpus/<target>/seed-*).

Every body the tests use is a seed: the fixture files, and every string literal
in the test and unit-test sources that looks like a body (starts with `<`, `{`
or `[` once a byte order mark and white space are stripped). `format!`
templates get their placeholders filled with plausible values. A few bodies
the tests build with helpers (`json!`, loops) are listed in EXTRA.

    python3 fuzz/seeds.py        # from the repository root or fuzz/
"""

import hashlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(
    path.relative_to(ROOT).as_posix()
    for folder in ("tests/relay/ingest", "tests/relay/delivery", "tests/relay/common")
    for path in (ROOT / folder).glob("*.rs")
) + [
    "src/postback/mod.rs",
    "src/postback/xml.rs",
    "src/postback/json.rs",
    "src/envelope.rs",
]
FIXTURES = sorted((ROOT / "tests/fixtures").glob("*"))

# Values for `format!` placeholders, by name; anything else becomes "x".
PLACEHOLDERS = {
    "tracking_id": "T_1",
    "to": "28444",
    "keyword": "hello",
    "code": "N401",
    "origin": "MMS_MO",
    "timestamp": "2021-02-03T18:27:54Z",
    "tracking": "TRACKINGID",
    "subject": "message_subject",
    "operator": "Operator-ID",
    "index": "0",
    "many_files": "<file>u0</file><file>u1</file>",
    "long": "xxxxxxxx",
    "wide": ',"f0":"v","f1":"v"',
    "prolog": "<?xml version='1.0'?>",
}

MO_XML = (
    "<postback><origin>MMS_MO</origin><code>N401</code><from>14085550000</from>"
    "<to>28444</to><keyword>k</keyword><tracking-id>T_1</tracking-id>"
    "<timestamp>2021-02-03T18:27:54Z</timestamp><content><file>https://m.example/T_1.jpg</file>"
    "</content></postback>"
)
# Bodies the tests build without a literal (json!, helpers, loops), and the
# non-XML/JSON bodies of the malformed-body test (for the ingest target).
EXTRA = [
    b'{"origin":"MMS_MO","code":"N401","from":"14085550000","to":"28444","tracking-id":"T_1",'
    b'"timestamp":"2021-02-03T18:27:54Z","content":[{"file":"https://m.example/T_1.jpg"}]}',
    b'{"origin":"MMS_MO","code":"N401","tracking-id":"TIME_json_3","timestamp":"2021-02-03T23:57:54.5+05:30"}',
    b"<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>TIME_xml_4</tracking-id>"
    b"<timestamp>2021-02-03 18:27:54+01:00</timestamp></postback>",
    "\ufeff<?xml version=\"1.0\" encoding=\"UTF-8\"?>".encode() + MO_XML.encode(),
    b"<?xml version='1.0' encoding='utf-8' standalone='yes'?>\r\n" + MO_XML.encode(),
    b"\n  <!-- a comment before the root -->\n" + MO_XML.encode(),
    b"<postback><origin>MMS_MO</origin><code>N401</code><tracking-id>BIG_1</tracking-id><padding>"
    + b"x" * 64 + b"</padding></postback>",
    b"hello, this is not a postback",
    b"origin=MMS_MO&code=N401",
    b"hello",
    b"nonsense",
    b"  \r\n ",
    b"",
]

LITERAL = re.compile(r'(b?)(r(#*)"|")')
MESSAGE = re.compile(rb"\{\w*(:[^}]*)?\}")


def decode_escapes(body, is_bytes):
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        n = body[i + 1]
        if n == "\n":  # line continuation: skip the newline and leading white space
            i += 2
            while i < len(body) and body[i] in " \t\n\r":
                i += 1
            continue
        simple = {"n": b"\n", "r": b"\r", "t": b"\t", "\\": b"\\", '"': b'"', "'": b"'", "0": b"\0"}
        if n in simple:
            out += simple[n]
            i += 2
        elif n == "x":
            value = int(body[i + 2 : i + 4], 16)
            out += bytes([value]) if is_bytes else chr(value).encode()
            i += 4
        elif n == "u":
            end = body.index("}", i)
            out += chr(int(body[i + 3 : end], 16)).encode()
            i = end + 1
        else:
            raise ValueError(f"unknown escape \\{n}")
    return bytes(out)


def literals(text):
    """Yields (decoded bytes, is_format_template) for every string literal."""
    i = 0
    while i < len(text):
        if text.startswith("//", i):
            i = text.find("\n", i)
            if i < 0:
                return
            continue
        if text[i] == "'":  # char literal or lifetime
            if text.startswith("'\\", i):
                i = text.index("'", i + 2) + 1
            elif i + 2 < len(text) and text[i + 2] == "'":
                i += 3
            else:
                i += 1
            continue
        m = LITERAL.match(text, i)
        if not m or (i > 0 and (text[i - 1].isalnum() or text[i - 1] == "_")):
            i += 1
            continue
        is_bytes = m.group(1) == "b"
        before = text[:i].rstrip()
        template = before.endswith("format!(")
        if m.group(2).startswith("r"):
            close = '"' + m.group(3)
            end = text.index(close, m.end())
            value = text[m.end() : end].encode()
            i = end + len(close)
        else:
            j = m.end()
            while text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            value = decode_escapes(text[m.end() : j], is_bytes)
            i = j + 1
        yield value, template


def fill(template):
    """Fills a `format!` template the way Rust reads it: left to right."""

    def one(m):
        if m.group(0) in ("{{", "}}"):
            return m.group(0)[0]
        # Positional `{}` are the `"[".repeat(20)` kind of arguments: left empty.
        return PLACEHOLDERS.get(m.group(1), "x" if m.group(1) else "")

    text = template.decode("utf-8", "replace")
    return re.sub(r"\{\{|\}\}|\{(\w*)(:[^}]*)?\}", one, text).encode()


def kind(body):
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "xml" if body.lstrip().startswith(b"<") else "other"
    text = text.lstrip("\ufeff").lstrip()
    if text.startswith("<"):
        return "xml"
    if text.startswith(("{", "[")):
        return "json"
    return "other"


def main():
    bodies = []  # (name, bytes), in discovery order, unique
    seen = set()

    def add(name, body):
        if body not in seen:
            seen.add(body)
            bodies.append((name, body))

    for path in FIXTURES:
        add("fixture-" + path.stem, path.read_bytes())
    for source in SOURCES:
        tag = pathlib.Path(source).with_suffix("").as_posix().replace("/", "-")
        for value, template in literals((ROOT / source).read_text()):
            if not template and MESSAGE.search(value) and b'"' not in value:
                continue  # an assertion message such as "{answer} for {what:?}"
            body = fill(value) if template else value
            if len(body.strip()) >= 2 and kind(body) != "other":
                add(tag, body)
    for body in EXTRA:
        add("extra", body)

    corpus = ROOT / "fuzz" / "corpus"
    for target in ["xml", "json", "ingest"]:
        directory = corpus / target
        directory.mkdir(parents=True, exist_ok=True)
        for old in directory.glob("seed-*"):
            old.unlink()
    selectors = {"xml": [1, 2, 0, 6], "json": [3, 4, 0, 5], "other": [0, 5, 1, 3]}
    counts = {"xml": 0, "json": 0, "ingest": 0}
    for name, body in bodies:
        k = kind(body)
        # Named (and the Content-Type picked) by content, so regenerating after
        # a test changes touches nothing else.
        digest = hashlib.sha1(body).digest()
        file_name = f"seed-{name}-{digest.hex()[:10]}"
        if k in ("xml", "json"):
            (corpus / k / file_name).write_bytes(body)
            counts[k] += 1
        selector = selectors[k][digest[0] % 4]
        (corpus / "ingest" / file_name).write_bytes(bytes([selector]) + body)
        counts["ingest"] += 1
    # Selector 7: the Content-Type comes from the input, up to a newline.
    (corpus / "ingest" / "seed-custom-content-type").write_bytes(
        b"\x07application/soap+xml; charset=\"utf-8\"\n" + MO_XML.encode()
    )
    counts["ingest"] += 1
    print(counts)


if __name__ == "__main__":
    main()
