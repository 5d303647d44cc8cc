"""Fetch the real-document corpus: Debian documentation packages, unpacked under
`.rag/corpus/` (git-ignored), and (with --fixtures) the few small documents the tests read,
copied or cut from them into tests/corpus/ (committed, so `make test` needs no network).

    python benchmarks/corpus.py                 # python3.11-doc, git-doc (about 15 MB)
    python benchmarks/corpus.py --pdf           # also texlive-latex-base-doc (85 MB)
    python benchmarks/corpus.py --pdf --fixtures

Needs Debian's `apt-get download` and `dpkg-deb` (no root). The packages are pinned by
version in `PACKAGES`; a newer Debian release serves other versions and this says so.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / ".rag" / "corpus"
FIXTURES = ROOT / "tests" / "corpus"
PY_HTML = "usr/share/doc/python3.11/html"
GIT_HTML = "usr/share/doc/git-doc"
TEX_DOC = "usr/share/doc/texlive-doc"
# package -> the version the fixtures and the README's figures come from (Debian 12)
PACKAGES = {"python3.11-doc": "3.11.2-6+deb12u8", "git-doc": "1:2.39.5-0+deb12u3"}
PDF_PACKAGES = {"texlive-latex-base-doc": "2022.20230122-3"}
# tests/corpus/NAME <- (package, path in it, PDF pages to keep (1-based) or None: whole)
FIXTURE_FILES = {
    "python-json.html": ("python3.11-doc", f"{PY_HTML}/library/json.html", None),
    "python-collections.html": ("python3.11-doc", f"{PY_HTML}/library/collections.html", None),
    "git-cat-file.html": ("git-doc", f"{GIT_HTML}/git-cat-file.html", None),
    "amsldoc-pages.pdf": ("texlive-latex-base-doc",
                          f"{TEX_DOC}/latex/amsmath/amsldoc.pdf", [2, 5, 29]),
    "tugboat-babelbib-p1.pdf": ("texlive-latex-base-doc",
                                f"{TEX_DOC}/bibtex/babelbib/tugboat-babelbib.pdf", [1]),
}


def fetch(package: str, version: str) -> Path:
    """`package` unpacked into .rag/corpus/PACKAGE (downloaded once)."""
    target = CORPUS / package
    if (target / ".done").exists():
        return target
    debs = CORPUS / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=debs, check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"cannot download {package}={version} with apt-get ({e}); on a Debian 12 "
                 "system run `apt-get update` first")
    deb = next(debs.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    (target / ".done").write_text(hashlib.sha256(deb.read_bytes()).hexdigest() + "\n")
    return target


def cut_pdf(source: Path, pages: list[int], out: Path) -> None:
    """The `pages` of `source` as a PDF of their own, each keeping its printed label."""
    from pypdf import PdfReader, PdfWriter

    reader = PdfReader(source)
    labelled = "/PageLabels" in reader.trailer["/Root"]
    writer = PdfWriter()
    for n in pages:
        writer.add_page(reader.pages[n - 1])
    for i, n in enumerate(pages):  # one label range per page: the labels are not a run
        label = reader.page_labels[n - 1]
        if not labelled:
            break
        style = "/r" if label.isalpha() and label.islower() else "/D"
        start = _roman(label) if style == "/r" else int(label)
        writer.set_page_label(i, i, style=style, start=start)
    writer.remove_links()  # links point at pages left out
    writer.compress_identical_objects(remove_duplicates=True, remove_unreferenced=True)
    with out.open("wb") as f:
        writer.write(f)


def _roman(label: str) -> int:
    values = {"i": 1, "v": 5, "x": 10, "l": 50, "c": 100}
    total = 0
    for a, b in zip(label, label[1:] + " ", strict=True):
        total += -values[a] if values.get(b, 0) > values[a] else values[a]
    return total


def write_fixtures(roots: dict[str, Path]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    lines = ["# Test corpus (built by benchmarks/corpus.py --pdf --fixtures)", "",
             "| file | from (Debian 12 package: path) |", "|---|---|"]
    for name, (package, path, pages) in FIXTURE_FILES.items():
        source = roots[package] / path
        if pages is None:
            shutil.copyfile(source, FIXTURES / name)
        else:
            cut_pdf(source, pages, FIXTURES / name)
        kept = f" (PDF pages {', '.join(map(str, pages))})" if pages else ""
        lines.append(f"| {name} | {package} {PACKAGES.get(package) or PDF_PACKAGES[package]}"
                     f": /{path}{kept} |")
    lines += ["", "Python documentation: PSF License; git documentation: GPL-2; amsmath "
              "and babelbib manuals: LPPL. Each is redistributable with its notice, which "
              "the files carry."]
    (FIXTURES / "SOURCES.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pdf", action="store_true", help="also the TeX Live manuals (85 MB)")
    ap.add_argument("--fixtures", action="store_true", help="rebuild tests/corpus/ (needs --pdf)")
    args = ap.parse_args()
    wanted = {**PACKAGES, **(PDF_PACKAGES if args.pdf or args.fixtures else {})}
    roots = {p: fetch(p, v) for p, v in wanted.items()}
    for p, root in roots.items():
        print(f"{p}: {root}")
    if args.fixtures:
        write_fixtures(roots)
        print(f"fixtures: {FIXTURES}")


if __name__ == "__main__":
    main()
