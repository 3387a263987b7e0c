"""The ``dscompress`` command line.

Commands are loaded when they are run (click's lazy group), so ``dscompress --help`` and
``--version`` answer without importing torch. Every command is built in
:mod:`dscompress.cli.commands`; this module lists them, and turns a :class:`DscompressError` into one
line on stderr and exit status 2, a usage error likewise, and Ctrl-C into status 130.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

import click

from dscompress import __version__
from dscompress.core.errors import DscompressError

# Command -> one-line help, for the command list of ``dscompress --help`` (checked against the
# commands themselves by the tests).
COMMANDS = {
    "models": "List the models that can be named (your own: package.module:factory).",
    "convert": "Replace MODEL's convolutions by fitted depthwise-separable ones. Saves an artifact.",
    "calibrate": "Refit a converted or pruned model to its original on real images, without training. Saves an artifact.",
    "prune": "Remove MODEL's least important channels (Torch-Pruning). Saves an artifact.",
    "finetune": "Fine-tune MODEL by distillation from its original (or train it: --teacher none). Saves an artifact.",
    "equalize": "Equalize each depthwise-separable layer's halves for INT8 (cross-layer equalization), leaving its fp32 function as it was. Saves an artifact.",
    "evaluate": "Accuracy of MODEL on the test split: top-1/top-5, or mIoU and pixel accuracy (an artifact records it).",
    "export": "Export MODEL to ONNX and validate it on ONNX Runtime.",
    "quantize": "Quantize MODEL to an INT8 ONNX graph with ONNX Runtime's quantizer and measure it against fp32.",
    "validate": "Compare an ONNX file with the PyTorch model it came from, on each ONNX Runtime provider.",
    "bench": "Latency and throughput of models side by side, on PyTorch and ONNX Runtime.",
    "plan": "Choose per layer dense / depthwise-separable / pruned for a target speed-up on a runtime, and build it. Saves an artifact.",
    "profile": "Per-layer latency of MODEL on a runtime: where the time goes, and what converting could gain.",
    "report": "Compare artifact folders, folders of them, or run folders side by side.",
    "run": "Run a recipe end to end (continuing a stopped run) and print the comparison report.",
}


class LazyGroup(click.Group):
    """Imports the commands only when one is run or asked for."""

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module("dscompress.cli.commands").get_command(name)

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(name, text) for name, text in COMMANDS.items()])

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Errors as one line: bad input (DscompressError, usage) exits 2, Ctrl-C 130."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except DscompressError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except click.ClickException as e:
            click.echo(f"error: {e.format_message()}", err=True)
            sys.exit(e.exit_code)
        except (KeyboardInterrupt, click.exceptions.Abort) as e:
            click.echo(str(e) or "interrupted", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="dscompress")
def cli():
    """Make trained PyTorch CNNs smaller and faster: convert, prune, fine-tune, export, report.

    Shell completion: eval "$(_DSCOMPRESS_COMPLETE=bash_source dscompress)" (zsh_source, fish_source).
    """
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def main(argv: list[str] | None = None) -> None:
    """The console script: the current directory is importable (as with ``python -m``), so
    ``package.module:factory`` finds the user's own modules."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    cli.main(args=argv, prog_name="dscompress")


if __name__ == "__main__":
    main()
