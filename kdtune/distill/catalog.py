"""What `kdtune methods list` and `kdtune methods show NAME` print: every method's parameters, allowed values,
search ranges and source paper, read from the methods' own declarations (nothing here restates them)."""
from __future__ import annotations

from kdtune.config import Param
from kdtune.distill.registry import method_class, method_names


def _search_text(param: Param) -> str:
    if param.search in ("link_sets", "fsp_pairs"):
        return "the pair's " + ("link sets" if param.search == "link_sets" else "FSP pairs")
    if isinstance(param.search, tuple) and param.numeric:
        low, high = param.search
        return f"[{low:g}, {high:g}]" + (" log" if param.log else "")
    if isinstance(param.search, tuple):
        return "{" + ", ".join(map(str, param.search)) + "}"
    return "-"


def method_list() -> str:
    rows = [("method", "reads", "parameters", "what it is")]
    for name in method_names():
        cls = method_class(name)
        rows.append((name, ",".join(sorted(cls.reads)) or "-", ", ".join(p.name for p in cls.params) or "-",
                     cls.describe()))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}".rstrip() for r in rows]
    lines.append("\nkdtune methods show NAME: a method's parameters, ranges and paper; your own method: "
                 "package.module:Class (README, 'Your own method')")
    return "\n".join(lines)


def method_show(ref: str) -> str:
    cls = method_class(ref)
    lines = [f"{ref}: {cls.describe()}", f"paper: {cls.paper or '-'}",
             f"reads: {', '.join(sorted(cls.reads)) or 'labels only'}; teacher: {'yes' if cls.needs_teacher else 'no'}"]
    rows = [("parameter", "default", "allowed", "searched", "")]
    for p in cls.params:
        rows.append((p.name, repr(p.formatted(p.default)) if p.default is not None else "None (derived)",
                     p.allowed(), _search_text(p), p.help))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines += [f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:<{widths[3]}}  {r[4]}".rstrip()
              for r in rows] if cls.params else ["  no parameters of its own"]
    lines.append("set one for every trial with --set NAME=VALUE; the shared keys (lr, epochs, optimizer, ...) apply "
                 "to every method")
    return "\n".join(lines)
