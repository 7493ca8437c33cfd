"""Every notebook runs top to bottom in quick mode through a real Jupyter kernel."""
import pytest

from experiments.notebooks import execute_notebook, has_outputs, notebook_paths, strip_outputs

NOTEBOOKS = notebook_paths()


def test_the_notebooks_exist():
    names = [p.stem for p in NOTEBOOKS]
    for stem in ["01_toy_slow_sde", "02_sync_rules", "03_sharpness_probes",
                 "04_drift_vs_sharpness_cifar10", "05_generalization", "06_local_sgd_convergence"]:
        assert stem in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    assert not has_outputs(path), f"{path.name} carries outputs: run `python -m experiments.notebooks` helpers' strip_outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_quick_mode(path, tmp_path):
    nb = execute_notebook(path, quick=True, timeout=600, save_to=tmp_path / path.name)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_strip_outputs_removes_outputs(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1")
    cell.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "2"}, execution_count=1)]
    cell.execution_count = 1
    nb.cells.append(cell)
    path = tmp_path / "x.ipynb"
    nbformat.write(nb, path)
    assert has_outputs(path)
    strip_outputs(path)
    assert not has_outputs(path)
