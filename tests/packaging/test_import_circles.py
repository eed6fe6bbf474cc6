"""No import circle among fastbert's modules (scripts/import_circles.py), and the check can see one."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("import_circles", ROOT / "scripts" / "import_circles.py")
import_circles = importlib.util.module_from_spec(spec)
spec.loader.exec_module(import_circles)


def test_fastbert_has_no_import_circle():
    assert import_circles.circles(ROOT / "fastbert") == []


def test_a_circle_is_found(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("import pkg.a\n")
    (package / "c.py").write_text("def f():\n    from pkg import a\n")  # a lazy import is no edge
    assert import_circles.circles(package) == [["pkg.a", "pkg.b"]]
