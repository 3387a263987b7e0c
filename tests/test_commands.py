"""One vocabulary: every config field is an option with one name, one default and one help text,
on every command, in recipes and in error messages; the command list is the step registry."""

import dataclasses
import subprocess
import sys
import typing

import click
import pytest
import yaml

from dscompress.cli import commands
from dscompress.cli import main as cli_module
from dscompress.core.config import ConfigError, flag_name
from dscompress.pipeline import recipe
from dscompress.pipeline.steps import STEPS

STEP_NAMES = sorted(STEPS)


def options_of(command: click.Command) -> dict[str, click.Option]:
    return {name: p for p in command.params if isinstance(p, click.Option) for name in p.opts + p.secondary_opts}


@pytest.mark.parametrize("step", STEP_NAMES)
def test_every_config_field_is_an_option_with_help_and_no_second_default(step):
    spec = STEPS[step]
    command = commands.get_command(step)
    options = options_of(command)
    hints = typing.get_type_hints(spec.config)
    for f in dataclasses.fields(spec.config):
        flag = flag_name(f.name)
        assert flag in options, f"{step}: {f.name} has no {flag}"
        option = options[flag]
        assert option.default is None or option.default == (), f"{step} {flag}: the default lives in the config"
        assert f.metadata.get("help"), f"{step}.{f.name} has no help text"
        if hints[f.name] is bool:
            assert f"--no-{flag[2:]}" in options, f"{step} {flag}: a bool is --x/--no-x"
    assert "--json" in options
    if spec.output != "none":
        assert {"-o", "--output", "--force"} <= set(options)


@pytest.mark.parametrize("step", STEP_NAMES)
def test_recipes_take_the_same_names(step):
    """Each option, spelt as on the command line, is a recipe key (here set to its default)."""
    spec = STEPS[step]
    for f in dataclasses.fields(spec.config):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        target = {"macs-budget": 0.5} if step == "plan" else {}  # a plan needs one target
        options = yaml.safe_dump({flag_name(f.name)[2:]: default, **target}, default_flow_style=True).strip()
        text = f"model: {{name: resnet18}}\ndata: digits\nsteps:\n  - export: {{}}\n  - {step}: {options}\n"
        parsed = recipe.parse(text, "r.yaml")
        assert f.name in parsed.steps[1].options, (step, f.name)


def test_config_errors_name_the_option_as_typed():
    from dscompress.compress.convert import ConvertConfig

    with pytest.raises(ConfigError, match=r"^--macs-budget .*1\.5") as info:
        ConvertConfig(macs_budget=1.5)
    assert info.value.option == "macs_budget"


def test_the_command_list_is_the_registry():
    other = set(commands.OTHER_COMMANDS)
    assert set(cli_module.COMMANDS) == set(STEPS) | other
    assert cli_module.COMMANDS == {name: commands.summaries()[name] for name in cli_module.COMMANDS}


def test_help_and_version_do_not_import_torch():
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from dscompress.cli.main import cli\n"
        "for args in (['--help'], ['--version']):\n"
        "    assert CliRunner().invoke(cli, args).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
