"""The `stabledub` command line: pack, run, config, demo, preprocess, train, eval."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.config import ConfigError, load_config
from stages.audio import AudioConfig
from stages.settings import allowed_values, load_settings

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USAGE = 2
EXIT_SOME_FAILED = 3  # the run finished, but some films or shards failed (see dead_letters.jsonl)


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.strip().lower().rstrip("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def cmd_pack(args: argparse.Namespace) -> int:
    from pipeline.shards import PackItem, pack, read_manifest

    items: list[PackItem] = []
    if args.manifest:
        items += read_manifest(args.manifest)
    dubs = args.dub or []
    keys = args.key or []
    if dubs and len(dubs) != len(args.videos):
        print(f"error: {len(args.videos)} video(s) but {len(dubs)} --dub track(s); give one --dub per video", file=sys.stderr)
        return EXIT_USAGE
    if keys and len(keys) != len(args.videos):
        print(f"error: {len(args.videos)} video(s) but {len(keys)} --key(s); give one --key per video", file=sys.stderr)
        return EXIT_USAGE
    for i, video in enumerate(args.videos):
        items.append(PackItem(video, dubs[i] if dubs else None, keys[i] if keys else None))
    if not items:
        print("error: nothing to pack: give VIDEO files or --manifest", file=sys.stderr)
        return EXIT_USAGE
    missing = [i.video for i in items if not i.dub]
    if missing and not args.allow_missing_dub:
        print(f"error: no --dub for {missing[0]} (and {len(missing) - 1} more); every film needs a dub track", file=sys.stderr)
        return EXIT_USAGE
    try:
        written = pack(items, args.output, _parse_size(args.shard_size))
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    for url in written:
        print(url)
    print(f"packed {len(items)} film(s) into {len(written)} shard(s)", file=sys.stderr)
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld
    from pipeline.run import RunOptions, run
    from pipeline.rundir import RunDirError

    overrides = list(args.set or [])
    if args.model:
        overrides.append(f"inpaint.model={args.model}")
    if args.debug:
        overrides.append("encode.debug=true")
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = RunOptions(
        input=args.input,
        output=args.output,
        config=config,
        workdir=args.workdir,
        retry_failed=args.retry_failed,
        keep_intermediate=args.keep_intermediate,
        progress=not args.quiet,
        metrics_port=args.metrics_port,
    )
    try:
        summary = run(options)
    except (FileNotFoundError, RunDirError, LeaseHeld) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"output: {args.output}  (run directory: {options.run_dir})")
    return EXIT_SOME_FAILED if summary.films_failed or summary.shards_failed else EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from pipeline.config import to_dict

    try:
        config = load_config(args.config, args.set or [])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.demo import run_demo

    return run_demo(args.output)


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.lease import LeaseHeld
    from pipeline.rundir import RunDirError
    from training.preprocess import FilterConfig, PreprocessOptions, preprocess

    try:
        config = load_config(args.config, args.set or [])
        filters = load_settings(FilterConfig, None, args.filter or [])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    options = PreprocessOptions(
        input=args.input,
        output=args.output,
        config=config,
        filters=filters,
        shard_bytes=_parse_size(args.shard_size),
        audio=args.audio,
        workdir=args.workdir,
        progress=not args.quiet,
    )
    try:
        summary = preprocess(options)
    except (FileNotFoundError, RunDirError, LeaseHeld) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_SOME_FAILED if summary.films_failed else EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from training.train import TrainConfig, TrainingDataError, train

    try:
        config = load_settings(TrainConfig, args.config, args.set or [])
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        train(args.data, args.output_model, config, use_ray=not args.no_ray)
    except (FileNotFoundError, TrainingDataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"model: {args.output_model} (loss curve: {args.output_model}/loss.png)")
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from training.evaluate import evaluate

    try:
        result = evaluate(
            args.model, args.data, args.output, sync_expert=args.sync_expert, max_clips=args.max_clips, steps=args.steps
        )
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(f"metrics: {args.output}/metrics.json  report: {args.output}/index.html")
    print(json.dumps(result["mean"], indent=1))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabledub", description="Visual dubbing of film catalogs (StableDub on Ray Data).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every film as it completes")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pack", help="pack films and dub tracks into webdataset shards")
    p.add_argument("videos", nargs="*", help="film files (local paths or fsspec URLs)")
    p.add_argument("--dub", action="append", help="dub audio for the film at the same position (repeat)")
    p.add_argument("--key", action="append", help="film key for the film at the same position (default: file name)")
    p.add_argument("--manifest", help="CSV (video,dub,key,metadata) or JSONL manifest of films")
    p.add_argument("-o", "--output", required=True, help="shard pattern, e.g. shards/films-{0000..0099}.tar or films-%%04d.tar")
    p.add_argument("--shard-size", default="1G", help="start a new shard before one passes this size (default 1G)")
    p.add_argument("--allow-missing-dub", action="store_true", help="pack films without a dub track anyway")
    p.set_defaults(func=cmd_pack)

    r = sub.add_parser("run", help="dub every film of INPUT shards into OUTPUT")
    r.add_argument("input", help="shard URL or brace pattern, e.g. s3://bucket/films-{0000..0099}.tar")
    r.add_argument("output", help="output directory URL (local path, s3://...)")
    r.add_argument("--model", help="inpaint model: built-in name (identity, grey) or checkpoint path/URL")
    r.add_argument("--workdir", help="run directory URL (default: OUTPUT/_stabledub_run)")
    r.add_argument("--config", help="YAML or JSON config file")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. encode.crf=18")
    r.add_argument("--debug", action="store_true", help="also write <key>.debug.mp4 overlays")
    r.add_argument("--retry-failed", action="store_true", help="retry films that failed in an earlier run")
    r.add_argument("--keep-intermediate", action="store_true", help="keep encoded segments and films in the run directory")
    r.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    r.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics on this port during the run")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("config", help="print the effective configuration (defaults + --config + --set) as YAML")
    c.add_argument("--config", help="YAML or JSON config file")
    c.add_argument("--set", action="append", metavar="KEY=VALUE")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("demo", help="build a demo film from packaged material and dub it")
    d.add_argument("--output", default="demo-output")
    d.set_defaults(func=cmd_demo)

    pp = sub.add_parser("preprocess", help="films -> webdataset training shards of per-track segments (no inpainting)")
    pp.add_argument("input", help="film shard URL or brace pattern (as for run)")
    pp.add_argument("output", help="output directory URL for train-NNNNNN.tar shards")
    pp.add_argument("--config", help="YAML or JSON pipeline config file")
    pp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a pipeline config value")
    pp.add_argument(
        "--filter",
        action="append",
        metavar="KEY=VALUE",
        help="override a filter (min_frames, min_face_px, min_speech, shift_max, drop_offset, ...)",
    )
    pp.add_argument("--shard-size", default="1G", help="start a new training shard before one passes this size (default 1G)")
    pp.add_argument(
        "--audio",
        choices=allowed_values(AudioConfig, "source"),
        default="dub",
        help="featurize the dub member (default) or the film's own audio",
    )
    pp.add_argument("--workdir", help="run directory URL (default: OUTPUT/_stabledub_preprocess)")
    pp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pp.set_defaults(func=cmd_preprocess)

    t = sub.add_parser("train", help="train StableDub on training shards (Ray Train); resumes from OUTPUT_MODEL/checkpoints")
    t.add_argument("data", help="directory, pattern or file of training shards")
    t.add_argument("output_model", help="output folder (diffusers StableDubPipeline)")
    t.add_argument("--config", help="YAML training config (keys of training.train.TrainConfig)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a training config value")
    t.add_argument("--no-ray", action="store_true", help="run the training loop in this process (no Ray Train)")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="self-reenactment metrics of MODEL on held-out clips")
    e.add_argument("model", help="StableDub checkpoint folder, or a baseline: source, frozen")
    e.add_argument("data", help="training shards (directory/pattern) or a folder of mp4 files with their own audio")
    e.add_argument("-o", "--output", required=True, help="directory for metrics.json and index.html")
    e.add_argument("--sync-expert", default="", help="sync expert folder (default: the shipped one, if any)")
    e.add_argument("--max-clips", type=int, default=0, help="evaluate at most this many clips (0: all)")
    e.add_argument("--steps", type=int, default=20, help="denoising steps")
    e.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("stabledub").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
