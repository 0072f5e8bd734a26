"""The command line refuses bad input before Ray starts: one line on stderr naming the thing, exit 2."""

from __future__ import annotations

from pipeline import cli
from tests.conftest import shared_clip, shared_dub


def refusal(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a usage refusal; return its one stderr line."""
    import ray

    assert cli.main(argv) == cli.EXIT_USAGE
    assert not ray.is_initialized()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_pack_refuses_a_bad_shard_size_and_a_missing_film(capsys, tmp_path):
    clip, dub = str(shared_clip("frozen_298")), str(shared_dub("es"))
    line = refusal(capsys, ["pack", clip, "--dub", dub, "-o", str(tmp_path / "f-%04d.tar"), "--shard-size", "lots"])
    assert "--shard-size 'lots'" in line and "512M" in line
    line = refusal(capsys, ["pack", str(tmp_path / "nope.mp4"), "--dub", dub, "-o", str(tmp_path / "f-%04d.tar")])
    assert "nope.mp4 does not exist" in line
    assert list(tmp_path.iterdir()) == []


def test_run_refuses_a_pattern_naming_missing_shards_and_a_missing_config(capsys, tmp_path):
    (tmp_path / "films-0000.tar").write_bytes(b"x")
    pattern = str(tmp_path / "films-{0000..0009}.tar")
    line = refusal(capsys, ["run", pattern, str(tmp_path / "out")])
    assert "films-0001.tar and 8 more do not exist" in line and "--allow-missing" in line
    line = refusal(capsys, ["run", str(tmp_path / "none-{0..3}.tar"), str(tmp_path / "out")])
    assert "no shard it names exists" in line
    line = refusal(capsys, ["run", pattern, str(tmp_path / "out"), "--config", str(tmp_path / "missing.yaml")])
    assert "--config" in line and "missing.yaml does not exist" in line
    (tmp_path / "file").write_text("")
    line = refusal(capsys, ["run", str(tmp_path / "films-0000.tar"), str(tmp_path / "file")])
    assert "is a file" in line
    line = refusal(capsys, ["run", pattern, str(tmp_path / "out"), "--metrics-port", "99999"])
    assert "--metrics-port" in line and "1 to 65535" in line
    assert not (tmp_path / "out").exists()


def test_allow_missing_keeps_the_shards_that_exist(capsys, tmp_path):
    (tmp_path / "films-0001.tar").write_bytes(b"x")
    assert cli.check_input(str(tmp_path / "films-{0000..0002}.tar"), allow_missing=True) == [str(tmp_path / "films-0001.tar")]
    assert "skipping 2 missing shard(s)" in capsys.readouterr().err


def test_config_refuses_a_missing_file_and_a_bad_value(capsys, tmp_path):
    assert "missing.yaml does not exist" in refusal(capsys, ["config", "--config", str(tmp_path / "missing.yaml")])
    assert "encode.crf=99 is not allowed; allowed: 0 to 51" in refusal(capsys, ["config", "--set", "encode.crf=99"])


def test_demo_refuses_an_output_holding_folders_it_did_not_create(capsys, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    line = refusal(capsys, ["demo", "--output", str(tmp_path)])
    assert "run/" in line and "did not create" in line
    assert (tmp_path / "run" / "precious.txt").exists()


def test_preprocess_refuses_a_bad_shard_size_and_missing_shards(capsys, tmp_path):
    (tmp_path / "films-0000.tar").write_bytes(b"x")
    line = refusal(capsys, ["preprocess", str(tmp_path / "films-0000.tar"), str(tmp_path / "c"), "--shard-size", "-1G"])
    assert "--shard-size" in line
    line = refusal(capsys, ["preprocess", str(tmp_path / "films-{0000..0001}.tar"), str(tmp_path / "c")])
    assert "films-0001.tar does not exist" in line


def test_train_refuses_data_without_training_shards(capsys, tmp_path):
    line = refusal(capsys, ["train", str(tmp_path), str(tmp_path / "model"), "--no-ray"])
    assert "no training shards" in line
    assert "steps" in refusal(capsys, ["train", str(tmp_path), str(tmp_path / "model"), "--set", "steps=-3"])


def test_eval_refuses_a_model_that_is_not_a_folder_and_bad_numbers(capsys, tmp_path):
    line = refusal(capsys, ["eval", str(tmp_path / "no-model"), str(tmp_path), "-o", str(tmp_path / "e")])
    assert "no-model is not a folder" in line and "source, frozen" in line
    line = refusal(capsys, ["eval", "source", str(tmp_path), "-o", str(tmp_path / "e"), "--steps", "0"])
    assert "--steps" in line and "at least 1" in line


def test_version_verbosity_anywhere_and_defaults_in_help(capsys):
    from importlib.metadata import version

    assert cli.main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"stabledub {version('stabledub')}"
    parser = cli.build_parser()
    assert parser.parse_args(["-v", "config"]).verbose and parser.parse_args(["config", "-v"]).verbose
    assert parser.parse_args(["config", "-q"]).quiet and not parser.parse_args(["config"]).verbose
    pack_help = parser._subparsers._group_actions[0].choices["pack"].format_help()
    assert "(default: 1G)" in pack_help
    eval_help = parser._subparsers._group_actions[0].choices["eval"].format_help()
    assert "(default: 20)" in eval_help
