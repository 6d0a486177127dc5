"""`mergesmith check`: an inventory of the inputs and a verdict, from config.json and headers only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from fixtures import make_model
from mergesmith.commands import check as check_command
from mergesmith.errors import MergesmithError


def run_check(capsys, *args: str) -> tuple[int, str, str]:
    """Run `mergesmith check` as the CLI does (only this subcommand registered: others may be mid-edit)."""
    import argparse

    parser = argparse.ArgumentParser(prog="mergesmith")
    check_command.register(parser.add_subparsers(dest="command"))
    parsed = parser.parse_args(["check", *args])
    try:
        code = parsed.handler(parsed)
    except MergesmithError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=__import__("sys").stderr)
        code = exc.exit_code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = make_model(root / "base", "llama", seed=0)
    models = {"base": base, "ft": make_model(root / "ft", "llama", seed=1, base=base),
              "wide": make_model(root / "wide", "llama_wide", seed=0), "tied": make_model(root / "tied", "llama_tied", seed=0)}  # fmt: skip
    for name, change in {"big": {"hidden_size": 24}, "theta": {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}}}.items():
        config = transformers.LlamaConfig.from_pretrained(base)
        for key, value in change.items():
            setattr(config, key, value)
        models[name] = root / name
        transformers.LlamaForCausalLM(config).save_pretrained(models[name])
    return models


def write(tmp_path: Path, text: str, **models: Path) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text.format(**{k: str(v) for k, v in models.items()}))
    return path


TWO = "merge_method: linear\nparameters: {{weight: 1}}\nmodels:\n  - model: {a}\n  - model: {b}\n"


def test_compatible_models_get_an_inventory_and_the_planned_output(zoo, tmp_path, capsys, monkeypatch):
    from mergesmith.io import source_model

    def no_reads(*args, **kwargs):
        raise AssertionError("check must not read tensor data")

    monkeypatch.setattr(source_model, "read_tensor", no_reads)
    code, out, err = run_check(capsys, str(write(tmp_path, TWO, a=zoo["base"], b=zoo["ft"])))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["model", "path", "architecture"] and "fingerprint" in lines[0]
    base_row, ft_row = lines[1].split(), lines[2].split()
    assert base_row[2:9] == ["LlamaForCausalLM", "llama", "4", "16", "64", "float32", "11.41K"]  # 2 x 64x16 + 16 + 4 x 2336
    assert base_row[-2] == "no" and base_row[-1] == ft_row[-1]  # untied; same fingerprint: safe tensor by tensor
    assert lines[-1] == f"compatible: merge_method linear, 39 tensors, 0.000 GB ({11408 * 4} bytes), 4 layers"


def test_fingerprint_and_tied_column_tell_models_apart(zoo, tmp_path, capsys):
    code, out, err = run_check(capsys, str(write(tmp_path, TWO, a=zoo["base"], b=zoo["tied"])))
    assert code == 0, err
    base_row, tied_row = out.splitlines()[1].split(), out.splitlines()[2].split()
    assert tied_row[-2] == "yes" and base_row[-1] != tied_row[-1]


@pytest.mark.parametrize(
    "other, expected",
    [
        ("big", ["hidden_size: 16 in '{a}', 24 in '{b}' (tensor shapes differ"]),
        ("wide", ["intermediate_size: 32 in '{a}', 48 in '{b}'"]),
        ("theta", ["rope_parameters.rope_theta: 10000.0 in '{a}', 500000.0 in '{b}'; pass --allow-crimes"]),
    ],
)
def test_differing_config_fields_are_one_line_each(zoo, tmp_path, capsys, other, expected):
    code, out, err = run_check(capsys, str(write(tmp_path, TWO, a=zoo["base"], b=zoo[other])))
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(expected), errors
    for fragment, line in zip(expected, errors):
        assert fragment.format(a=zoo["base"], b=zoo[other]) in line
    assert "fingerprint" in out  # the inventory is printed even when the merge is refused


def test_allow_crimes_turns_a_rope_difference_into_a_warning(zoo, tmp_path, capsys):
    code, out, err = run_check(capsys, str(write(tmp_path, TWO, a=zoo["base"], b=zoo["theta"])), "--allow-crimes")
    assert code == 0 and "compatible" in out
    assert "warning: rope_parameters.rope_theta" in err


def test_plan_problems_are_reported_too(zoo, tmp_path, capsys):
    slerp = "merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\n"
    code, _, err = run_check(capsys, str(write(tmp_path, slerp, a=zoo["base"], b=zoo["ft"], c=zoo["tied"])))
    assert code == 2 and "slerp takes exactly 1 model besides the base model, got 2" in err and "methods that take N models" in err
    beyond = "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 6]\n"
    code, _, err = run_check(capsys, str(write(tmp_path, beyond, a=zoo["base"])))
    assert code == 2 and "which has 4 layers" in err


def test_missing_tensor_is_named(zoo, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((zoo["ft"] / "config.json").read_text())
    state = load_file(zoo["ft"] / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_check(capsys, str(write(tmp_path, TWO, a=zoo["base"], b=broken)))
    assert code == 2 and f"model '{broken}' has no tensor model.layers.2.mlp.up_proj.weight" in err
