"""The `stabledub` command line: pack, run, adapt, config, demo, preprocess, train, eval.

Every command checks its command line, config, input and output before any Ray work starts; a
refusal is one line on stderr naming the thing and what is allowed, with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from importlib import metadata

from pipeline.config import ConfigError, load_config
from stages.audio import AudioConfig
from stages.settings import allowed_values, load_settings
from stages.storage import filesystem, is_local, out_of_space

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # the run finished, but some films or shards failed (see dead_letters.jsonl)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C)
EXIT_TERMINATED = 143  # SIGTERM (a Kubernetes pod stopped)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C: the lease is released and what is finished stays finished."""


def _terminate(signum, frame) -> None:  # noqa: ANN001 - a signal handler
    raise Terminated()


class UsageError(Exception):
    """A command line, input or output the command refuses before doing any work (exit 2)."""


def _parse_size(text: str, option: str = "--shard-size") -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    clean = text.strip().lower().rstrip("b")
    try:
        size = int(float(clean[:-1]) * units[clean[-1]]) if clean and clean[-1] in units else int(clean)
    except ValueError:
        size = 0
    if size <= 0:
        raise UsageError(f"{option} {text!r} is not allowed; allowed: a positive size such as 512M, 4G or 1000000")
    return size


def _version() -> str:
    try:
        return metadata.version("stabledub")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; pip install -e .)"


def _load(loader, *a):  # noqa: ANN001, ANN202 - a config loader and its arguments
    try:
        return loader(*a)
    except ConfigError as error:
        raise UsageError(str(error)) from None


def check_input(pattern: str, allow_missing: bool) -> str | list[str]:
    """The shards a run or preprocess reads: every shard the pattern names must exist, unless
    `--allow-missing` (then the missing ones are skipped with a warning); none at all is refused."""
    from pipeline.shards import find_shards

    try:
        present, missing = find_shards(pattern)
    except (OSError, ValueError) as error:
        raise UsageError(f"input {pattern}: {error}") from None
    if not present:
        raise UsageError(
            f"input {pattern}: no shard it names exists (give existing shards, a glob such as films-*.tar, or pack first)"
        )
    if missing and not allow_missing:
        gone = f"shards {missing[0]} and {len(missing) - 1} more do" if len(missing) > 1 else f"shard {missing[0]} does"
        raise UsageError(
            f"input {pattern}: {gone} not exist ({len(present)} do); "
            "name only existing shards, or pass --allow-missing to skip missing ones"
        )
    if missing:
        print(f"warning: skipping {len(missing)} missing shard(s) of {pattern}, e.g. {missing[0]}", file=sys.stderr)
        return present
    return pattern


def check_output(url: str, what: str = "output") -> None:
    """A local output must be a folder (or not exist yet) under a folder this user can write."""
    fs, path = filesystem(url)
    if not is_local(fs):
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what} {url} is a file; allowed: a folder, or a path that does not exist yet")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{what} {url}: cannot create or write it (no write permission in {parent})")


def check_file(path: str | None, what: str) -> None:
    if path is not None and not os.path.isfile(path):
        raise UsageError(f"{what} {path} does not exist (or is not a file)")


def cmd_pack(args: argparse.Namespace) -> int:
    from pipeline.shards import PackItem, pack, read_manifest, shard_names

    shard_bytes = _parse_size(args.shard_size)
    items: list[PackItem] = []
    if args.manifest:
        check_file(args.manifest, "manifest")
        try:
            items += read_manifest(args.manifest)
        except (ValueError, KeyError) as error:
            raise UsageError(f"manifest {args.manifest}: {error}") from None
    dubs = args.dub or []
    keys = args.key or []
    if dubs and len(dubs) != len(args.videos):
        raise UsageError(f"{len(args.videos)} video(s) but {len(dubs)} --dub track(s); give one --dub per video")
    if keys and len(keys) != len(args.videos):
        raise UsageError(f"{len(args.videos)} video(s) but {len(keys)} --key(s); give one --key per video")
    for i, video in enumerate(args.videos):
        items.append(PackItem(video, dubs[i] if dubs else None, keys[i] if keys else None))
    if not items:
        raise UsageError("nothing to pack: give VIDEO files or --manifest")
    missing = [i.video for i in items if not i.dub]
    if missing and not args.allow_missing_dub:
        raise UsageError(f"no --dub for {missing[0]} (and {len(missing) - 1} more); every film needs a dub track")
    first = next(shard_names(args.output))
    check_output(os.path.dirname(first) or ".", "output folder of")
    try:
        written = pack(items, args.output, shard_bytes)
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    for url in written:
        print(url)
    print(f"packed {len(items)} film(s) into {len(written)} shard(s); run them with: {packed_pattern(written)}", file=sys.stderr)
    return EXIT_OK


def packed_pattern(written: list[str]) -> str:
    """A brace pattern naming exactly the shards written (films-{0000..0002}.tar), for `run`."""
    import re

    if len(written) < 2:
        return written[0] if written else ""
    first, last = (re.match(r"(.*?)(\d+)(\D*)$", u) for u in (written[0], written[-1]))
    if first and last and first.group(1) == last.group(1) and first.group(3) == last.group(3):
        return f"{first.group(1)}{{{first.group(2)}..{last.group(2)}}}{first.group(3)}"
    return " ".join(written)


def pipeline_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set or [])
    if getattr(args, "model", None):
        overrides.append(f"inpaint.model={args.model}")
    if getattr(args, "debug", False):
        overrides.append("encode.debug=true")
    if getattr(args, "adapt", False):
        overrides.append("adapt.enabled=true")
    if getattr(args, "adapt_from", None):
        overrides.append(f"adapt.reuse={args.adapt_from}")
    return overrides


def check_adaptation(config) -> None:  # noqa: ANN001 - a PipelineConfig
    """Adaptation needs a StableDub checkpoint; `--adapt-from DIR` needs adapters in DIR made for
    this very checkpoint at its crop size."""
    from pipeline.rundir import RunDir
    from stages.adapt import is_checkpoint, model_crop_size, model_identity

    if not config.adapt.active:
        return
    model = config.inpaint.model
    if not is_checkpoint(model):
        raise UsageError(f"--adapt/--adapt-from need a StableDub checkpoint as the model; inpaint.model is {model!r}")
    if not config.adapt.reuse:
        return
    records = RunDir(config.adapt.reuse).adapt_records()
    if not records:
        raise UsageError(f"--adapt-from {config.adapt.reuse}: no adapters there (write them with stabledub adapt FILMS DIR)")
    identity, size = model_identity(model), model_crop_size(model)
    for record in records:
        if record.get("model") != identity or record.get("crop_size") != size:
            raise UsageError(
                f"--adapt-from {config.adapt.reuse}: the adapters of film {record.get('film')!r} were made for base model "
                f"{record.get('model')} ({record.get('model_url')}) at {record.get('crop_size')} px; this run's model "
                f"{model} is {identity} at {size} px (adapt with this model, or run with the one they were made for)"
            )


def check_manifest(url: str) -> None:
    """A manifest a run reads in place: it must exist and parse, with safe and distinct keys
    (its films' files are checked per film: a missing one fails only that film)."""
    from pipeline.shards import manifest_keys, read_manifest

    try:
        manifest_keys(read_manifest(url))
    except FileNotFoundError:
        raise UsageError(f"manifest {url} does not exist") from None
    except (OSError, ValueError, KeyError) as error:
        raise UsageError(f"manifest {url}: {error}") from None


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld
    from pipeline.locations import OverlapError, inside, location
    from pipeline.run import RunOptions, deliver_film, film_manifest, run
    from pipeline.rundir import RunDirError
    from pipeline.shards import VIDEO_EXTENSIONS, is_manifest

    check_file(args.config, "--config")
    config = _load(load_config, args.config, pipeline_overrides(args))
    output = args.output or args.output_option
    if not output or (args.output and args.output_option):
        raise UsageError("give the output once: as OUTPUT or as -o/--output")
    single = args.input.lower().endswith(tuple(f".{e}" for e in VIDEO_EXTENSIONS))
    if single != bool(args.dub):
        raise UsageError(
            f"--dub goes with one film: stabledub run FILM.mp4 --dub DUB.wav -o OUT.mp4 (input {args.input})"
            if args.dub
            else f"input {args.input} is one film: give its dub track with --dub DUB.wav"
        )
    target = ""  # the single film's named output file
    if single:
        check_file(args.input, "film")
        check_file(args.dub, "--dub")
        if output.lower().endswith(".mp4"):
            target, output = output, output + ".stabledub-run"
        for given in (args.input, args.dub):
            if inside(location(given), location(target or output)):
                raise UsageError(f"output {target or output} is the input {given}: inputs are never written")
        check_output(output)
        shards: str | list[str] = film_manifest(args.input, args.dub, output)
    elif is_manifest(args.input):
        check_manifest(args.input)
        shards = args.input
        check_output(output)
        if inside(location(args.input), location(output)):
            raise UsageError(f"output {output} holds the input manifest {args.input}: inputs are never written")
    else:
        shards = check_input(args.input, args.allow_missing)
        check_output(output)
    if args.workdir:
        check_output(args.workdir, "--workdir")
    check_adaptation(config)
    options = RunOptions(
        input=shards,  # the pattern, or the shards of it that exist (--allow-missing), or a manifest
        output=output,
        config=config,
        workdir=args.workdir,
        input_root=args.input if isinstance(shards, list) and not single else None,
        retry_failed=args.retry_failed,
        keep_intermediate=args.keep_intermediate,
        progress=args.verbose,
        progress_every=None if args.quiet else args.progress_every,
        metrics_port=args.metrics_port,
    )
    print(f"output: {target or output}  (run directory: {options.run_dir})")
    try:
        summary = run(options)  # prints the run's summary: the last line on stdout
    except (FileNotFoundError, RunDirError, LeaseHeld, OverlapError) as error:
        raise UsageError(str(error)) from None
    if target and summary.films_ok == 1:
        deliver_film(output, target)
    return EXIT_SOME_FAILED if summary.any_failed else EXIT_OK


def cmd_adapt(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld
    from pipeline.locations import OverlapError
    from pipeline.run import adapt_films
    from pipeline.rundir import RunDirError

    check_file(args.config, "--config")
    overrides = [*(args.set or []), *([f"inpaint.model={args.model}"] if args.model else []), "adapt.enabled=true"]
    config = _load(load_config, args.config, overrides)
    if config.adapt.reuse:
        raise UsageError("stabledub adapt makes adapters; adapt.reuse (--adapt-from) belongs to stabledub run")
    check_adaptation(config)
    shards = check_input(args.input, args.allow_missing)
    check_output(args.output)
    print(f"adapters: {args.output}  (per person: adapt/<shard>/<key>/.../person-<id>.json; all: adaptation.json)")
    try:
        summary = adapt_films(shards, args.output, config, progress=args.verbose)
    except (FileNotFoundError, RunDirError, LeaseHeld, OverlapError) as error:
        raise UsageError(str(error)) from None
    return EXIT_SOME_FAILED if summary.any_failed else EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import config_reference, to_dict

    if args.reference:
        print(config_reference(), end="")
        return EXIT_OK
    check_file(args.config, "--config")
    config = _load(load_config, args.config, args.set or [])
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import DemoError, check_demo_output, run_demo

    try:
        check_demo_output(args.output)
        return run_demo(args.output, verbose=args.verbose)
    except DemoError as error:
        raise UsageError(str(error)) from None


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld
    from pipeline.locations import OverlapError
    from pipeline.rundir import RunDirError
    from training.preprocess import FilterConfig, PreprocessOptions, preprocess

    check_file(args.config, "--config")
    config = _load(load_config, args.config, args.set or [])
    filters = _load(load_settings, FilterConfig, None, args.filter or [])
    shard_bytes = _parse_size(args.shard_size)
    shards = check_input(args.input, args.allow_missing)
    check_output(args.output)
    if args.workdir:
        check_output(args.workdir, "--workdir")
    options = PreprocessOptions(
        input=shards,
        output=args.output,
        config=config,
        filters=filters,
        shard_bytes=shard_bytes,
        audio=args.audio,
        workdir=args.workdir,
        progress=args.verbose,
    )
    try:
        summary = preprocess(options)
    except (FileNotFoundError, RunDirError, LeaseHeld, OverlapError) as error:
        raise UsageError(str(error)) from None
    return EXIT_SOME_FAILED if summary.any_failed else EXIT_OK


def check_training_data(data: str, what: str) -> None:
    from training.shards import shard_urls

    try:
        urls = shard_urls(data)
    except (FileNotFoundError, NotADirectoryError):
        urls = []
    if not urls:
        raise UsageError(f"{what} {data}: no training shards there; allowed: a folder of train-*.tar, a pattern or a .tar file")
    from pipeline.shards import find_shards

    missing = find_shards(urls)[1]
    if missing:
        raise UsageError(f"{what} {data}: shard {missing[0]} does not exist")


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, TrainingDataError, train

    check_file(args.config, "--config")
    config = _load(load_settings, TrainConfig, args.config, args.set or [])
    check_training_data(args.data, "data")
    check_output(args.output_model, "output model")
    try:
        train(args.data, args.output_model, config, use_ray=not args.no_ray)
    except (FileNotFoundError, TrainingDataError) as error:
        raise UsageError(str(error)) from None
    print(f"model: {args.output_model} (loss curve: {args.output_model}/loss.png)")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import BASELINES, evaluate

    if args.model not in BASELINES and not os.path.isdir(args.model):
        raise UsageError(f"model {args.model} is not a folder; allowed: a StableDub checkpoint folder, {', '.join(BASELINES)}")
    if args.sync_expert and not os.path.isdir(args.sync_expert):
        raise UsageError(f"--sync-expert {args.sync_expert} is not a folder")
    if not (os.path.isdir(args.data) and any(n.endswith((".mp4", ".mkv", ".mov")) for n in os.listdir(args.data))):
        check_training_data(args.data, "data")
    if args.outputs and not os.path.isdir(args.outputs):
        raise UsageError(f"--outputs {args.outputs} is not a folder; allowed: a folder of dubbed videos named like the sources")
    check_output(args.output)
    try:
        result = evaluate(
            args.model,
            args.data,
            args.output,
            sync_expert=args.sync_expert,
            max_clips=args.max_clips,
            steps=args.steps,
            outputs=args.outputs,
        )
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    print(f"metrics: {args.output}/metrics.json  report: {args.output}/index.html")
    print(json.dumps(result["mean"], indent=1))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import find_run_dir, write_report
    from stages.storage import join

    try:
        find_run_dir(args.source)
    except FileNotFoundError as error:
        raise UsageError(str(error)) from None
    target = args.output or join(args.source, "report.html")
    print(f"report: {write_report(args.source, target)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ parser
def _count(low: int):  # noqa: ANN202 - an argparse type
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a whole number, at least {low}")
        return value

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a positive number of seconds")
    return value


def _port(text: str) -> int:
    value = _count(1)(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; allowed: a port number 1 to 65535")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows `(default: X)` after every option that has a default (not after flags and None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action) or ""


class Parser(argparse.ArgumentParser):
    """argparse whose refusals are one line (`error: ...`) with exit 2, like the commands' own."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _verbosity(default: object) -> argparse.ArgumentParser:
    # on the main parser and on every subcommand, so `-v` works before or after the command; the
    # subcommands' copies default to SUPPRESS so they never overwrite what was given before
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="show Ray's, Ray Data's and the models' logs and progress"
    )
    group.add_argument("-q", "--quiet", action="store_true", default=default, help="print errors and results only")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="stabledub",
        description="Visual dubbing of film catalogs (StableDub on Ray Data).",
        formatter_class=HelpFormatter,
        parents=[_verbosity(False)],
    )
    parser.add_argument("--version", action="version", version=f"stabledub {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    common = [_verbosity(argparse.SUPPRESS)]

    def command(name: str, help: str):  # noqa: A002, ANN202
        return sub.add_parser(name, help=help, description=help, parents=common, formatter_class=HelpFormatter)

    p = command("pack", "pack films and dub tracks into webdataset shards")
    p.add_argument("videos", nargs="*", help="film files (local paths or fsspec URLs)")
    p.add_argument("--dub", action="append", help="dub audio for the film at the same position (repeat)")
    p.add_argument("--key", action="append", help="film key for the film at the same position (default: file name)")
    p.add_argument("--manifest", help="CSV (video,dub,key,metadata) or JSONL manifest of films")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. shards/films-{0000..0099}.tar or films-%%04d.tar")
    p.add_argument("--shard-size", default="1G", help="start a new shard before one passes this size")
    p.add_argument("--allow-missing-dub", action="store_true", help="pack films without a dub track anyway")
    p.set_defaults(func=cmd_pack)

    r = command("run", "dub every film of INPUT (shards, a manifest of files, or one film) into OUTPUT")
    r.add_argument(
        "input",
        help="shard URL, brace pattern or glob (s3://bucket/films-{0000..0099}.tar); a manifest (.csv/.jsonl: "
        "video,dub,key[,metadata]) of films read in place; or one film (with --dub)",
    )
    r.add_argument("output", nargs="?", help="output directory URL (local path, s3://...)")
    r.add_argument("-o", "--output", dest="output_option", metavar="OUTPUT", help="the output, as an option (one film: OUT.mp4)")
    r.add_argument("--dub", help="the dub track of a single film given as INPUT")
    r.add_argument(
        "--model", help="inpaint model: built-in name (identity, grey) or checkpoint path/URL (default: inpaint.model)"
    )
    r.add_argument("--workdir", help="run directory URL (default: OUTPUT/_stabledub_run)")
    r.add_argument("--config", help="YAML or JSON config file")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. encode.crf=18")
    r.add_argument("--allow-missing", action="store_true", help="skip shards of the pattern that do not exist (with a warning)")
    r.add_argument("--debug", action="store_true", help="also write <key>.debug.mp4 overlays")
    r.add_argument("--retry-failed", action="store_true", help="retry films that failed in an earlier run")
    r.add_argument("--keep-intermediate", action="store_true", help="keep encoded segments and films in the run directory")
    r.add_argument("--metrics-port", type=_port, metavar="PORT", help="serve Prometheus metrics on this port during the run")
    r.add_argument(
        "--progress-every",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="off a terminal, print a progress line to stderr this often (a terminal gets a bar; -q: neither)",
    )
    r.add_argument("--adapt", action="store_true", help="adapt the model to each dubbed person's own footage first (adapt.*)")
    r.add_argument("--adapt-from", metavar="DIR", help="dub with the adapters `stabledub adapt` wrote into DIR")
    r.set_defaults(func=cmd_run)

    a = command("adapt", "adapt the model to every dubbed person of the films, without dubbing (adapters for review)")
    a.add_argument("input", help="film shard URL, brace pattern or glob (as for run)")
    a.add_argument("output", help="folder for the adapters and their reports (use it with run --adapt-from)")
    a.add_argument("--model", help="StableDub checkpoint path/URL (default: inpaint.model)")
    a.add_argument("--config", help="YAML or JSON config file")
    a.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. adapt.steps=100")
    a.add_argument("--allow-missing", action="store_true", help="skip shards of the pattern that do not exist (with a warning)")
    a.set_defaults(func=cmd_adapt)

    c = command("config", "print the effective configuration (defaults + --config + --set) as YAML")
    c.add_argument("--config", help="YAML or JSON config file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. encode.crf=18")
    c.add_argument("--reference", action="store_true", help="print every section and key (type, default, allowed) as Markdown")
    c.set_defaults(func=cmd_config)

    d = command("demo", "build a demo film from packaged material and dub it")
    d.add_argument("--output", default="demo-output", help="folder for the demo's film, shards and dubbed film")
    d.set_defaults(func=cmd_demo)

    pp = command("preprocess", "films -> webdataset training shards of per-track segments (no inpainting)")
    pp.add_argument("input", help="film shard URL, brace pattern or glob (as for run)")
    pp.add_argument("output", help="output directory URL for train-NNNNNN.tar shards")
    pp.add_argument("--config", help="YAML or JSON pipeline config file")
    pp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a pipeline config value")
    pp.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="override a filter (min_frames, min_face_px, min_speech, shift_max, drop_offset, ...)",
    )
    pp.add_argument("--shard-size", default="1G", help="start a new training shard before one passes this size")
    pp.add_argument(
        "--audio",
        choices=allowed_values(AudioConfig, "source"),
        default="dub",
        help="featurize the dub member or the film's own audio",
    )
    pp.add_argument("--allow-missing", action="store_true", help="skip shards of the pattern that do not exist (with a warning)")
    pp.add_argument("--workdir", help="run directory URL (default: OUTPUT/_stabledub_preprocess)")
    pp.set_defaults(func=cmd_preprocess)

    t = command("train", "train StableDub on training shards (Ray Train); resumes from OUTPUT_MODEL/checkpoints")
    t.add_argument("data", help="directory, pattern or file of training shards")
    t.add_argument(
        "output_model", help="output folder or URL (s3://...): the diffusers StableDubPipeline, its checkpoints/ under it"
    )
    t.add_argument("--config", help="YAML training config (keys of training.train.TrainConfig)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config value")
    t.add_argument("--no-ray", action="store_true", help="run the training loop in this process (no Ray Train)")
    t.set_defaults(func=cmd_train)

    e = command("eval", "self-reenactment metrics of MODEL on held-out clips")
    e.add_argument("model", help="StableDub checkpoint folder, or a baseline: source, frozen")
    e.add_argument("data", help="training shards (directory/pattern) or a folder of mp4 files with their own audio")
    e.add_argument("-o", "--output", required=True, help="directory for metrics.json and index.html")
    e.add_argument("--sync-expert", default="", help="sync expert folder (default: the shipped one, if any)")
    e.add_argument("--max-clips", type=_count(0), default=0, help="evaluate at most this many clips (0: all)")
    e.add_argument("--steps", type=_count(1), default=20, help="denoising steps")
    e.add_argument(
        "--outputs",
        default="",
        help="folder of another system's dubbed videos, named like the source videos, scored beside the model",
    )
    e.set_defaults(func=cmd_eval)

    q = command("report", "QC report of a run: one offline HTML page (films, changed ranges, thumbnails, failures)")
    q.add_argument("source", help="output directory of `stabledub run`, or its run directory")
    q.add_argument("-o", "--output", help="HTML file to write (default: SOURCE/report.html)")
    q.set_defaults(func=cmd_report)
    return parser


def configure_logging(verbose: bool, quiet: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("stabledub").setLevel(level)
    from pipeline.plan import set_verbose

    set_verbose(verbose)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as done:  # --help, --version, or a refusal already printed
        return int(done.code or 0)
    configure_logging(args.verbose, args.quiet)
    import signal
    import threading

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if main_thread else None
    try:
        return args.func(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as stop:
        what = "terminated" if isinstance(stop, Terminated) else "interrupted"
        print(f"{what}: finished films and segments are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
    except OSError as error:
        if not out_of_space(error):
            raise
        # a crash, not a film's failure (exit 3 would say the run finished): nothing was recorded
        # failed for want of room, so the resume does exactly what is left
        print(
            f"error: out of space: {error}; stopped. Free space (or write elsewhere) and run the same command "
            "again to resume: finished films and segments are kept",
            file=sys.stderr,
        )
        return EXIT_CRASH
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def entry_point() -> None:
    """The `stabledub` command: main(), then an exit an interrupted run cannot turn into a crash."""
    code = main()
    if code in (EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_CRASH):  # EXIT_CRASH: returned by a run stopped for room
        # After an interrupt (or a stop) Ray Data's executor threads are still inside native code, and the
        # interpreter's teardown can crash under them (exit -11 instead of 130). Everything worth
        # keeping is written and the lease released by now; Ray's own processes share our fate.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
