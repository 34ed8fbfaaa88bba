"""Write the API reference (docs/api.md) from chemtwin's docstrings.

Walks every public module of the package (``pkgutil``; a module is private when a part of its
name starts with ``_``), and writes for each: its docstring, then every public class and
function defined in it (not imported into it) with its signature and the first paragraph of
its docstring; for a class, its public methods and properties as well. Only the standard
library is used, and the output depends only on the code (sorted walk, no addresses, no
dates), so ``tests/test_project_files.py`` can rebuild it and compare it with the committed file.

    python scripts/build_api_docs.py              # writes docs/api.md
    python scripts/build_api_docs.py --out FILE   # anywhere else
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import chemtwin  # noqa: E402

HEADER = """# API reference

*Generated from the docstrings by `scripts/build_api_docs.py`; do not edit by hand (the test
`tests/test_project_files.py` fails when this file and the code disagree). The command-line
interface is described in the README and by `chemtwin COMMAND --help`; the design in
[architecture.md](architecture.md).*

Every public module of `chemtwin`, in alphabetical order; for each, its
docstring, then its public classes and functions with their signatures and the first
paragraph of their docstrings.
"""


def public_modules() -> list[str]:
    names = [chemtwin.__name__]
    for info in pkgutil.walk_packages(chemtwin.__path__, prefix="chemtwin."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def first_paragraph(doc: str | None) -> str:
    if not doc:
        return "*(no docstring)*"
    text = inspect.cleandoc(doc).split("\n\n")[0]
    return " ".join(line.strip() for line in text.splitlines())


def signature(obj) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"
    return re.sub(r" at 0x[0-9a-f]+", "", sig)  # never a memory address in a default's repr


def defined_here(module, obj) -> bool:
    return getattr(obj, "__module__", None) == module.__name__


def members(module) -> list[tuple[str, object]]:
    public = getattr(module, "__all__", None)
    out = []
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or (public is not None and name not in public):
            continue
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and defined_here(module, obj):
            out.append((name, obj))
    return out


def class_members(cls) -> list[str]:
    lines = []
    for name, attr in sorted(vars(cls).items()):
        if name.startswith("_"):
            continue
        if isinstance(attr, property):
            lines.append(f"* `{name}` (property): {first_paragraph(attr.__doc__)}")
        elif isinstance(attr, (staticmethod, classmethod)) or inspect.isfunction(attr):
            func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            kind = " (classmethod)" if isinstance(attr, classmethod) else " (staticmethod)" if isinstance(
                attr, staticmethod) else ""
            lines.append(f"* `{name}{signature(func)}`{kind}: {first_paragraph(func.__doc__)}")
    return lines


def module_section(name: str) -> list[str]:
    module = importlib.import_module(name)
    doc = inspect.cleandoc(module.__doc__) if module.__doc__ else "*(no module docstring)*"
    lines = [f"## `{name}`", "", doc, ""]
    for member, obj in members(module):
        if inspect.isclass(obj):
            lines += [f"### class `{member}`", "", "```python", f"{member}{signature(obj)}", "```", "",
                      first_paragraph(obj.__doc__), ""]
            methods = class_members(obj)
            if methods:
                lines += methods + [""]
        else:
            lines += [f"### `{member}()`", "", "```python", f"{member}{signature(obj)}", "```", "",
                      first_paragraph(obj.__doc__), ""]
    return lines


def build() -> str:
    names = public_modules()
    lines = [HEADER, "Modules:", ""]
    lines += [f"* [`{n}`](#{n.replace('.', '')})" for n in names]
    lines.append("")
    for name in names:
        lines += module_section(name)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "api.md"), help="output file (default docs/api.md)")
    args = parser.parse_args(argv)
    Path(args.out).write_text(build(), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
