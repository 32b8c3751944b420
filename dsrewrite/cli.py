"""The ``dsrewrite`` command: a thin click shell over the Python API.

Exit codes (decided in :func:`dsrewrite.errors.exit_code_for`, documented in README):
0 success; 1 a budget exceeded (``check``); 2 bad input (usage, config, model file, input
shape); 3 a model failed to load or trace (``check``); 70 an internal error.
"""

from __future__ import annotations

import functools
import traceback
from pathlib import Path

import click

from . import __version__
from .errors import ConfigError, DsrewriteError, ExitCode, UsageError, exit_code_for
from .settings import ModelSettings, OutputSettings, default_map, find_config

from .presets import names as preset_names

# Nothing above imports torch: ``dsrewrite --help`` and ``dsrewrite CMD --help`` answer without
# loading it. Each command imports what it needs when it runs.


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
    @click.option("--max-memory", default=None, metavar="SIZE",
                  help="Memory a real forward may take when shapes cannot be propagated without one (a "
                       "data-dependent layer), e.g. 4GiB. Default: 80% of the memory available.")
    @functools.wraps(fn)
    def wrapper(*a, model, input_shape, dtype, args, trust_pickle, max_memory, **kw):
        from .load import parse_dtype, parse_kwargs, parse_shape

        settings = ModelSettings(
            spec=model,
            input_shapes=[parse_shape(s) for s in _as_list(input_shape)],
            dtype=parse_dtype(dtype) if dtype else None,
            kwargs=parse_kwargs(_as_list(args)),
            trust_pickle=trust_pickle,
            max_memory=_parse_memory(max_memory),
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


def rules_options(fn):
    """``--rules`` and ``--set``, shared by analyze and convert."""
    @click.option("--rules", "rules", default="default", show_default=True, metavar="PRESET|FILE.toml",
                  help=f"Rule preset ({', '.join(preset_names())}) or a TOML rules file.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                  help="Override one rules key, e.g. --set replace.min_in_channels=128 (repeatable).")
    @functools.wraps(fn)
    def wrapper(*a, rules, overrides, **kw):
        from .rules import load_rules

        return fn(*a, rule_config=load_rules(rules, _as_list(overrides)), **kw)
    return wrapper


def _parse_memory(text: str | None) -> float | None:
    if text is None:
        return None
    from .units import SizeText, byte_style, parse_bytes

    try:
        value = parse_bytes(text)
    except ValueError as e:
        raise UsageError(f"--max-memory: {e}") from None
    if value <= 0:
        raise UsageError(f"--max-memory must be positive, got {text!r}")
    return SizeText(value, byte_style(text))


def _memory_limit(text: str) -> int | None:
    """``--calibration-memory``: bytes, or None for 'none' (no bound); 0 keeps every activation on disk."""
    if text.strip().lower() in ("none", "unlimited"):
        return None
    from .units import parse_bytes

    try:
        return int(parse_bytes(text))
    except ValueError:
        raise UsageError(f"--calibration-memory takes a size such as 512MiB (0: everything on disk) or 'none', "
                         f"got {text!r}") from None


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
@rules_options
@click.option("--all", "show_all", is_flag=True, help="Show every conv in the table (default: the 60 costliest).")
@click.option("--groups", is_flag=True,
              help="Show the channel groups instead: channels that must keep the same width, and whether "
                   "each group can be resized (convert --align / --width).")
@click.option("--by", "by", type=click.Choice(("conv", "module")), default="conv", show_default=True,
              help="conv: one row per conv call and what convert would do; module: every module as a tree with "
                   "its params (trainable/frozen), MACs and shares.")
@click.option("--depth", type=int, default=None, metavar="N",
              help="With --by module: show modules down to N levels (deeper ones are summed into their parents).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages (the report is still printed).")
def analyze(model_settings: ModelSettings, output_settings: OutputSettings, rule_config, show_all: bool,
            groups: bool, by: str, depth: int | None, quiet: bool) -> None:
    """Show where a model's cost is, conv by conv (or module by module), and what convert would do.

    MODEL is a file (model.py, model.py:NAME), package.module:NAME, torchvision:NAME,
    timm:NAME, or a saved model (.pt/.pth/.pt2).

    \b
    Examples:
      dsrewrite analyze examples/resnet.py
      dsrewrite analyze torchvision:resnet50 --input-shape 8,3,224,224 --all
      dsrewrite analyze torchvision:resnet50 --by module --depth 2
      dsrewrite analyze model.py:build --arg width=64 --format json -o report.json
    """
    from .api import analyze_spec
    from .plan import plan_conversion
    from .report import render_analysis

    ms = model_settings
    if depth is not None and depth < 0:
        raise UsageError(f"--depth must be 0 or more, got {depth}")
    if depth is not None and by != "module":
        raise UsageError("--depth applies to --by module")
    if groups and by == "module":
        raise UsageError("give --groups or --by module, not both")
    analysis = analyze_spec(ms.spec, ms.input_shapes, ms.dtype, ms.kwargs, ms.trust_pickle, ms.max_memory)
    if by == "module":
        from .report import render_modules

        _emit(render_modules(analysis, output_settings.format, depth), output_settings, quiet)
        return
    if groups:
        from .report import render_groups

        _emit(render_groups(analysis.channel_groups(), output_settings.format, ms.spec, show_all), output_settings,
              quiet)
        return
    plan = plan_conversion(analysis, rule_config)
    text = render_analysis(analysis, output_settings.format, max_rows=None if show_all else 60, plan=plan)
    _emit(text, output_settings, quiet)


@cli.command()
@model_options
@rules_options
@click.option("--format", "format", type=click.Choice(("table", "markdown", "json")), default="table",
              show_default=True, help="Format of what is printed (the plan, or the report when no --report).")
@click.option("--dry-run", is_flag=True,
              help="Print the plan (what would change and why) in --format; with -o, write it there. Change nothing.")
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False), default=None, metavar="PLAN.json",
              help="Apply this saved plan (from --dry-run --format json -o PLAN.json) exactly, instead of planning.")
@click.option("-o", "--output", type=click.Path(dir_okay=False),
              help="Save the converted model: .pt (a pickled module: trains, fine-tunes; loading needs its source "
                   "files) or .pt2 (torch.export: portable, inference only). With --dry-run, the plan.")
@click.option("--state-dict", type=click.Path(dir_okay=False), help="Save the converted model's state_dict (.pth).")
@click.option("--export-code", type=click.Path(file_okay=False), metavar="DIR",
              help="Write standalone model.py + weights.pt (loadable without dsrewrite) into DIR.")
@click.option("--onnx", "onnx_path", type=click.Path(dir_okay=False),
              help="Export the converted model to ONNX: inputs and outputs named after forward's parameters and "
                   "its output dict's keys, a dynamic batch axis, checked in onnxruntime when installed.")
@click.option("--onnx-static", is_flag=True, help="With --onnx: keep the example's batch size fixed in the graph.")
@click.option("--opset", type=int, default=None, help="With --onnx: the ONNX opset version (default: torch's).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the before/after report to FILE: .html (charts), .md, .json or .txt.")
@click.option("--measure", is_flag=True, help="Time the original and converted models, and each replaced layer.")
@click.option("--no-cache", is_flag=True,
              help="Measure every layer afresh: the latency cache is neither read nor written.")
@click.option("--device", default=None, help="Where to time: auto, cpu, cuda, cuda:N, mps (measure.device).")
@click.option("--threads", type=int, default=None, help="CPU threads while timing (measure.threads).")
@click.option("--batch-size", type=int, default=None, help="Batch size for timing (default: the input's).")
@click.option("--memory-format", type=click.Choice(("contiguous", "channels_last")), default=None,
              help="Memory format for timing (measure.memory_format).")
@click.option("--measure-dtype", type=click.Choice(("float32", "bfloat16", "float16")), default=None,
              help="Dtype for timing (measure.dtype).")
@click.option("--fold-bn/--no-fold-bn", default=None, help="Fold BN into convs before timing (measure.fold_bn).")
@click.option("--repeats", type=int, default=None, help="Timed repeats per measurement (measure.repeats).")
@click.option("--calibrate", "calibrate_spec", default=None, metavar="FILE.py:NAME|MODULE:NAME",
              help="Unlabeled input batches (an iterable, or a function returning one) to refit each block on.")
@click.option("--calibration-batches", type=int, default=None, help="Use at most this many calibration batches.")
@click.option("--calibration-mode", type=click.Choice(("fast", "thorough")), default="fast", show_default=True,
              help="fast: one streamed pass, each least-squares fit on a sample of output positions; "
                   "thorough: every position (slower, rarely better).")
@click.option("--calibration-memory", default="1GiB", show_default=True, metavar="SIZE|none",
              help="Activations calibration keeps in memory at most (e.g. 512MiB); beyond it they go to a "
                   "temporary directory, removed when calibration ends. 'none': no bound.")
@click.option("--target-macs", type=float, default=None, metavar="FRACTION",
              help="Choose each layer's rank for at most this fraction of the original MACs (e.g. 0.33); with "
                   "--target-latency, the least-error plan within both.")
@click.option("--max-error", type=float, default=None, metavar="E",
              help="Choose each layer's smallest rank whose error is at most E.")
@click.option("--target-latency", type=float, default=None, metavar="FRACTION",
              help="Choose each layer's block (family × rank, or keep) for at most this fraction of the original's "
                   "latency measured here (e.g. 0.5; with --batch-size, --memory-format, --device), checked by "
                   "timing the planned model end to end (plan.target_latency).")
@click.option("--align", type=int, default=None, metavar="N",
              help="Round every resizable channel group up to a multiple of N with zero channels (exact).")
@click.option("--width", type=float, default=None, metavar="ALPHA",
              help="Scale every resizable channel group by ALPHA (0 < ALPHA <= 1), keeping the most important "
                   "channels; widths are multiples of --align (default align.divisor).")
@click.option("--group-widths", default=None, metavar="A,B,...",
              help="Let the planner also thin each channel group to one of these widths (e.g. 0.75,0.5) where that "
                   "costs less error than the blocks for the target; needs --calibrate (plan.group_widths).")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages or progress bars.")
def convert(model_settings: ModelSettings, rule_config, format: str, dry_run: bool, output, state_dict,  # noqa: A002
            export_code, onnx_path, report_path, measure: bool, device, threads, batch_size, memory_format,
            measure_dtype, fold_bn, repeats, calibrate_spec, calibration_batches, target_macs, max_error,
            align, width, quiet: bool, plan_path, no_cache: bool, onnx_static: bool, opset, target_latency,
            calibration_mode, group_widths, calibration_memory) -> None:
    """Rewrite heavy standard convs as depthwise-separable (or other factorized) blocks.

    Decides per conv with explicit rules (see --dry-run), initializes each block from the
    original weights, and reports params, MACs and output fidelity before and after.
    With --target-latency the block of each layer (separable, pointwise-first, spatial,
    bottleneck at a rank, or keep) is chosen from timings on this machine; add
    --target-macs for a size budget beside the speed one.

    \b
    Examples:
      dsrewrite convert examples/resnet.py --dry-run
      dsrewrite convert examples/resnet.py -o resnet_ds.pt --measure --report report.html
      dsrewrite convert examples/resnet.py --rules latency --measure --report report.md
      dsrewrite convert model.py --calibrate data.py:batches --target-macs 0.33 --export-code out/
      dsrewrite convert model.py --rules auto --target-latency 0.5 --batch-size 64 --measure
    """
    from . import export
    from .api import analyze_spec, convert as convert_model
    from .files import write_text_atomic
    from .report import format_for_path, render_conversion, render_plan

    import dataclasses

    ms = model_settings
    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    measure_flags = {"measure_device": device, "measure_threads": threads, "measure_memory_format": memory_format,
                     "measure_dtype": measure_dtype, "measure_fold_bn": fold_bn, "measure_repeats": repeats}
    rule_config = dataclasses.replace(rule_config, **{k: v for k, v in measure_flags.items() if v is not None})
    memory_limit = _memory_limit(calibration_memory)
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if max_error is not None and (target_latency is not None or target_macs is not None):
        other = "--target-latency" if target_latency is not None else "--target-macs"
        raise UsageError(f"--max-error bounds each layer's error and goes alone, not with {other} (--target-latency "
                         "and --target-macs go together: the least-error plan within both)")
    if target_latency is not None and not 0 < target_latency < 1:
        raise UsageError(f"--target-latency is a fraction of the original's measured latency between 0 and 1, "
                         f"got {target_latency}")
    if target_macs is not None and not 0 < target_macs < 1:
        raise UsageError(f"--target-macs is a fraction of the original MACs between 0 and 1, got {target_macs}")
    if max_error is not None and max_error < 0:
        raise UsageError(f"--max-error must be non-negative, got {max_error}")
    if align is not None and align < 1:
        raise UsageError(f"--align must be a positive channel divisor such as 8, got {align}")
    if width is not None and not 0 < width <= 1:
        raise UsageError(f"--width is a multiplier between 0 and 1 (e.g. 0.75), got {width}")
    if group_widths is not None:
        try:
            widths = [float(v) for v in group_widths.split(",") if v.strip()]
        except ValueError:
            widths = []
        if not widths or not all(0 < v < 1 for v in widths):
            raise UsageError(f"--group-widths takes widths between 0 and 1 separated by commas (e.g. 0.75,0.5), "
                             f"got {group_widths!r}")
        rule_config = dataclasses.replace(rule_config, group_widths=tuple(sorted(set(widths), reverse=True)))
        if target_latency is None and target_macs is None and not rule_config.target_latency:
            raise UsageError("--group-widths chooses each group's width for a target: give --target-latency or "
                             "--target-macs")
    if (onnx_static or opset is not None) and not onnx_path:
        raise UsageError("--onnx-static and --opset apply to --onnx FILE")
    if plan_path:
        ctx = click.get_current_context()
        planning = [f"--{n.replace('_', '-')}" for n in ("rules", "overrides", "target_macs", "max_error", "align",
                                                          "width", "target_latency", "group_widths")
                    if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if planning:
            raise UsageError(f"--plan applies a saved plan, which already holds the rules and choices; drop "
                             f"{', '.join(planning).replace('--overrides', '--set')}")
    spec_inputs = [ms.spec] + ([plan_path] if plan_path else [])
    outputs = [state_dict, onnx_path, report_path] + ([] if dry_run else [output])
    for path in outputs:
        if path:
            export.check_output_path(path, spec_inputs)
    if export_code:
        export.check_output_path(export_code, spec_inputs, "code folder")
    if output and not dry_run and not output.lower().endswith(export.MODEL_SUFFIXES):
        raise UsageError(f"-o writes the converted model: .pt (pickled module, trains), .pt2 (torch.export, "
                         f"portable), got {output}")
    if dry_run and output:
        if not output.lower().endswith((".json", ".md", ".txt")):
            raise UsageError(f"with --dry-run, -o writes the plan (.json, .md or .txt), not a model: {output}")
        export.check_output_path(output, spec_inputs, "plan file")
    report_format = format_for_path(report_path) if report_path else None
    if report_format == "csv":
        raise UsageError("--report: a conversion report is .md, .json, .txt or .html")
    saved_plan = _read_plan(plan_path) if plan_path else None

    say(f"analyzing {ms.spec} ...")
    analysis = analyze_spec(ms.spec, ms.input_shapes, ms.dtype, ms.kwargs, ms.trust_pickle, ms.max_memory)
    inputs = analysis.inputs
    calibration = None
    if calibrate_spec:
        from .calibrate import as_batches
        from .load import load_object

        try:
            calibration = as_batches(load_object(calibrate_spec, "--calibrate"), calibration_batches)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--calibrate {calibrate_spec}: {e}") from e
    planning = dict(calibration=calibration, target_macs=target_macs, max_error=max_error, align=align, width=width,
                    target_latency=target_latency, calibration_memory=memory_limit,
                    batch_size=batch_size, progress=None if quiet else say, cache=False if no_cache else None)
    plan = None
    if saved_plan is not None:
        from .plan import load_plan

        plan = load_plan(saved_plan, analysis, plan_path)
        say(f"{plan_path} fits the model: {len(plan.replacements)} of {len(plan.decisions)} conv calls replaced")
    elif dry_run:
        from .api import plan_model

        plan = plan_model(analysis.loaded.model, inputs, rule_config, analysis=analysis, **planning)
    if dry_run:
        text = render_plan(plan, format)
        if output:
            write_text_atomic(output, text)
            say(f"wrote {output}")
        else:
            click.echo(text, nl=False)
        return
    if plan is None:
        say(f"converting with {rule_config.source} ...")
    result = convert_model(analysis.loaded.model, inputs, rule_config, analysis=analysis, plan=plan,
                           measure=measure, calibration_mode=calibration_mode, **planning)
    from .rewrite import real_inputs

    real = real_inputs(inputs)
    # Outputs that can fail on this model (code generation, ONNX) go first, so a failure
    # leaves no other output behind either.
    if export_code:
        path = export.export_code(result.model, real, export_code, source=ms.spec)
        say(f"wrote {path} and weights.pt (standalone: needs only torch)")
    if onnx_path:
        info = export.export_onnx(result.model, real, onnx_path, dynamic_batch=not onnx_static, opset=opset)
        checked = info["checked"]
        say(f"wrote {onnx_path}: inputs {', '.join(info['inputs'])} -> outputs {', '.join(info['outputs'])}, "
            + ("batch axis dynamic" if info["dynamic_axes"] else "batch size fixed")
            + (f"; checked in {checked['runtime']} at batch {'/'.join(map(str, checked['batch_sizes']))}"
               if checked else "; not run (pip install onnxruntime to check it)"))
    if output:
        how = export.save_model(result.model, output, real)
        say(f"wrote {output}: {how}")
    if state_dict:
        export.save_state_dict(result.model, state_dict)
        say(f"wrote {state_dict}")
    if report_path:
        write_text_atomic(report_path, render_conversion(result.report, result.plan, report_format))
        say(f"wrote {report_path}")
    else:
        click.echo(render_conversion(result.report, result.plan, format, color=True), nl=False)


@cli.command()
@click.argument("model", required=False)
@click.option("--baseline", type=click.Path(dir_okay=False), default=None,
              help="Baseline JSON to compare with (default: check.baseline in the config).")
@click.option("--update-baseline", is_flag=True, help="Measure every budget and (re)write the baseline.")
@click.option("--format", "format", type=click.Choice(("text", "json", "markdown", "github", "junit")),  # noqa: A002
              default="text", show_default=True, help="Output format.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write the report to FILE (atomically).")
@click.option("--why", is_flag=True, help="Show the layers whose params/MACs changed most since the baseline.")
@click.option("--fail-on", "fail_on", type=click.Choice(("error", "warn")), default="error", show_default=True,
              help="Exit 1 on error-level limits only, or on warnings too.")
@click.option("--summary", is_flag=True, help="Also append the markdown report to $GITHUB_STEP_SUMMARY when set.")
@click.option("--max-params", default=None, metavar="COUNT", help="Ad hoc limit, e.g. 12M (with MODEL).")
@click.option("--max-macs", default=None, metavar="COUNT", help="Ad hoc limit, e.g. 2G (with MODEL).")
@click.option("--max-param-bytes", default=None, metavar="BYTES", help="Ad hoc limit, e.g. 50MB (with MODEL).")
@click.option("--max-activation-memory", default=None, metavar="BYTES", help="Ad hoc limit, e.g. 512MiB.")
@click.option("--max-latency", default=None, metavar="TIME", help="Ad hoc limit (a warning), e.g. 12ms.")
@click.option("--input-shape", "input_shape", multiple=True, metavar="N,C,H,W", help="Input shape (with MODEL).")
@click.option("--dtype", default=None, help="Input dtype (with MODEL).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Factory argument (with MODEL).")
@click.option("--trust-pickle", is_flag=True, help="Allow loading a pickled module (with MODEL).")
@click.option("--threads", type=int, default=None, help="CPU threads for latency measurements.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages.")
@click.pass_context
def check(ctx, model, baseline, update_baseline, format, output, why, fail_on, summary,  # noqa: A002
          max_params, max_macs, max_param_bytes, max_activation_memory, max_latency, input_shape, dtype, args,
          trust_pickle, threads, quiet) -> None:
    """Fail when a model exceeds its size budgets (params, MACs, bytes, memory, latency).

    With no MODEL, budgets come from [tool.dsrewrite.check] in pyproject.toml (or
    dsrewrite.toml, or --config FILE). Exit codes: 0 within budget, 1 a limit exceeded,
    2 bad config or usage, 3 a model could not be loaded or traced.

    \b
    Examples:
      dsrewrite check --update-baseline        # once, on main
      dsrewrite check --why --format github    # in CI, on every pull request
      dsrewrite check examples/resnet.py --max-params 12M --max-param-bytes 50MB
    """
    import os

    from . import check as gate
    from .check_format import render
    from .load import parse_kwargs, parse_shape
    from .files import write_text_atomic
    from .measure import MeasureSettings
    from .settings import read_tool_table

    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    if model:
        # an ad hoc check compares with a baseline only when one is named on the command line
        if ctx.get_parameter_source("baseline") is not click.core.ParameterSource.COMMANDLINE:
            baseline = None
        config = gate.adhoc_config(model, [parse_shape(s) for s in _as_list(input_shape)], dtype,
                                   parse_kwargs(_as_list(args)),
                                   {"params": max_params, "macs": max_macs, "param-bytes": max_param_bytes,
                                    "activation-memory": max_activation_memory, "latency": max_latency},
                                   trust_pickle, baseline)
    else:
        path = ctx.obj.get("config")
        table = read_tool_table(path).get("check") if path else None
        if not table:
            raise ConfigError("no budgets: add [tool.dsrewrite.check] with [[tool.dsrewrite.check.budget]] tables "
                              "to pyproject.toml (see README), pass --config FILE, or give a MODEL with --max-* limits")
        shown = os.path.relpath(path) if not os.path.relpath(path).startswith("..") else str(path)
        config = gate.parse_config(table, shown)
    settings = MeasureSettings(threads=threads)
    if update_baseline:
        target = baseline or config.baseline
        if not target:
            raise ConfigError("--update-baseline needs a baseline path: set check.baseline or pass --baseline FILE")
        measurements = []
        for i, budget in enumerate(config.budgets, 1):
            say(f"[{i}/{len(config.budgets)}] {budget.name}: analyzing {budget.model} ...")
            measurements.append(gate.measure_budget(budget, settings))
        folder = os.path.dirname(target)
        if folder:
            os.makedirs(folder, exist_ok=True)
        gate.write_baseline(target, measurements)
        say(f"wrote baseline {target} for {len(measurements)} budget(s)")
        return
    result = gate.run_check(config, baseline, say, settings)
    text = render(result, format, why)
    if output:
        write_text_atomic(output, text)
        say(f"wrote {output}")
    else:
        click.echo(text, nl=False)
    step_summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary and step_summary:
        with open(step_summary, "a", encoding="utf-8") as fh:
            fh.write(render(result, "markdown", why))
    ctx.exit(gate.exit_code(result, fail_on))


@cli.command()
@click.argument("student")
@click.argument("teacher")
@click.option("--data", "data_spec", required=True, metavar="FILE.py:NAME|MODULE:NAME",
              help="Training batches: (inputs, labels) pairs, or inputs alone (pure distillation); an iterable "
                   "such as a DataLoader, or a function returning one.")
@click.option("--eval", "eval_spec", default=None, metavar="FILE.py:NAME|MODULE:NAME",
              help="(inputs, labels) batches to measure top-1 accuracy on after each epoch (and before training).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Save the fine-tuned student here (.pt, a whole module).")
@click.option("--state-dict", type=click.Path(dir_okay=False), help="Also save its state_dict (.pth).")
@click.option("--history", "history_path", type=click.Path(dir_okay=False),
              help="Write the per-epoch history (loss, accuracy, steps, seconds) as JSON.")
@click.option("--epochs", type=int, default=1, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="AdamW learning rate (cosine schedule).")
@click.option("--temperature", type=float, default=4.0, show_default=True, help="Distillation temperature.")
@click.option("--alpha", type=float, default=0.9, show_default=True,
              help="Weight of the distillation loss; 1 − alpha goes to cross-entropy when batches have labels.")
@click.option("--feature-loss", type=float, default=0.0, show_default=True,
              help="Weight of the MSE between each replaced block's output and the teacher conv's output.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available).")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on cuda, bfloat16 on cpu).")
@click.option("--threads", type=int, default=None, help="CPU threads for training (default: torch's setting).")
@click.option("--arg", "args", multiple=True, metavar="KEY=VALUE", help="Keyword argument for the teacher's factory.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading pickled modules (.pt from convert -o); this runs code from the file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress messages or progress bars.")
def finetune(student, teacher, data_spec, eval_spec, output, state_dict, history_path, epochs, lr, temperature,
             alpha, feature_loss, max_steps, device, amp, threads, args, trust_pickle, quiet) -> None:
    """Fine-tune a converted model (STUDENT) by distillation from the original (TEACHER).

    STUDENT is usually the .pt written by `dsrewrite convert -o` (needs --trust-pickle);
    TEACHER is the original model, as for analyze. Under `torchrun --nproc_per_node N`
    the student trains with DistributedDataParallel; give a loader with a
    DistributedSampler (a list of batches is split across ranks), and rank 0 writes.

    \b
    Examples:
      dsrewrite finetune small.pt examples/resnet.py --trust-pickle --data data.py:train \\
          --eval data.py:test -o small_tuned.pt --epochs 2
      torchrun --nproc_per_node 2 -m dsrewrite.cli finetune ...
    """
    import json

    from . import export
    from .files import write_text_atomic
    from .finetune import command_batches, distill, evaluate, torchrun_group
    from .load import load_model, parse_kwargs

    say = (lambda msg: None) if quiet else (lambda msg: click.echo(msg, err=True))
    for name, value, low in (("--epochs", epochs, 1), ("--max-steps", max_steps, 1)):
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")
    if not lr > 0 or not temperature > 0:
        raise UsageError("--lr and --temperature must be positive")
    if not 0 <= alpha <= 1:
        raise UsageError(f"--alpha is a weight between 0 and 1, got {alpha}")
    if feature_loss < 0:
        raise UsageError(f"--feature-loss must be non-negative, got {feature_loss}")
    if threads is not None:
        if threads < 1:
            raise UsageError(f"--threads must be at least 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    for path in (output, state_dict, history_path):
        if path:
            export.check_output_path(path, [student, teacher])
    if not output.lower().endswith((".pt", ".pth")):
        raise UsageError(f"finetune -o writes the trained student as a .pt (a pickled, trainable module), got {output}")

    with torchrun_group(device) as (rank, world):
        quiet_rank = say if rank == 0 else (lambda msg: None)
        quiet_rank(f"loading {student} and {teacher} ...")
        # the teacher first: loading its file makes its classes importable for the student's pickle
        teacher_model = load_model(teacher, parse_kwargs(_as_list(args)), trust_pickle).model
        student_model = load_model(student, trust_pickle=trust_pickle).model
        train = command_batches(data_spec, "--data", student_model, teacher_model, epochs=epochs, rank=rank,
                                world=world)
        test = command_batches(eval_spec, "--eval", student_model, teacher_model, epochs=epochs + 1, rank=rank,
                               world=world, labels=True) if eval_spec else None
        before = evaluate(student_model, test, device) if test is not None else None
        if before is not None:
            quiet_rank(f"student accuracy before: {100 * before:.2f}%")
        history = distill(student_model, teacher_model, train, epochs=epochs, lr=lr, temperature=temperature,
                          alpha=alpha, feature_loss=feature_loss, device=device, amp=amp, eval_loader=test,
                          max_steps=max_steps, progress=not quiet and rank == 0)
        if rank != 0:
            return
        student_model.cpu()
        say(f"wrote {output}: {export.save_model(student_model, output)}")
        if state_dict:
            export.save_state_dict(student_model, state_dict)
            say(f"wrote {state_dict}")
        doc = {"accuracy_before": before, "world_size": world, "epochs": [h.__dict__ for h in history]}
        if history_path:
            write_text_atomic(history_path, json.dumps(doc, indent=2) + "\n")
            say(f"wrote {history_path}")
        from tabulate import tabulate

        rows = [[h.epoch, h.steps, f"{h.loss:.4f}", "-" if h.accuracy is None else f"{100 * h.accuracy:.2f}%",
                 f"{h.seconds:.1f}"] for h in history]
        click.echo(tabulate(rows, ["epoch", "steps", "loss", "accuracy", "seconds"]))


@cli.command()
@click.argument("base", type=click.Path(exists=True, dir_okay=False))
@click.argument("head", type=click.Path(exists=True, dir_okay=False))
@click.option("--format", "format", type=click.Choice(("text", "markdown", "json")), default="text",  # noqa: A002
              show_default=True)
@click.option("--top", type=int, default=10, show_default=True, help="How many changed layers to list.")
@click.option("--allow-different", is_flag=True,
              help="Compare reports of different models or input shapes anyway (refused by default), with a warning.")
def compare(base, head, format, top, allow_different) -> None:  # noqa: A002
    """Compare two reports offline: analyze --format json output, check baselines or check JSON.

    Every parametrized layer (conv, linear, norm, ...) is lined up by name.

    \b
    Examples:
      dsrewrite analyze model.py --format json -o before.json   # on main
      dsrewrite analyze model.py --format json -o after.json    # on your branch
      dsrewrite compare before.json after.json --format markdown
    """
    from .compare import compare_files, render_comparison

    click.echo(render_comparison(compare_files(base, head, top, allow_different), format), nl=False)


def _read_plan(path: str):
    """A saved plan file's JSON (its fit to the model is checked after the model is analyzed)."""
    import json

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise UsageError(f"--plan {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"--plan {path}: not a JSON plan ({type(e).__name__}: {e})") from None


def _emit(text: str, out: OutputSettings, quiet: bool = False) -> None:
    from .files import write_text_atomic

    if out.output:
        write_text_atomic(out.output, text)
        if not quiet:
            click.echo(f"wrote {out.output}", err=True)
    else:
        click.echo(text, nl=False)


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    cli.main(args=argv, prog_name="dsrewrite")


if __name__ == "__main__":
    main()
