# The layout a reader meets (README.md, "How the code is laid out"): the root's Python files are the pipeline's stages
# and the entry points a user runs; everything else lives in the safety/ package. Stage scripts never import each
# other (model.py, the GPT every stage builds, excepted), and the package never imports a root script.
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"prepare.py", "label.py", "reflect.py", "model.py", "train.py", "finetune.py", "attack.py", "probe.py"}
ENTRY_POINTS = {"study.py", "report.py", "sample.py", "export_hf.py", "gpu_check.py"}


def imported_modules(source):
    """Every top-level module name a source imports, wherever the import stands (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def root_scripts():
    return sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def package_files():
    return sorted(os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "safety"))
                  for f in files if f.endswith(".py"))


def test_the_root_shows_the_pipeline():
    assert set(root_scripts()) == STAGES | ENTRY_POINTS, sorted(set(root_scripts()) ^ (STAGES | ENTRY_POINTS))
    assert os.path.isfile(os.path.join(ROOT, "safety", "__init__.py"))


def test_the_import_check_finds_an_import_anywhere():
    # the check below can fail: an import inside a function, a from-import and a dotted import are all found
    src = "import os\ndef f():\n    from train import main\n    import attack.sub\nfrom safety.common import fail\n"
    assert imported_modules(src) == {"os", "train", "attack", "safety"}


def test_stage_scripts_never_import_each_other():
    scripts = {f[:-3] for f in root_scripts()}
    for name in root_scripts():
        other = imported_modules(open(os.path.join(ROOT, name)).read()) & scripts - {name[:-3], "model"}
        assert not other, f"{name} imports the root script(s) {sorted(other)}; what two stages share lives in safety/"


def test_the_package_never_imports_a_root_script():
    scripts = {f[:-3] for f in root_scripts()}
    for path in package_files():
        bad = imported_modules(open(path).read()) & scripts
        assert not bad, f"{os.path.relpath(path, ROOT)} imports the root script(s) {sorted(bad)}"
