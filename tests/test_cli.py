"""The `bench` command line: help, bad input, and real subprocesses end to end."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from benchmark.cli import app
from conftest import assert_one_line_error, write_idx
from models import REGISTRY, create_model, parameter_count

BENCH = str(Path(sys.executable).with_name("bench"))


def train_mlp(mnist_dir, workspace: Path, *args: str):
    """`bench train --model mlp ARGS` on the real data into `workspace`, through CliRunner."""
    return CliRunner().invoke(app, ["train", "--model", "mlp", *args, "--data-dir", str(mnist_dir),
                                    "--workspace", str(workspace)])


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = result.output.split("Commands")[1]
    listed = {m.group(1) for m in re.finditer(r"^[│|] (\S+) ", panel, re.MULTILINE)}  # first word of each row
    assert listed == {"data", "models", "train", "errors", "report", "ensemble", "assist", "bound", "tree",
                      "glimpse-gains", "human-label"}


def test_models_lists_baselines_with_parameter_counts():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    # a row's first line: │ name │ parameters │ ... (a long description continues on lines with blank first cells)
    rows = dict(re.findall(r"^│ (\S+)\s*│ ([\d,]+)\s*│", result.output, re.MULTILINE))
    assert rows == {name: f"{parameter_count(create_model(name)):,}" for name in REGISTRY}
    assert rows["mlp"] == "79,510"  # 784*100+100 + 100*10+10


def test_data_on_an_altered_file_fails_cleanly(tmp_path, mnist_dir):
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (tmp_path / name).symlink_to(Path(mnist_dir) / name)
    labels = np.zeros(10000, dtype=np.uint8)  # right header and size, wrong content
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    result = CliRunner().invoke(app, ["data", "--data-dir", str(tmp_path), "--workspace", str(tmp_path / "ws")])
    assert_one_line_error(result, "t10k-labels-idx1-ubyte.gz: altered")


def test_unknown_model_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", "resnet9000", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "unknown model 'resnet9000'")
    assert "cnn" in result.output  # the error lists the models there are


def test_subprocess_train_then_errors(tmp_path, mnist_dir):
    """The installed console script, as a user runs it: data, a tiny training run, the hard set."""
    env = {**os.environ, "BENCH_DATA_DIR": str(mnist_dir), "BENCH_WORKSPACE": str(tmp_path)}

    def bench(*args):
        return subprocess.run([BENCH, *args], env=env, capture_output=True, text=True, timeout=300)

    data = bench("data")
    assert data.returncode == 0, data.stderr
    assert "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7  t10k-images-idx3-ubyte" in data.stdout
    trained = bench("train", "--model", "mlp", "--epochs", "3", "--train-subset", "1000", "--seed", "1", "--keep-best")
    assert trained.returncode == 0, trained.stderr
    meta = json.loads((tmp_path / "runs" / "mlp-best-s1" / "meta.json").read_text())
    probs = np.load(tmp_path / "runs" / "mlp-best-s1" / "test_probs.npy")
    assert probs.shape == (10000, 10)
    assert meta["test_errors"] == int((probs.argmax(1) != np.asarray(_test_labels(mnist_dir))).sum())
    assert meta["data"]["sha256"]["t10k-images-idx3-ubyte"].startswith("0fa7898d")
    epoch_errors = [row["val_errors"] for row in meta["history"]]  # --keep-best: the best validation epoch
    assert meta["config"]["keep_best"] and meta["val_errors"] == min(epoch_errors) == epoch_errors[meta["kept_epoch"] - 1]
    errors = bench("errors", "--run", "mlp-best-s1")
    assert errors.returncode == 0, errors.stderr
    items = (tmp_path / "hardsets" / "mlp-best-s1" / "items.csv").read_text().splitlines()
    assert len(items) - 1 == meta["test_errors"]
    bad = bench("train", "--model", "mlp", "--device", "tpu")
    assert_one_line_error(bad, "expected auto, cpu or cuda")


def _test_labels(mnist_dir):
    from benchmark.data import MNIST_FILES, read_idx

    return read_idx(Path(mnist_dir) / "t10k-labels-idx1-ubyte.gz", MNIST_FILES["test_labels"])[0]


def test_glimpses_option_only_for_the_glimpse_model(tmp_path):
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "--glimpses", "2", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "--glimpses applies to the glimpse model only")


def test_model_options_are_checked_against_the_builder(tmp_path):
    from models.registry import parse_model_options

    assert parse_model_options("softorder", ["pool=max", "bins=4", "ink_threshold=0.2"]) == \
        {"pool": "max", "bins": 4, "ink_threshold": 0.2}
    result = CliRunner().invoke(app, ["train", "--model", "softorder", "--set", "pooling=max",
                                      "--workspace", str(tmp_path)])
    assert_one_line_error(result, "model softorder has no option 'pooling'; it accepts: points, pool, bins")
    result = CliRunner().invoke(app, ["train", "--model", "softorder", "--set", "max", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "is not KEY=VALUE")
    result = CliRunner().invoke(app, ["train", "--model", "cowmask", "--set", "mode=blend", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "cannot be built with mode=blend: mode 'blend': expected mix or erase")
    # a value of another kind than the option's default says what is expected, not what torch tripped over
    for model, option, expected in [("glimpse", "glimpses=abc", "expected a whole number (default 25)"),
                                    ("glimpse", "glimpses=2.5", "expected a whole number (default 25)"),
                                    ("mlp", "hidden=True", "expected a whole number (default 100)"),
                                    ("cnn", "deskew=1", "expected True or False (default False)"),
                                    ("softorder", "ink_threshold=high", "expected a number (default")]:
        result = CliRunner().invoke(app, ["train", "--model", model, "--set", option, "--workspace", str(tmp_path)])
        assert_one_line_error(result, f"model option {option}: {expected}")
    assert parse_model_options("glimpse", ["explore=1", "policy=grid"]) == {"explore": 1, "policy": "grid"}
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "--set", "hidden=10", "--set", "hidden=20",
                                      "--workspace", str(tmp_path)])
    assert_one_line_error(result, "model option hidden is given twice")
    # sizes torch cannot make and values that would only fail mid-training are refused up front too
    for model, option in [("mixer", "patch=0"), ("cnn", "width=-1"), ("mlp", "hidden=0"),
                          ("glimpse", "explore_steps=0")]:
        extra = ["--set", "explore=1.0"] if model == "glimpse" else []
        result = CliRunner().invoke(app, ["train", "--model", model, "--set", option, *extra,
                                          "--workspace", str(tmp_path)])
        assert_one_line_error(result, f"model {model} cannot be built with {option}")
    assert not (tmp_path / "runs").exists()


def test_model_option_reaches_the_model_and_names_the_run(tmp_path, mnist_dir):
    # the mlp: its evaluation on 15,000 images takes a second (a softorder's, a minute)
    result = train_mlp(mnist_dir, tmp_path, "--set", "hidden=20", "--epochs", "1", "--train-subset", "256")
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "runs" / "mlp-hidden20-s0" / "meta.json").read_text())
    assert meta["config"]["model_kwargs"] == {"hidden": 20}
    from benchmark.runs import load_model, load_run

    model = load_model(load_run(tmp_path, "mlp-hidden20-s0"))
    assert model.hidden.out_features == 20


def test_a_saved_run_is_not_replaced_by_another_recipe(tmp_path, mnist_dir):
    """The default name does not hold the schedule: training the same name with other epochs stops before
    training and leaves the saved run as it was; the same command again is a re-run and replaces it."""
    train = functools.partial(train_mlp, mnist_dir, tmp_path, "--train-subset", "200")
    assert train("--epochs", "1").exit_code == 0
    saved = tmp_path / "runs" / "mlp-s0" / "meta.json"
    first = saved.read_bytes()
    assert_one_line_error(train("--epochs", "2"), "already saved with another recipe (epochs 1 -> 2): give --name")
    assert saved.read_bytes() == first
    assert train("--epochs", "2", "--name", "mlp-e2").exit_code == 0
    (saved.parent / "marker").touch()
    assert train("--epochs", "1").exit_code == 0  # a re-run of the same recipe replaces the run folder
    assert saved.is_file() and not (saved.parent / "marker").exists()


def test_a_killed_training_refuses_to_start_over_and_resumes_from_its_checkpoint(tmp_path, mnist_dir):
    """A training process killed part-way (a closed session) leaves its last epoch's checkpoint; the same command
    refuses to overwrite it, with --resume it continues from there, and the checkpoint goes once the run is saved."""
    env = {**os.environ, "BENCH_DATA_DIR": str(mnist_dir), "BENCH_WORKSPACE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    command = [BENCH, "train", "--model", "mlp", "--epochs", "40", "--train-subset", "2000"]
    checkpoint = tmp_path / "checkpoints" / "mlp-s0.pt"
    job = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        job.kill()
        job.wait()
    assert checkpoint.exists() and not (tmp_path / "runs" / "mlp-s0").exists()
    saved = checkpoint.read_bytes()
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert_one_line_error(refused, "add --resume to continue it")
    assert checkpoint.read_bytes() == saved
    resumed = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    meta = json.loads((tmp_path / "runs" / "mlp-s0" / "meta.json").read_text())
    assert len(meta["history"]) == 40 and len(meta["resumed_after"]) == 1 and 1 <= meta["resumed_after"][0] < 40
    assert f"resuming mlp after epoch {meta['resumed_after'][0]} of 40" in resumed.stdout
    assert [row["epoch"] for row in meta["history"]] == list(range(1, 41))
    assert not checkpoint.exists()


def test_glimpses_flag_and_set_option_train_the_same_named_run(tmp_path, mnist_dir):
    common = ["train", "--model", "glimpse", "--epochs", "1", "--train-subset", "64", "--data-dir", str(mnist_dir)]
    for how, ws in ((["--glimpses", "2"], tmp_path / "flag"), (["--set", "glimpses=2"], tmp_path / "set")):
        result = CliRunner().invoke(app, [*common, *how, "--workspace", str(ws)])
        assert result.exit_code == 0, result.output
        assert [p.name for p in (ws / "runs").iterdir()] == ["glimpse-k2-s0"]
        meta = json.loads((ws / "runs" / "glimpse-k2-s0" / "meta.json").read_text())
        assert meta["config"]["model_kwargs"]["glimpses"] == 2
        assert len(meta["step_accuracy"]) == len(meta["val_step_accuracy_rounded"]) == 2


def test_glimpse_gains_reads_a_grid_run_and_refuses_other_runs(tmp_path, mnist_dir):
    common = ["--data-dir", str(mnist_dir), "--workspace", str(tmp_path)]
    for options in (["--set", "policy=grid", "--set", "explore=1.0"], []):
        trained = CliRunner().invoke(app, ["train", "--model", "glimpse", "--glimpses", "3", "--epochs", "1",
                                           "--train-subset", "64", *options, *common])
        assert trained.exit_code == 0, trained.output
    result = CliRunner().invoke(app, ["glimpse-gains", "--run", "glimpse-policygrid-explore1.0-k3-s0", "--images", "50",
                                      "--candidates", "4", *common])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["step", "accuracy"])
    assert [line.split()[0] for line in lines[header + 1:]] == ["1", "2", "3"]
    refused = CliRunner().invoke(app, ["glimpse-gains", "--run", "glimpse-k3-s0", *common])
    assert_one_line_error(refused, "is not a glimpse run with --set policy=grid")
    too_many = CliRunner().invoke(app, ["glimpse-gains", "--run", "glimpse-policygrid-explore1.0-k3-s0",
                                        "--candidates", "782", *common])
    assert_one_line_error(too_many, "expected 1 to 781 (the pixels left unread after 3 glimpses)")


def test_distillation_from_a_saved_teacher_run(tmp_path, mnist_dir):
    for teacher in ([], ["--teacher", "mlp-s3-l10"]):
        result = train_mlp(mnist_dir, tmp_path, "--labels", "10", "--seed", "3", "--epochs", "1", "--train-subset",
                           "100", *teacher)
        assert result.exit_code == 0, result.output
    student = json.loads((tmp_path / "runs" / "mlp-s3-l10-from-mlp-s3-l10" / "meta.json").read_text())
    assert student["config"]["teacher"] == "mlp-s3-l10" and student["config"]["labels"] == 10
    # the student trains on its 10 labelled images plus the 100 (subset) others at the teacher's probabilities
    assert student["history"][0]["steps"] == -(-110 // student["config"]["batch_size"]) > 1


def test_a_teacher_must_have_learnt_from_the_students_labels(tmp_path):
    from benchmark.runs import save_run

    meta = {"name": "teacher", "model": "cowmask", "seed": 1, "config": {"labels": 1000, "model_kwargs": {}}}
    save_run(tmp_path, "teacher", meta, np.full((10000, 10), 0.1, dtype=np.float32))
    for args, message in [(["--labels", "1000", "--seed", "0"], "trained with --labels 1000 --seed 1; give the student"),
                          (["--labels", "500", "--seed", "1"], "trained with --labels 1000 --seed 1; give the student"),
                          (["--seed", "1"], "--teacher needs --labels N")]:
        result = CliRunner().invoke(app, ["train", "--model", "cnn", "--teacher", "teacher", *args,
                                          "--workspace", str(tmp_path)])
        assert_one_line_error(result, message)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["teacher"]


def test_a_run_name_is_never_a_path_so_no_command_writes_over_a_saved_run(tmp_path, mnist_dir):
    """`--run ../runs/X` once read run X and then wrote the hard set (or the assist result) over its folder."""
    from benchmark.runs import save_run

    save_run(tmp_path, "mlp-s0", {"name": "mlp-s0", "model": "mlp", "config": {}},
             np.full((10000, 10), 0.1, dtype=np.float32), state_dict={})
    before = sorted(p.name for p in (tmp_path / "runs" / "mlp-s0").iterdir())
    for command in (["errors", "--run", "../runs/mlp-s0"], ["assist", "--run", "../runs/mlp-s0"],
                    ["ensemble", "--run", "../runs/mlp-s0", "--run", "mlp-s0"],
                    ["glimpse-gains", "--run", "../runs/mlp-s0"]):
        result = CliRunner().invoke(app, [*command, "--data-dir", str(mnist_dir), "--workspace", str(tmp_path)])
        assert_one_line_error(result, "run '../runs/mlp-s0': a run name is a folder name in")
    assert sorted(p.name for p in (tmp_path / "runs" / "mlp-s0").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_damaged_run_is_a_one_line_error_and_is_left_as_it_is(tmp_path):
    from benchmark.runs import save_run

    probs = np.full((10000, 10), 0.1, dtype=np.float32)
    meta = {"name": "teacher", "model": "mlp", "seed": 0, "config": {"labels": 100}}
    save_run(tmp_path, "teacher", meta, probs, state_dict={})
    model_file = tmp_path / "runs" / "teacher" / "model.pt"
    for content, message in [(b"garbage", "model.pt is damaged or not a weights file"),
                             (model_file.read_bytes()[:40], "model.pt is damaged or not a weights file")]:
        model_file.write_bytes(content)
        result = CliRunner().invoke(app, ["train", "--model", "mlp", "--labels", "100", "--teacher", "teacher",
                                          "--workspace", str(tmp_path)])
        assert_one_line_error(result, message)
        assert model_file.read_bytes() == content
    (tmp_path / "runs" / "teacher" / "meta.json").write_text("[1, 2, 3]")
    result = CliRunner().invoke(app, ["ensemble", "--run", "teacher", "--workspace", str(tmp_path)])
    assert_one_line_error(result, "meta.json is damaged")


def test_bad_numbers_and_unusable_folders_are_one_line_errors(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    for command, message in [
            (["train", "--model", "mlp", "--train-subset", "0"], "--train-subset 0: expected a positive number"),
            (["train", "--model", "mlp", "--labels", "0"], "--labels 0: expected a positive number"),
            (["train", "--model", "mlp", "--seed", "-1"], "--seed -1: expected a whole number from 0"),
            (["tree", "--seed", "-1"], "--seed -1: expected a whole number from 0"),
            (["assist", "--run", "x", "--steps", "0"], "--steps 0: expected 1 or more"),
            (["ensemble", "--members", "mlp", "--seeds", "0"], "--seeds 0: expected 1 or more"),
            (["train", "--model", "mlp", "--workspace", str(a_file)], "is a file, not a folder"),
            (["report", "--out", str(a_file / "report")], "check that --workspace (or --out) is a folder you can write")]:
        result = CliRunner().invoke(app, [*command, *([] if "--workspace" in command else
                                                      ["--workspace", str(tmp_path / "ws")])])
        assert_one_line_error(result, message)
    assert a_file.read_text() == "not a folder"


def test_a_hard_set_is_replaced_only_by_the_same_gathering(tmp_path, mnist_dir):
    """People may be labelling a hard set: gathering another one under its name would orphan their answers."""
    from benchmark.runs import save_run
    from conftest import fabricated_probs

    labels = np.asarray(_test_labels(mnist_dir))
    for name, wrong in [("a-s0", [1, 2]), ("b-s0", [3])]:
        save_run(tmp_path, name, {"name": name, "model": "mlp"}, fabricated_probs(labels, np.array(wrong)))

    def errors(*args):
        return CliRunner().invoke(app, ["errors", *args, "--data-dir", str(mnist_dir), "--workspace", str(tmp_path)])

    assert errors("--run", "a-s0", "--name", "hard").exit_code == 0
    saved = (tmp_path / "hardsets" / "hard" / "items.csv").read_bytes()
    assert_one_line_error(errors("--run", "b-s0", "--name", "hard"), "hard set hard is already gathered from other")
    assert_one_line_error(errors("--run", "a-s0", "--run", "a-s0"), "--run names a run more than once")
    assert (tmp_path / "hardsets" / "hard" / "items.csv").read_bytes() == saved
    assert errors("--run", "a-s0", "--name", "hard").exit_code == 0  # the same gathering again is a re-run
