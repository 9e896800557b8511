"""`vramtrace diff` output: rich tables on a terminal, or Markdown, from ``diff_runs``'s dict."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vramtrace.diff.compare import GROUPS
from vramtrace.render.units import fmt_bytes, fmt_signed_bytes

MAX_ROWS = 20


def _pct(growth: float | None) -> str:
    return "new" if growth is None else f"{growth:+.1f}%"


def _names(diff: dict) -> tuple[str, str]:
    return (", ".join(diff["a"]["files"]) or diff["a"]["label"],
            ", ".join(diff["b"]["files"]) or diff["b"]["label"])


def _where(side: dict) -> str:
    idx = ", ".join(f"{u['index']}" for u in side["units"])
    return f"event {idx}" + (" (phase not found: fallback)" if side["fallback"] else "")


def _row_name(row: dict, fields: tuple[str, ...]) -> list[str]:
    out = []
    for f in fields:
        v = str(row.get(f, "-"))
        if f == "stack":
            v = " < ".join(reversed(v.split(";")[-3:]))    # innermost three frames, innermost first
        out.append(v)
    return out


def headline(diff: dict) -> str:
    """One line: the peaks and their change."""
    p = diff["peak"]
    return (f"peak allocated: {fmt_bytes(p['a'])} -> {fmt_bytes(p['b'])} "
            f"({fmt_signed_bytes(p['delta'])}, {_pct(p['growth_pct'])})")


def render_text(diff: dict, console: Console) -> None:
    a, b = _names(diff)
    console.print(f"[bold]A[/bold] {a}\n[bold]B[/bold] {b}")
    console.print(f"[bold]{headline(diff)}[/bold]")
    for pair in diff.get("unit_pairs", []):
        console.print(f"  {pair['a']} -> {pair['b']}: {fmt_bytes(pair['a_peak'])} -> "
                      f"{fmt_bytes(pair['b_peak'])} ({fmt_signed_bytes(pair['delta'])})")
    fields = GROUPS[diff["group"]]
    for point in diff["points"]:
        console.print()
        console.print(f"[bold]{point['label']}[/bold]: {fmt_bytes(point['a']['allocated'])} -> "
                      f"{fmt_bytes(point['b']['allocated'])} allocated ({fmt_signed_bytes(point['delta'])}); "
                      f"A {_where(point['a'])}, B {_where(point['b'])}")
        for line in point["explanation"]:
            console.print(f"  {line}")
        _table(console, "by owner", ("owner",), point["by_owner"])
        _table(console, f"by {' x '.join(fields)}", fields, point["rows"])


def _table(console: Console, title: str, fields: tuple[str, ...], rows: list[dict]) -> None:
    table = Table(title=title, title_justify="left")
    for f in fields:
        table.add_column(f, overflow="fold")
    for col in ("A", "B", "delta"):
        table.add_column(col, justify="right")
    shown = [r for r in rows if r["a"] or r["b"]]
    for r in shown[:MAX_ROWS]:
        colour = "red" if r["delta"] > 0 else "green" if r["delta"] < 0 else ""
        delta = fmt_signed_bytes(r["delta"])
        table.add_row(*_row_name(r, fields), fmt_bytes(r["a"]), fmt_bytes(r["b"]),
                      f"[{colour}]{delta}[/{colour}]" if colour else delta)
    if len(shown) > MAX_ROWS:
        rest = shown[MAX_ROWS:]
        table.add_row(f"... {len(rest)} more", *[""] * (len(fields) - 1),
                      fmt_bytes(sum(r["a"] for r in rest)), fmt_bytes(sum(r["b"] for r in rest)),
                      fmt_signed_bytes(sum(r["delta"] for r in rest)))
    console.print(table)


def render_markdown(diff: dict) -> str:
    a, b = _names(diff)
    out = ["# vramtrace diff", "", f"- **A** `{a}`", f"- **B** `{b}`", f"- {headline(diff)}", ""]
    fields = GROUPS[diff["group"]]
    for point in diff["points"]:
        out += [f"## {point['label']}", "",
                f"{fmt_bytes(point['a']['allocated'])} -> {fmt_bytes(point['b']['allocated'])} allocated "
                f"({fmt_signed_bytes(point['delta'])}); A {_where(point['a'])}, B {_where(point['b'])}", ""]
        out += [f"- {line}" for line in point["explanation"]] + [""]
        for title, cols, rows in (("by owner", ("owner",), point["by_owner"]),
                                  (f"by {' x '.join(fields)}", fields, point["rows"])):
            out += [f"### {title}", "", "| " + " | ".join(cols) + " | A | B | delta |",
                    "|" + "---|" * len(cols) + "---:|---:|---:|"]
            out += ["| " + " | ".join(f"`{v}`" for v in _row_name(r, cols)) +
                    f" | {fmt_bytes(r['a'])} | {fmt_bytes(r['b'])} | {fmt_signed_bytes(r['delta'])} |"
                    for r in [r for r in rows if r["a"] or r["b"]][:MAX_ROWS]]
            out.append("")
    return "\n".join(out)


def _rank_rows(report: dict) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for key in ("at_point", "peak_allocated", "peak_reserved"):
        s = report["totals"][key]
        label = f"allocated at {report['at']}" if key == "at_point" else key.replace("_", " ")
        rows.append((label, fmt_bytes(s["sum"]), f"{fmt_bytes(s['max'])} ({s['max_rank']})",
                     fmt_bytes(s["min"]), f"{100 * s['imbalance']:.1f}%"))
    return rows


RANK_HEAD = ("figure", "sum", "max (rank)", "min", "imbalance")
MERGED_HEAD = ("sum", "max (rank)", "min", "imbalance")


def _merged_cells(r: dict) -> tuple[str, str, str, str]:
    return (fmt_bytes(r["sum"]), f"{fmt_bytes(r['max'])} ({r['max_rank']})", fmt_bytes(r["min"]),
            f"{100 * r['imbalance']:.1f}%")


def render_ranks_text(report: dict, console: Console) -> None:
    """`vramtrace report R0 R1 ...`: merged totals, merged breakdowns, largest vs smallest rank."""
    console.print(f"[bold]{len(report['ranks'])} ranks[/bold]: {', '.join(r['rank'] for r in report['ranks'])}")
    table = Table(title="ranks together", title_justify="left")
    for col in RANK_HEAD:
        table.add_column(col, justify="left" if col == "figure" else "right")
    for row in _rank_rows(report):
        table.add_row(*row)
    console.print(table)
    for key, rows in report["merged"].items():
        t = Table(title=f"{key.replace('_', ' ')}, all ranks", title_justify="left")
        t.add_column("name", overflow="fold")
        for col in MERGED_HEAD:
            t.add_column(col, justify="right")
        for r in rows[:MAX_ROWS]:
            t.add_row(r["name"], *_merged_cells(r))
        console.print(t)
    vs = report.get("largest_vs_smallest")
    if vs:
        console.print(f"[bold]largest rank {vs['b']} vs smallest {vs['a']}[/bold] at their peaks: "
                      f"{fmt_signed_bytes(vs['delta'])}")
        for line in vs["explanation"]:
            console.print(f"  {line}")


def render_ranks_markdown(report: dict) -> str:
    out = [f"# vramtrace report: {len(report['ranks'])} ranks", "",
           "| " + " | ".join(RANK_HEAD) + " |", "|---|---:|---:|---:|---:|"]
    out += ["| " + " | ".join(row) + " |" for row in _rank_rows(report)]
    for key, rows in report["merged"].items():
        out += ["", f"## {key.replace('_', ' ')}, all ranks", "",
                "| name | " + " | ".join(MERGED_HEAD) + " |", "|---|---:|---:|---:|---:|"]
        out += [f"| `{r['name']}` | " + " | ".join(_merged_cells(r)) + " |" for r in rows[:MAX_ROWS]]
    vs = report.get("largest_vs_smallest")
    if vs:
        out += ["", f"## largest rank `{vs['b']}` vs smallest `{vs['a']}`: {fmt_signed_bytes(vs['delta'])}", ""]
        out += [f"- {line}" for line in vs["explanation"]]
    return "\n".join(out) + "\n"
