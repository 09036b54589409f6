"""The README: its demo excerpt has the line structure the demo's code prints (its numbers are one run's), its
links resolve, and it stays short.

The excerpt is checked against the code, not against a stored copy: every text line must be one the printing
code can produce (the f-strings passed to ``console.say`` or printed with the ``[cytoray]`` marker, with the
templates of the functions they call, such as ``stage_line`` and ``progress_line``), every line the demo's
recipes say must appear, and the two tables must be what ``validation.format_results_table`` and
``probe.comparison_table`` render from the excerpt's own values. So a changed, added or dropped line fails here
until the excerpt is regenerated from a clean ``make demo``.
"""

import ast
import os
import re

import pytest

from cytoray.eval import probe, validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# What prints the demo's terminal lines: the recipes, the curation pipeline, the training loop, the per-checkpoint
# probe, the probe recipe and the console ("full log: ...").
PRINTERS = ["recipes/demo.py", "recipes/pretrain.py", "cytoray/curation/pipeline.py", "cytoray/platform/train.py",
            "cytoray/eval/validation.py", "cytoray/eval/probe.py", "cytoray/console.py"]
SAID_IN_FULL = PRINTERS[:3]  # every line these say is in the demo's output (it calls probe's functions, not main)
MARKER = "[cytoray] "  # worker lines with it reach the terminal without it (cytoray.console)
MIN_LITERAL = 6  # templates with less fixed text (e.g. "{table}") say nothing about a line's structure


def _name(func: ast.AST) -> str | None:
    return getattr(func, "id", getattr(func, "attr", None))


def excerpt() -> list[str]:
    text = open(README).read()
    start = text.index("`make demo` prints exactly this")
    body = text[text.index("```\n", start) + 4:]
    return body[:body.index("```\n")].rstrip("\n").splitlines()


class Templates:
    """The printed f-strings of PRINTERS as regexes (a formatted value: any text, or a called function's templates)."""

    def __init__(self):
        self.returns: dict[str, list[ast.JoinedStr]] = {}
        self.printed: list[tuple[str, ast.AST]] = []
        for rel in PRINTERS:
            tree = ast.parse(open(os.path.join(REPO, rel)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.FunctionDef):
                    for ret in ast.walk(node):
                        if isinstance(ret, ast.Return) and isinstance(ret.value, ast.JoinedStr):
                            self.returns.setdefault(node.name, []).append(ret.value)
                elif isinstance(node, ast.Call) and _name(node.func) in ("say", "print") and node.args and not any(
                        k.arg == "file" for k in node.keywords):  # print(..., file=sys.stderr): error lines
                    self.printed.append((rel, node.args[0]))

    def regex(self, node) -> tuple[str, int]:
        """(regex, number of literal characters) of a printed expression."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return re.escape(node.value), len(node.value)
        if isinstance(node, ast.Call) and _name(node.func) in self.returns:
            alts = [self.regex(t) for t in self.returns[_name(node.func)]]
            return "(?:" + "|".join(a for a, _ in alts) + ")", min(n for _, n in alts)
        if not isinstance(node, ast.JoinedStr):
            return "(?:.*?)", 0
        out, literal = [], 0
        for part in node.values:
            if isinstance(part, ast.Constant):
                out.append(re.escape(part.value))
                literal += len(part.value)
            else:
                sub, n = self.regex(part.value)
                out.append(sub)
                literal += n
        return "".join(out), literal

    def lines(self, files=PRINTERS) -> list[tuple[str, re.Pattern]]:
        """(source, pattern) of every printed line that shows on the terminal."""
        found = []
        for rel, node in self.printed:
            if rel not in files:
                continue
            rx, literal = self.regex(node)
            marked = re.escape(MARKER) in rx
            rx = rx.replace(re.escape(MARKER), "")
            shown = marked or rel != "cytoray/platform/train.py"  # the loop's unmarked prints go to the log
            if shown and literal >= MIN_LITERAL:
                found.append((f"{rel}: {ast.unparse(node)[:70]}", re.compile(rx, re.S)))
        return found


def _table_after(lines: list[str], intro: str, printed) -> list[str]:
    """The table that follows the line starting with ``intro``: header, rule, rows up to the next printed line."""
    i = next(k for k, line in enumerate(lines) if line.startswith(intro)) + 1
    assert set(lines[i + 1]) == {"-"}, lines[i:i + 2]
    end = i + 2
    while end < len(lines) and not any(p.fullmatch(lines[end]) for _, p in printed):
        end += 1
    return lines[i:end]


def _checkpoint_table(block: list[str]) -> list[dict]:
    """validation.read_results_table rows from the per-checkpoint table's text."""
    cols = [c.rsplit(":", 1) for c in block[0].split()[1:]]
    rows = []
    for line in block[2:]:
        step, *values = line.split()
        rows += [{"step": step, "manifest": m, "method": k, "balanced_accuracy": v} for (m, k), v in zip(cols, values)]
    return rows


def _probe_results(block: list[str]) -> list[dict]:
    """probe.run_probe's results, as far as probe.comparison_table shows them, from the table's text (one result per
    checkpoint and manifest; after a blank line, the Robustness Index block: intro, header, rows)."""
    results: dict[tuple[str, str], dict] = {}
    rows = block[2:]
    blank = rows.index("") if "" in rows else len(rows)
    for line in rows[:blank]:
        checkpoint, manifest, method, in_site, mean, *worst = line.split()
        r = results.setdefault((checkpoint, manifest), {"checkpoint": checkpoint, "manifest": manifest, "methods": {}})
        score = {"balanced_accuracy": float(in_site)}
        if method == "ABMIL":
            r["mil"] = score
        else:
            r["methods"][method] = score
        if mean != "-":
            cross = {"mean": {"balanced_accuracy": float(mean)},
                     "per_site": {worst[1]: {"balanced_accuracy": float(worst[0])}}}
            if method == "ABMIL":
                score["cross_site"] = cross
            else:
                r.setdefault("cross_site", {"methods": {}})["methods"][method] = cross
    for line in rows[blank + 3:]:
        checkpoint, manifest, k, ri, share = line.split()
        results[(checkpoint, manifest)]["robustness"] = {
            "k": int(k), "robustness_index": None if ri == "-" else float(ri),
            "biology_share": None if share == "-" else float(share)}
    return list(results.values())


def test_readme_demo_excerpt_has_the_demo_line_structure():
    lines = excerpt()
    assert len(lines) > 30 and lines[-1].startswith("full log: ")
    templates = Templates()
    printed = templates.lines()
    checkpoint_table = _table_after(lines, "probe of every scored checkpoint", printed)
    assert "\n".join(checkpoint_table) == validation.format_results_table(_checkpoint_table(checkpoint_table))
    probe_table = _table_after(lines, "probe (balanced accuracy): ", printed)
    assert "\n".join(probe_table) == probe.comparison_table(_probe_results(probe_table))
    text = [line for line in lines if line not in checkpoint_table + probe_table]
    unknown = [line for line in text if not any(p.fullmatch(line) for _, p in printed)]
    assert not unknown, "README excerpt lines the code does not print (regenerate from `make demo`):\n" + \
        "\n".join(unknown)
    missing = [src for src, p in templates.lines(SAID_IN_FULL) if not any(p.fullmatch(line) for line in text)]
    assert not missing, "lines the demo prints that the README excerpt lacks:\n" + "\n".join(missing)
    assert sum(bool(re.fullmatch(r"step \d+/\d+ loss .*", line)) for line in text) >= 2  # the training's pace


@pytest.mark.parametrize("line", ["ingest: 1571 files -> 1535 images retained, 55 quarantined [3.1s]",
                                  "step 50/300 loss 9.2365 lr 9.74e-04 118.7 img/s ETA 3m38s",
                                  "run: $PWD/runs/demo/pretrain"])
def test_a_line_the_code_does_not_print_is_caught(line):
    assert not any(p.fullmatch(line) for _, p in Templates().lines())


def test_readme_links_resolve_and_it_stays_short():
    text = open(README).read()
    assert len(text.encode()) <= 15 * 1024, "README.md over 15 KB: move detail to docs/ and link it"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert os.path.exists(os.path.join(REPO, target)), target
