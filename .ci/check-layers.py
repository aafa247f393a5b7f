#!/usr/bin/env python3
"""The import drawing of src/: no circle, and no arrow back up the layers.

docs/architecture.md draws the relay as layers; this script reads every
`crate::<module>` path in the code (comments left out) and fails when a
module imports one from a higher layer, or when the imports between the
top-level modules form a circle. A new module must be given a layer here,
which is the point: where it sits is a decision, written down.
"""
import pathlib
import re
import sys

# Bottom to top. A module may use modules of its own layer or below.
LAYERS = [
    ("leaves", ["clock", "load", "logging", "live", "watch", "proxy_protocol", "tls", "postback", "envelope", "signing"]),
    ("configuration", ["config"]),
    ("rules", ["routing", "access"]),
    ("storage", ["store"]),
    ("serving", ["metrics", "http_server"]),
    ("delivery", ["delivery"]),
    ("intake", ["ingest", "quarantine"]),
    ("operator interface", ["admin"]),
    ("wiring", ["relay", "ops", "simulate"]),
    ("command line", ["cli", "main"]),
]
# Arrows the layers would allow but the flow forbids: ingest hands postbacks
# to the store and the router only; the store hands committed jobs on.
FORBIDDEN = {("ingest", "delivery")}
LEVEL = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
LAYER_NAME = {module: name for name, modules in LAYERS for module in modules}

src = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "src")
problems = []
edges = {}  # module -> {used module: first place}


def strip_comments(text):
    """The code without // and /* */ comments (doc links are not imports)."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return "\n".join(re.sub(r"//.*$", "", line) for line in text.splitlines())


def used_modules(code):
    """Top-level modules named after `crate::`, including `use crate::{a, b::c}`."""
    found = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
    for group in re.findall(r"\bcrate::\{([^}]*(?:\{[^}]*\}[^}]*)*)\}", code, flags=re.S):
        depth = 0
        item = ""
        for ch in group + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                name = item.strip().split("::")[0].strip()
                if re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name != "self":
                    found.add(name)
                item = ""
            else:
                item += ch
    return found


for path in sorted(src.rglob("*.rs")):
    relative = path.relative_to(src)
    if relative.parts[0] == "bin":
        continue
    module = relative.parts[0].removesuffix(".rs")
    if module == "lib":
        continue
    if module not in LEVEL:
        problems.append(f"{path}: module `{module}` has no layer in .ci/check-layers.py (add it where it belongs)")
        continue
    code = strip_comments(path.read_text())
    for used in used_modules(code):
        if used == module:
            continue
        if used not in LEVEL:
            problems.append(f"{path}: uses `crate::{used}`, which has no layer in .ci/check-layers.py")
            continue
        edges.setdefault(module, {}).setdefault(used, str(path))
        if (module, used) in FORBIDDEN:
            problems.append(f"{path}: `{module}` must not use `{used}` (the flow runs through the store)")
        if LEVEL[used] > LEVEL[module]:
            problems.append(
                f"{path}: `{module}` ({LAYER_NAME[module]}) uses `{used}` ({LAYER_NAME[used]}), a higher layer"
            )

# Circles among the top-level modules (same-layer imports could still form one).
WHITE, GREY, BLACK = 0, 1, 2
colour = {module: WHITE for module in LEVEL}
stack = []


def visit(module):
    colour[module] = GREY
    stack.append(module)
    for used in sorted(edges.get(module, {})):
        if colour.get(used) == GREY:
            circle = stack[stack.index(used):] + [used]
            problems.append("import circle: " + " -> ".join(circle))
        elif colour.get(used) == WHITE:
            visit(used)
    stack.pop()
    colour[module] = BLACK


for module in sorted(LEVEL):
    if colour[module] == WHITE:
        visit(module)

if problems:
    print("FAIL: the import drawing of src/ (see docs/architecture.md):", file=sys.stderr)
    for problem in problems:
        print("  " + problem, file=sys.stderr)
    sys.exit(1)
count = sum(len(used) for used in edges.values())
print(f"import drawing: {len(edges)} modules, {count} arrows, no circle, none upward")
