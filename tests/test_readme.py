"""The README's commands and its code example stay true."""

import pathlib
import re

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_loss_example_runs():
    block = README.split("<!-- readme-example")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert np.isfinite(float(scope["loss"]))
    assert scope["grads"].shape == (8, 10) and np.all(np.isfinite(scope["grads"]))
    assert -1.0 <= float(scope["loss"]) <= 0.0


def test_ci_runs_exactly_the_readme_test_command():
    commands = re.search(r"## The three commands\n\n```bash\n(.*?)```", README, re.S).group(1)
    test_cmd = [l.split("#")[0].strip() for l in commands.splitlines() if "pytest" in l][0]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci
    assert "pip install -r requirements.txt" in commands
    assert "python -m experiments.quickstart" in commands


def test_readme_evaluation_example_names_the_real_api():
    import dataclasses
    import inspect

    from experiments import evaluation_api
    block = README.split("<!-- readme-eval-example")[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    compile(code, "README.md", "exec")  # runs an evaluation: checked, not executed
    assert list(inspect.signature(evaluation_api.evaluate_checkpoint).parameters) == [
        "workdir_or_weights", "eval_config"]
    import ast
    calls = [n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
             and getattr(n.func, "id", "") == "get_eval_config"]
    assert calls and all(k.arg in evaluation_api.get_eval_config() for k in calls[0].keywords)
    fields = {f.name for f in dataclasses.fields(evaluation_api.Report)}
    for attr in re.findall(r"report\.(\w+)", code):
        assert attr in fields or hasattr(evaluation_api.Report, attr), attr
