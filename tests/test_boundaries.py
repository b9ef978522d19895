"""Import boundaries: the hidden gold stays in the sandbox; layers import downward only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "preflab"

GOLD = "preflab.sandbox.gold"
GOLD_READERS = ("preflab.sandbox", "preflab.report")
# package -> prefixes it must never import
FORBIDDEN = {
    "preflab.quality": ("preflab.store", "preflab.web", "torch", "sqlalchemy", "fastapi"),
    "preflab.losses": ("preflab.store", "preflab.web", "sqlalchemy", "fastapi"),
    "preflab.store": ("preflab.collect", "preflab.quality", "preflab.train", "preflab.evaluate",
                      "preflab.web", "preflab.pipeline", "preflab.demo", "preflab.cli"),
    "preflab.models": ("preflab.store", "preflab.train", "preflab.evaluate", "preflab.web",
                       "preflab.pipeline", "preflab.demo", "preflab.cli"),
    "preflab.train": ("preflab.web", "preflab.evaluate", "preflab.pipeline", "preflab.demo", "preflab.cli"),
    "preflab.evaluate": ("preflab.pipeline", "preflab.demo", "preflab.cli"),
    "preflab.web": ("preflab.pipeline", "preflab.demo", "preflab.cli"),
    "preflab.sandbox": ("preflab.web", "preflab.pipeline", "preflab.demo", "preflab.cli", "preflab.train",
                        "preflab.evaluate"),
}
LIGHT_AT_IMPORT = ("preflab", "preflab.config")


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, modname: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = modname if path.name == "__init__.py" else modname.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def violations(pkg_dir: Path = PKG, root: Path = ROOT) -> list[str]:
    """Forbidden imports in the package, as ``'module imports target'`` lines."""
    bad: set[str] = set()
    for path in sorted(pkg_dir.rglob("*.py")):
        mod = module_name(path, root)
        for target in imports_of(path, mod):
            if (target == GOLD or target.startswith(GOLD + ".")) and not mod.startswith(GOLD_READERS):
                bad.add(f"{mod} imports {GOLD} (only sandbox/ and report/ may read the gold)")
            for layer, banned in FORBIDDEN.items():
                if mod == layer or mod.startswith(layer + "."):
                    for b in banned:
                        if target == b or target.startswith(b + "."):
                            bad.add(f"{mod} imports {b} (forbidden for {layer})")
    return sorted(bad)


def test_package_respects_boundaries():
    assert violations() == []


@pytest.mark.parametrize(
    "where, source",
    [
        ("preflab/train/sneaky.py", "from preflab.sandbox.gold import gold_utility\n"),
        ("preflab/evaluate/sneaky.py", "import preflab.sandbox.gold as g\n"),
        ("preflab/train/sneaky.py", "from preflab.sandbox import gold\n"),
        ("preflab/evaluate/sneaky.py", "from ..sandbox.gold import WEIGHTS\n"),
        ("preflab/quality/sneaky.py", "from preflab.store import db\n"),
        ("preflab/losses/sneaky.py", "import fastapi\n"),
    ],
)
def test_checker_catches_planted_bad_module(tmp_path, where, source):
    fake = tmp_path / "preflab"
    for d in ("train", "evaluate", "quality", "losses", "sandbox"):
        (fake / d).mkdir(parents=True, exist_ok=True)
        (fake / d / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (tmp_path / where).write_text(source)
    found = violations(fake, tmp_path)
    assert len(found) == 1 and "sneaky" in found[0]


def test_sandbox_may_read_gold(tmp_path):
    fake = tmp_path / "preflab" / "sandbox"
    fake.mkdir(parents=True)
    (fake / "raters.py").write_text("from preflab.sandbox.gold import gold_utility\n")
    assert violations(tmp_path / "preflab", tmp_path) == []


def test_import_preflab_is_light():
    import subprocess
    import sys

    code = (
        "import sys; import preflab, preflab.config, preflab.cli;"
        "heavy=[m for m in ('torch','fastapi','sqlalchemy','transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""
