"""The dependency rule of the package, kept by a test (no Ray, no models; reads the source).

Layers, bottom to top. A module may import modules of its own layer or of a layer below it,
never one above; an import inside a function body counts like any other. The graph has no cycle.

    foundation  config, config_quality, config_study, students, storage, layout, data, textfiles,
                textsource, metrics, stats, console, ray_utils, gpu_table
    core        models, prompts, label_tree, scoring, label_expand, annotator, finetune,
                peft_methods, multi_adapter, calibration, review, distill, study_grid,
                study_report                                                    (no Ray)
    stages      stage, trainer, annotate, classify, bert, train_peft, tune, tune_report, study,
                study_downstream, teacher_labels, report_teacher, report, bench,
                plan_measure, plan_cluster, plan, plan_render                   (the dry run)
    pipeline    pipeline            (the only module that knows the stage order)
    entry       cli                 (and jobs/, scripts/, benchmarks/, outside the package)
                fake_cluster, fake_head, spot_provider   (the autoscaling rehearsal's tooling,
                used by scripts/ and tests/, imported by no pipeline module)

A new module must be placed in a layer here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lambert_ray"

LAYERS: list[tuple[str, set[str]]] = [
    ("foundation", {"config", "config_quality", "config_study", "students", "storage", "layout",
                    "data", "textfiles", "textsource", "metrics", "stats", "console", "ray_utils",
                    "gpu_table"}),
    ("core", {"models", "prompts", "label_tree", "scoring", "label_expand", "annotator",
              "finetune", "peft_methods", "multi_adapter", "calibration", "review", "distill",
              "study_grid", "study_report"}),
    ("stages", {"stage", "trainer", "annotate", "classify", "bert", "train_peft", "tune", "study",
                "study_downstream", "tune_report", "teacher_labels", "report_teacher", "report", "bench",
                "plan_measure", "plan_cluster", "plan", "plan_render"}),
    ("pipeline", {"pipeline"}),
    ("entry", {"cli", "fake_cluster", "fake_head", "spot_provider"}),
]
LEVEL = {module: level for level, (_, modules) in enumerate(LAYERS) for module in modules}
CORE = LAYERS[1][1]


def package_modules() -> list[str]:
    return sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_modules(module: str) -> set[str]:
    """The lambert_ray modules `module` imports anywhere in its source (function bodies too)."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from lambert_ray import storage` names modules; `from lambert_ray.x import y` x
            names = ([f"{node.module}.{a.name}" for a in node.names]
                     if node.module == "lambert_ray" else [node.module])
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "lambert_ray" and len(parts) > 1:
                found.add(parts[1])
    found.discard(module)
    return found


def test_every_module_is_placed_in_a_layer():
    unplaced = [m for m in package_modules() if m not in LEVEL]
    assert not unplaced, f"put these modules in a layer of LAYERS: {unplaced}"


def test_no_module_imports_a_module_above_it():
    upward = [f"{m} ({LAYERS[LEVEL[m]][0]}) imports {dep} ({LAYERS[LEVEL[dep]][0]})"
              for m in package_modules() for dep in sorted(imported_modules(m))
              if LEVEL[dep] > LEVEL[m]]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph = {m: imported_modules(m) for m in package_modules()}
    done: set[str] = set()

    def visit(m: str, path: list[str]) -> None:
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(m):], m]))
        if m in done:
            return
        for dep in sorted(graph[m]):
            visit(dep, [*path, m])
        done.add(m)

    for m in graph:
        visit(m, [])


def test_the_package_never_imports_its_entry_points():
    for m in package_modules():
        tree = ast.parse((PACKAGE / f"{m}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] not in ("jobs", "tests", "benchmarks"), m


@pytest.mark.timeout(600)  # a hang guard: the imports take seconds idle, minutes under load
def test_core_and_foundation_import_without_ray():
    modules = sorted(CORE | LAYERS[0][1])
    code = (f"import sys\nfor m in {modules!r}:\n    __import__('lambert_ray.' + m)\n"
            "assert 'ray' not in sys.modules, sorted(k for k in sys.modules if k.startswith('ray'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
