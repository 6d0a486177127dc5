"""Bad input: the CLI prints one line per problem naming what is wrong, exits 2, and leaves no output folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fixtures import make_model
from mergesmith.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.err


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    base = make_model(root / "base", "llama", seed=0)
    return {"base": base, "ft": make_model(root / "ft", "llama", seed=1, base=base), "other": make_model(root / "wide", "llama_wide", seed=0),
            "mistral": make_model(root / "mistral", "mistral", seed=0)}


def lines_of(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


CASES = {
    "misspelled method": ("merge_method: task-arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n", ["unknown merge_method 'task-arithmetic'; did you mean 'task_arithmetic'?"]),
    "unknown top-level key": ("merge_method: linear\nmodles:\n  - model: {ft}\n", ["unknown key 'modles'; did you mean 'models'?"]),
    "misspelled parameter": (
        "merge_method: linear\nmodels:\n  - model: {ft}\n    parameters: {{wieght: 1.0}}\n",
        ["has no parameter 'wieght'; did you mean 'weight'?"],
    ),
    "missing required parameter": ("merge_method: linear\nmodels:\n  - model: {ft}\n", ["needs parameter 'weight' for model"]),
    "missing model folder": ("merge_method: linear\nmodels:\n  - model: {base}/../nope\n    parameters: {{weight: 1}}\n", ["nope': folder not found"]),
    "layer range out of bounds": (
        "merge_method: passthrough\nslices:\n  - sources:\n      - model: {ft}\n        layer_range: [2, 9]\n",
        ["layer_range [2, 9] is beyond model", "which has 4 layers"],
    ),
    "mismatched slice lengths": (
        "merge_method: linear\nparameters: {{weight: 1}}\nslices:\n  - sources:\n      - model: {ft}\n        layer_range: [0, 2]\n      - model: {base}\n        layer_range: [0, 3]\n",
        ["same number of layers"],
    ),
    "base model missing for task arithmetic": ("merge_method: task_arithmetic\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1}}\n", ["needs a base_model"]),
    "weights summing to zero": (
        "merge_method: linear\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1}}\n  - model: {base}\n    parameters: {{weight: -1}}\n",
        ["weights sum to 0"],
    ),
    "shape mismatch": (
        "merge_method: linear\nparameters: {{weight: 1}}\nslices:\n  - sources:\n      - model: {ft}\n        layer_range: [0, 3]\n      - model: {other}\n        layer_range: [0, 3]\n",
        ["shapes differ"],
    ),
    "different architecture classes": (
        "merge_method: linear\nparameters: {{weight: 1}}\nslices:\n  - sources:\n      - model: {ft}\n        layer_range: [0, 3]\n      - model: {mistral}\n        layer_range: [0, 3]\n",
        ["architectures differ", "LlamaForCausalLM", "MistralForCausalLM", "--allow-crimes"],
    ),
    "invalid yaml": ("merge_method: linear\nmodels: [\n", ["invalid YAML"]),
    "global parameter set per model": (
        "merge_method: linear\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1, normalize: false}}\n",
        ["'normalize' is a global parameter of linear"],
    ),
    "lora adapter not yet supported": ("merge_method: linear\nmodels:\n  - model: {ft}+some/adapter\n    parameters: {{weight: 1}}\n", ["LoRA adapters", "not supported yet"]),
    "hub id not in cache": ("merge_method: linear\nmodels:\n  - model: nobody/no-such-model\n    parameters: {{weight: 1}}\n", ["not in the Hugging Face cache", "never downloads"]),
    "unknown dtype": ("merge_method: linear\ndtype: bf17\nmodels:\n  - model: {ft}\n    parameters: {{weight: 1}}\n", ["unknown dtype 'bf17'"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_config_is_one_line_exit_2_and_no_output(case, models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    text, expected = CASES[case]
    config = write(tmp_path, text.format(**models))
    out = tmp_path / "merged"
    code, err = run_cli(capsys, "merge", str(config), str(out), "--quiet")
    assert code == 2, err
    errors = lines_of(err)
    assert errors, err
    assert "Traceback" not in err
    for fragment in expected:
        assert any(fragment in line for line in errors), (fragment, errors)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_every_problem_is_reported_not_just_the_first(models, tmp_path, capsys):
    config = write(tmp_path, "merge_method: linear\nmodels:\n  - model: /nope/a\n    parameters: {weight: 1}\n  - model: /nope/b\n    parameters: {weight: 1}\n")
    code, err = run_cli(capsys, "merge", str(config), str(tmp_path / "out"), "--quiet")
    assert code == 2
    assert len(lines_of(err)) == 2 and "/nope/a" in err and "/nope/b" in err


def test_failure_during_execution_leaves_no_folder(models, tmp_path, monkeypatch):
    import mergesmith
    from mergesmith.execute import pipeline

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(pipeline, "compute", explode)
    config = write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['ft']}\n    parameters: {{weight: 1}}\n")
    with pytest.raises(RuntimeError):
        mergesmith.merge(config, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yml"]


def test_refuses_to_replace_a_folder_that_is_not_a_merge(models, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "precious.txt").write_text("keep me")
    config = write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['ft']}\n    parameters: {{weight: 1}}\n")
    code, err = run_cli(capsys, "merge", str(config), str(tmp_path / "out"), "--quiet")
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out" / "precious.txt").read_text() == "keep me"
    # a previous merge is replaced without asking, as mergekit users expect when re-running
    assert run_cli(capsys, "merge", str(config), str(tmp_path / "out"), "--quiet", "--overwrite")[0] == 0
    assert run_cli(capsys, "merge", str(config), str(tmp_path / "out"), "--quiet")[0] == 0
    assert not (tmp_path / "out" / "precious.txt").exists()


def test_allow_crimes_merges_matching_shapes_across_classes(models, tmp_path, capsys):
    text = CASES["different architecture classes"][0].format(**models)
    config = write(tmp_path, text)
    code, err = run_cli(capsys, "merge", str(config), str(tmp_path / "out"), "--quiet", "--allow-crimes")
    assert code == 0, err
    assert "warning: architectures differ" in err


def test_mergekit_flags_are_accepted(models, tmp_path, capsys):
    config = write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['ft']}\n    parameters: {{weight: 1}}\n")
    code, err = run_cli(
        capsys, "merge", str(config), str(tmp_path / "out"), "--lazy-unpickle", "--no-low-cpu-memory", "--no-allow-crimes", "-v", "--no-cuda", "-j", "2",
        "--copy-tokenizer", "--write-model-card", "--trust-remote-code", "--random-seed", "3", "--out-shard-size", "1B", "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_console_script_runs_as_a_user_would(models, tmp_path):
    config = write(tmp_path, f"merge_method: linear\nmodels:\n  - model: {models['ft']}\n    parameters: {{weight: 1}}\n")
    done = subprocess.run([sys.executable, "-m", "mergesmith.cli", "merge", str(config), str(tmp_path / "out"), "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nothing written" in done.stdout and not (tmp_path / "out").exists()
    bad = subprocess.run([sys.executable, "-m", "mergesmith.cli", "merge", str(tmp_path / "missing.yml"), str(tmp_path / "out")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == f"error: {tmp_path / 'missing.yml'}: config file not found"


def test_methods_command_lists_parameters(capsys):
    assert main(["methods", "task_arithmetic"]) == 0
    out = capsys.readouterr().out
    assert "lambda" in out and "weight" in out and "needs base_model" in out


def test_a_closed_output_pipe_is_no_traceback():
    # `mergesmith methods | head -1`: the reader leaves before the listing is written
    child = subprocess.Popen([sys.executable, "-m", "mergesmith.cli", "methods"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait() == 141
    assert "Traceback" not in err
