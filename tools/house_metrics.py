#!/usr/bin/env python3
"""How easy the house is to change, measured from the source (no build needed).

Prints the largest files and functions under crates/, and the import cycles between the
modules of each crate (a module `a` that names `crate::b` while `b` names `crate::a`,
directly or through others). Used before and after refactors; the numbers go in the note.

    python3 tools/house_metrics.py [--top 12]
    python3 tools/house_metrics.py --check   # only the cycles; exit 1 if there is one (CI)
"""
import argparse
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent / "crates"
FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(async\s+)?(unsafe\s+)?fn\s+(\w+)")


def functions(path):
    lines = path.read_text().splitlines()
    out = []
    i = 0
    while i < len(lines):
        m = FN.match(lines[i])
        if not m:
            i += 1
            continue
        depth, start, opened = 0, i, False
        j = i
        while j < len(lines):
            code = re.sub(r"//.*", "", lines[j])
            code = re.sub(r"'.'|\"(\\.|[^\"\\])*\"", "", code)
            depth += code.count("{") - code.count("}")
            opened = opened or "{" in code
            if opened and depth <= 0:
                break
            if not opened and code.rstrip().endswith(";"):
                break
            j += 1
        if opened:
            out.append((j - start + 1, f"{path.relative_to(ROOT.parent)}:{start + 1} {m.group(5)}"))
        i = start + 1
    return out


def module_of(src, path):
    rel = path.relative_to(src).with_suffix("")
    return tuple(p for p in rel.parts if p not in ("lib", "main", "mod"))


def resolve(modules, base, names):
    """The longest module path among `modules` that `base + names` starts with."""
    best = None
    for k in range(1, len(names) + 1):
        cand = base + tuple(names[:k])
        if cand in modules:
            best = cand
    return best


def cycles(crate):
    src = crate / "src"
    if not src.is_dir():
        return []
    files = {module_of(src, p): p for p in src.rglob("*.rs")}
    modules = set(files)
    edges = {}
    for me, path in files.items():
        if me and me[-1] == "tests":
            continue
        text = re.sub(r"#\[cfg\(test\)\]\s*mod tests\s*\{.*", "", path.read_text(), flags=re.S)
        text = re.sub(r"//.*", "", text)
        # Flatten `use a::{b, c::d}` into `a::b`, `a::c::d` (one level of braces).
        def flat(m):
            head, body = m.group(1), m.group(2)
            return " ".join(head + part.strip() for part in body.split(","))
        for _ in range(3):
            text = re.sub(r"((?:crate|super|self)(?:::\w+)*::)\{([^{}]*)\}", flat, text)
        targets = set()
        for root, rest in re.findall(r"\b(crate|super)((?:::\w+)+)", text):
            names = rest.strip(":").split("::")
            if root == "crate":
                t = resolve(modules, (), names)
            else:
                t = resolve(modules, me[:-1], names)
            if t is not None and t != me and not (len(t) < len(me) and me[: len(t)] == t):
                targets.add(t)
        edges[me] = targets
    # Strongly connected components (Tarjan).
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w == v:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--check", action="store_true", help="fail on an import cycle")
    args = ap.parse_args()
    if args.check:
        found = [(c.name, comp) for c in sorted(ROOT.iterdir()) for comp in cycles(c)]
        for name, comp in found:
            print(f"import cycle in {name}: {' <-> '.join('::'.join(m) for m in comp)}")
        sys.exit(1 if found else 0)
    files = sorted(((len(p.read_text().splitlines()), str(p.relative_to(ROOT.parent))) for p in ROOT.rglob("*.rs")), reverse=True)
    print(f"largest files ({len(files)} .rs files, {sum(n for n, _ in files)} lines):")
    for n, name in files[: args.top]:
        print(f"  {n:5}  {name}")
    fns = sorted((f for p in ROOT.rglob("*.rs") if "/tests/" not in str(p) for f in functions(p)), reverse=True)
    print(f"largest functions outside tests/ ({len(fns)} functions; over 60 lines: {sum(1 for n, _ in fns if n > 60)}):")
    for n, name in fns[: args.top]:
        print(f"  {n:5}  {name}")
    print("module import cycles (within each crate's src/):")
    for crate in sorted(ROOT.iterdir()):
        for comp in cycles(crate):
            print(f"  {crate.name}: {' <-> '.join('::'.join(c) or 'lib' for c in comp)}")


if __name__ == "__main__":
    main()
