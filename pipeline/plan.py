"""The Ray Data plan: shards -> film segments -> the stages of the stage table, with their resources.

`run` (dubbing) and `preprocess` (training corpora) both build their datasets here, from
`pipeline/stage_table.py`; they differ only in which stages they take.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from pipeline.adaptation import adaptation_values
from pipeline.config import PipelineConfig
from pipeline.locations import OverlapError, check_disjoint, input_files, pattern_folders
from pipeline.planner import index_shard_rows, plan_film_rows, plan_items
from pipeline.rundir import RunDir
from pipeline.shards import expand_urls, input_root, relative_shard_names
from pipeline.stage_table import STAGES, StageSpec
from stages.storage import filesystem, is_local

# A decoded segment is megabytes, so this makes every segment its own block from decode on.
# Otherwise a film's segments share one block: each stage sees one task per film, nothing
# pipelines inside a film, and the GPU pool's queue (what both autoscalers read) stays short.
SEGMENT_BLOCK_BYTES = 1 << 20


# Quiet by default: what the libraries in the actors print (TFLite/glog, diffusers and transformers
# warnings, Hugging Face progress bars) goes nowhere, and Ray's own INFO lines stay out of the driver.
QUIET_ENV = {
    "GLOG_minloglevel": "2",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_LOG_LEVEL": "ERROR",
}
_verbose = False


def set_verbose(verbose: bool) -> None:
    """`stabledub -v`: show everything Ray, Ray Data and the actors' libraries log; else only errors."""
    global _verbose
    _verbose = verbose
    if not verbose:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)


def init_ray() -> None:
    import ray
    import ray.data

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        ray.init(
            address=address or None,
            include_dashboard=False,
            log_to_driver=_verbose,
            logging_level=logging.INFO if _verbose else logging.ERROR,
            runtime_env=None if _verbose else {"env_vars": dict(QUIET_ENV)},
        )
    quiet_ray_data(ray.data.DataContext.get_current())


def quiet_ray_data(context) -> None:
    """Ray Data's start-of-execution lines and memory advisories appear only with -v."""
    context.print_on_execution_start = _verbose
    if not _verbose:
        context.issue_detectors_config.detectors = []
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def resolve_gpus(requested: float) -> float:
    """-1 means auto: one GPU per actor when the cluster has GPUs, else CPU."""
    if requested >= 0:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def stage_kwargs(spec: StageSpec, config: PipelineConfig, plan_values: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments of one stage: its config section and its declared extras."""
    kwargs: dict[str, Any] = {"config": getattr(config, spec.name)}
    for keyword, path in spec.config_extras.items():
        value: Any = config
        for part in path.split("."):
            value = getattr(value, part)
        kwargs[keyword] = value
    for keyword in spec.plan_extras:
        kwargs[keyword] = plan_values[keyword]
    return kwargs


def build_stage(spec: StageSpec, config: PipelineConfig, **plan_values: Any):
    """One stage built as the plan builds it (for tests, benchmarks and tools outside Ray)."""
    return spec.stage(**stage_kwargs(spec, config, plan_values))


def active_stages(stages: Sequence[StageSpec], config: PipelineConfig) -> list[StageSpec]:
    """The stages a plan runs: an optional one (adapt) only when its config section is active."""
    return [spec for spec in stages if not spec.optional or getattr(config, spec.name).active]


def build_dataset(
    urls: list[str],
    config: PipelineConfig,
    run: RunDir,
    stages: Sequence[StageSpec] = STAGES,
    retry_failed: bool = False,
):
    """shards (or manifests) -> film rows -> segment rows -> each stage of `stages` as an actor pool."""
    import ray

    ray.data.DataContext.get_current().target_max_block_size = SEGMENT_BLOCK_BYTES
    items = plan_items(urls, run, retry_failed)
    # one block per shard, as before; a manifest's films spread over up to 256 blocks to plan in parallel
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), max(len(urls), 256))))
    ds = ds.flat_map(index_shard_rows, fn_kwargs={"run_dir": run.url, "retry_failed": retry_failed}, num_cpus=0.1)
    ds = ds.flat_map(
        plan_film_rows,
        fn_kwargs={
            "run_dir": run.url,
            "target_seconds": config.segment.target_seconds,
            "max_seconds": config.segment.max_seconds,
            "overlap": config.segment.overlap_frames,
            "downmix": config.audio.downmix,
        },
        num_cpus=0.1,
    )
    plan_values = {"segment_url": run.segment_url, "summary_url": run.track_summary_url, "done_segments": run.done_segments}
    if any(spec.name == "adapt" for spec in stages):
        plan_values.update(adaptation_values(config, run, resolve_gpus(config.resources["inpaint"].num_gpus)))
    for spec in active_stages(stages, config):
        res = config.resources[spec.name]
        ds = ds.map_batches(
            spec.stage,
            fn_constructor_kwargs=stage_kwargs(spec, config, plan_values),
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
            num_cpus=res.num_cpus,
            num_gpus=resolve_gpus(res.num_gpus) or None,
            memory=res.memory_gb * 2**30 or None,
            batch_size=res.batch_size,
            batch_format="numpy",
            zero_copy_batch=False,
        )
    return ds


def open_run(input_pattern: str | list[str], output: str, run_dir: str, root: str | None = None) -> tuple[list[str], RunDir]:
    """The shard URLs a run reads (refusing a pattern that matches none, and an output or run
    directory that overlaps an input), with its output ready. Each shard's name under the output is
    its path relative to `root` (default: the pattern's folder before its first wildcard)."""
    urls = expand_urls(input_pattern)
    if not urls:
        raise FileNotFoundError(f"no shards match {input_pattern}")
    check_disjoint(
        input_files(urls),
        {"output": output, "run directory": run_dir},
        pattern_folders(root if root is not None else input_pattern),
    )
    try:
        names = relative_shard_names(urls, input_root(root if root is not None else input_pattern))
    except ValueError as error:  # two inputs with one output name
        raise OverlapError(str(error)) from None
    fs, out_path = filesystem(output)
    if is_local(fs):
        os.makedirs(out_path, exist_ok=True)
    return urls, RunDir(run_dir, names)
