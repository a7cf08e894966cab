"""The configuration snippets of docs/callers.md, as the client tests use them.

A snippet is the fenced block right after a `<!-- snippet: NAME -->` line. `snippet(NAME)`
returns its text; `for_host(text, paths)` puts the test's paths in place of the documented
host paths, and nothing else:

    the vmrun binary          /usr/local/bin/vmrun
    vmrun's state roots       /run/containerd/vmrun (containerd), /run/vmrun (the rest)
    vmrun's configuration     /etc/vmrun/vmrun.toml

Each documented path the caller replaces must be in the snippet (a doc edit that drops one
fails the test instead of silently testing less), and the text is compared whole-string, so
`/run/vmrun` never touches `/run/containerd/vmrun`.

`add_keys(doc, extra)` merges a test's own settings (its root, state and socket paths, CNI
directories...) into a parsed snippet: it may add tables and keys, never change a value the
snippet sets (that raises).
"""

from __future__ import annotations

import re
from pathlib import Path

CALLERS_MD = Path(__file__).resolve().parents[2] / "docs" / "callers.md"
MEMORY_MD = CALLERS_MD.parent / "memory.md"

# The documented host paths a test may replace.
VMRUN_BINARY = "/usr/local/bin/vmrun"
CONTAINERD_ROOT = "/run/containerd/vmrun"
VMRUN_ROOT = "/run/vmrun"
VMRUN_CONFIG = "/etc/vmrun/vmrun.toml"
HOST_PATHS = (VMRUN_BINARY, CONTAINERD_ROOT, VMRUN_ROOT, VMRUN_CONFIG)

_MARKER = re.compile(r"^<!-- snippet: ([a-z0-9-]+) -->\n```([a-z]*)\n(.*?)^```$", re.M | re.S)
_FENCE = re.compile(r"^```([a-z]*)\n", re.M)


def all_snippets(path: Path = CALLERS_MD) -> dict[str, tuple[str, str]]:
    """name -> (language, text) of every marked snippet."""
    found: dict[str, tuple[str, str]] = {}
    for match in _MARKER.finditer(path.read_text()):
        name, language, text = match.groups()
        if name in found:
            raise ValueError(f"{path}: snippet {name!r} is marked twice")
        found[name] = (language, text)
    return found


def unmarked_config_blocks(path: Path = CALLERS_MD) -> list[str]:
    """The first line of each toml/json/yaml block with no snippet marker before it."""
    text = path.read_text()
    unmarked = []
    for match in _FENCE.finditer(text):
        if match.group(1) not in ("toml", "json", "yaml"):
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        if not before.startswith("<!-- snippet: "):
            unmarked.append(text[match.end():].split("\n", 1)[0])
    return unmarked


def snippet(name: str, path: Path = CALLERS_MD) -> str:
    snippets = all_snippets(path)
    if name not in snippets:
        raise KeyError(f"{path} has no snippet {name!r} (has {sorted(snippets)})")
    return snippets[name][1]


def for_host(text: str, paths: dict[str, str | Path]) -> str:
    """`text` with each documented host path (a key of `paths`, one of HOST_PATHS) replaced."""
    unknown = set(paths) - set(HOST_PATHS)
    if unknown:
        raise ValueError(f"not a documented host path: {sorted(unknown)}")
    missing = [doc for doc in paths if not re.search(rf"(?<![\w/.-]){re.escape(doc)}(?![\w/.-])", text)]
    if missing:
        raise ValueError(f"the snippet no longer names {missing}:\n{text}")
    for doc, mine in paths.items():
        text = re.sub(rf"(?<![\w/.-]){re.escape(doc)}(?![\w/.-])", lambda _: str(mine), text)
    return text


def add_keys(doc: dict, extra: dict, *, keep_doc: bool = False, where: str = "") -> dict:
    """A copy of `doc` with the tables and keys of `extra` added. A key the doc sets to
    another value is an error (the test would no longer run the documented config), or,
    with keep_doc (`extra` is a client env's own full config), keeps the doc's value."""
    merged = dict(doc)
    for key, value in extra.items():
        name = f"{where}.{key}" if where else key
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = add_keys(merged[key], value, keep_doc=keep_doc, where=name)
        elif merged[key] != value and not keep_doc:
            raise ValueError(f"the test would change the documented {name} = {merged[key]!r} to {value!r}")
    return merged


def memory_figure(name: str, path: Path = MEMORY_MD) -> float:
    """A figure docs/memory.md marks as `<!-- figure: NAME -->VALUE` (a number)."""
    match = re.search(rf"<!-- figure: {re.escape(name)} -->\**([0-9.]+)", path.read_text())
    if not match:
        raise KeyError(f"{path} marks no figure {name!r}")
    return float(match.group(1))
