"""The ``dsrewrite`` command: a thin click shell over the Python API.

Exit codes (decided in :func:`dsrewrite.errors.exit_code_for`, documented in README):
0 success; 1 a budget exceeded (``check``); 2 bad input (usage, config, model file, input
shape); 3 a model failed to load or trace (``check``); 70 an internal error.
"""

from __future__ import annotations

import functools
import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import ConfigError, DsrewriteError, ExitCode, exit_code_for
from .load import parse_dtype, parse_kwargs, parse_shape
from .settings import ModelSettings, OutputSettings, default_map, find_config


def model_options(fn):
    """Options shared by every command that loads a model."""
    @click.argument("model")
    @click.option("--input-shape", "input_shape", multiple=True, metavar="N,C,H,W",
                  help="Shape of one model input (repeat for several inputs). Default: the model file's "
                       "example_inputs()/INPUT_SHAPE, else 1,3,224,224.")
    @click.option("--dtype", default=None, metavar="DTYPE", help="Input (and floating parameter) dtype, e.g. float16.")
    @click.option("--arg", "args", multiple=True, metavar="KEY=VALUE",
                  help="Keyword argument for the model factory (repeatable); values are Python literals.")
    @click.option("--trust-pickle", is_flag=True,
                  help="Allow loading a pickled module from .pt/.pth (this runs code from the file).")
    @functools.wraps(fn)
    def wrapper(*a, model, input_shape, dtype, args, trust_pickle, **kw):
        settings = ModelSettings(
            spec=model,
            input_shapes=[parse_shape(s) for s in _as_list(input_shape)],
            dtype=parse_dtype(dtype) if dtype else None,
            kwargs=parse_kwargs(_as_list(args)),
            trust_pickle=trust_pickle,
        )
        return fn(*a, model_settings=settings, **kw)
    return wrapper


def output_options(formats: tuple[str, ...]):
    """``--format`` and ``-o``, shared by every command that writes a report."""
    def decorate(fn):
        @click.option("--format", "format", type=click.Choice(formats), default=formats[0], show_default=True,
                      help="Report format.")
        @click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
                      help="Write the report to this file (atomically) instead of stdout.")
        @functools.wraps(fn)
        def wrapper(*a, format, output, **kw):  # noqa: A002 (the option's name in pyproject is "format")
            return fn(*a, output_settings=OutputSettings(format, output), **kw)
        return wrapper
    return decorate


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    return list(value)


class _Cli(click.Group):
    """The command group; turns every failure into one line and a documented exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DsrewriteError as e:
            if (ctx.obj or {}).get("debug"):
                traceback.print_exc()
            click.echo(f"dsrewrite: error: {e}", err=True)
            ctx.exit(exit_code_for(e, ctx.invoked_subcommand or ""))
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("dsrewrite: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug in dsrewrite: still one line unless --debug
            if (ctx.obj or {}).get("debug"):
                traceback.print_exc()
            click.echo(f"dsrewrite: internal error: {type(e).__name__}: {e} "
                       "(re-run with --debug for the traceback)", err=True)
            ctx.exit(ExitCode.INTERNAL_ERROR)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dsrewrite")
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="Settings file (default: the nearest dsrewrite.toml, or pyproject.toml with [tool.dsrewrite]).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, config_file: str | None) -> None:
    """Profile every conv of a PyTorch model; rewrite heavy ones as depthwise-separable blocks."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    try:
        path = Path(config_file) if config_file else find_config()
        if config_file and not path.is_file():
            raise ConfigError(f"{config_file}: no such config file")
        ctx.obj["config"] = path
        # [tool.dsrewrite.<command>] fills the subcommand's defaults; flags still win.
        ctx.default_map = default_map(path)
    except DsrewriteError as e:
        click.echo(f"dsrewrite: error: {e}", err=True)
        ctx.exit(ExitCode.BAD_INPUT)


@cli.command()
@model_options
@output_options(("table", "markdown", "json", "csv"))
@click.option("--all", "show_all", is_flag=True, help="Show every conv in the table (default: the 60 costliest).")
def analyze(model_settings: ModelSettings, output_settings: OutputSettings, show_all: bool) -> None:
    """Show where a model's cost is, conv by conv.

    MODEL is a file (model.py, model.py:NAME), package.module:NAME, torchvision:NAME,
    timm:NAME, or a saved model (.pt/.pth/.pt2).
    """
    from .api import analyze_spec
    from .report import render_analysis

    ms = model_settings
    analysis = analyze_spec(ms.spec, ms.input_shapes, ms.dtype, ms.kwargs, ms.trust_pickle)
    text = render_analysis(analysis, output_settings.format, max_rows=None if show_all else 60)
    _emit(text, output_settings)


def _emit(text: str, out: OutputSettings) -> None:
    from .report import write_atomic

    if out.output:
        write_atomic(out.output, text)
        click.echo(f"wrote {out.output}", err=True)
    else:
        click.echo(text, nl=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="dsrewrite")


if __name__ == "__main__":
    main()
