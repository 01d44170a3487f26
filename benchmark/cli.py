"""`bench`: the one command-line entry point. Each sub-command is a thin shell over a module that does
the work; heavy imports (torch) happen inside the commands so `bench --help` stays fast.

User errors (`BenchError`) end as one line on stderr and exit code 2, never a traceback (`cli_common`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from benchmark.cli_common import (DataDirOpt, WorkspaceOpt, check_name, console, user_errors,
                                  workspace_path)
from benchmark.errors import BenchError
from human_eval.cli import human_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="digit-bench: human-vs-model benchmark and error analysis on MNIST.")


@app.command()
@user_errors
def data(data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Verify the MNIST files (header, length, SHA-256) and show where they were found."""
    from benchmark.data import MNIST_FILES, load_mnist

    mnist = load_mnist(data_dir, workspace_path(workspace))
    table = Table(title=f"MNIST verified in {mnist.source}")
    for col in ("file", "items", "header", "SHA-256"):
        table.add_column(col)
    for key, spec in MNIST_FILES.items():  # key: the Mnist field holding the file's array
        table.add_row(spec.stem, f"{len(getattr(mnist, key)):,}", "ok", "matches canonical")
    console.print(table)
    for spec in MNIST_FILES.values():  # sha256sum's format, so users can compare with their own tools
        console.print(f"{mnist.digests[spec.stem]}  {spec.stem}", highlight=False, soft_wrap=True)
    fit, val = mnist.validation_split()
    console.print(f"split: {len(fit):,} fit / {len(val):,} validation (fixed seed) / {len(mnist.test_labels):,} test")


@app.command()
def models():
    """List the registered models with a one-line description and parameter count."""
    from models import REGISTRY, create_model, parameter_count

    table = Table(title="models")
    for col in ("name", "parameters", "description"):
        table.add_column(col)
    for name, entry in sorted(REGISTRY.items()):
        table.add_row(name, f"{parameter_count(create_model(name)):,}", entry.description)
    console.print(table)


@app.command()
@user_errors
def train(model: str = typer.Option(..., "--model", help="Registered model name (see `bench models`)."),
          epochs: Optional[int] = typer.Option(None, help="Epochs (default: the model's)."),
          seed: int = typer.Option(0, help="Seed for initialisation, shuffling and augmentation."),
          lr: Optional[float] = typer.Option(None, help="Peak learning rate (default: the model's)."),
          batch_size: Optional[int] = typer.Option(None, help="Batch size (default: the model's)."),
          labels: Optional[int] = typer.Option(None, help="Use only N labelled fit images (class-balanced, seeded)."),
          glimpses: Optional[int] = typer.Option(None, help="glimpse model: number of glimpses K (default 25)."),
          teacher: Optional[str] = typer.Option(None, help="Distil: with --labels N, the other fit images are "
                                                "targeted at this run's probabilities (same labels and seed)."),
          model_option: List[str] = typer.Option([], "--set", help="Model option KEY=VALUE, repeatable (e.g. "
                                                 "--set pool=max for softorder); names the run unless --name."),
          train_subset: Optional[int] = typer.Option(None, help="Use only the first N fit images (smoke tests)."),
          keep_best: bool = typer.Option(False, "--keep-best", help="End with the epoch that made the fewest "
                                         "validation errors (latest on ties), not the last; tags the run -best."),
          all_train: bool = typer.Option(False, "--all-train", help="Fit on all 60,000 training images, holding "
                                         "no validation out: the final refit of a recipe chosen on validation; "
                                         "tags the run -all."),
          resume: bool = typer.Option(False, "--resume", help="Continue the run from its checkpoint (saved after "
                                      "every epoch in <workspace>/checkpoints) with the same options."),
          device: str = typer.Option("auto", help="auto, cpu or cuda."),
          name: Optional[str] = typer.Option(None, help="Run name (default: <model>, a tag per --set option, -k<K>, "
                                             "-best, -all, then -s<seed>, -l<labels>, -from-<teacher>)."),
          data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Train a model on the 55,000 fit images (or all 60,000), select nothing on the test set, save the run.

    After every epoch the training state is saved to <workspace>/checkpoints/<run>.pt, so a run stopped part-way
    (a closed session, a killed job) goes on with --resume; the checkpoint is removed once the run is saved."""
    import time
    from dataclasses import asdict

    from benchmark.config import recipe_changes
    from benchmark.data import load_mnist
    from benchmark.runs import machine_description, save_run, versions
    from benchmark.train import pick_device, resolve_config, train_model
    from models.registry import parse_model_options

    if glimpses is not None and model != "glimpse":
        raise BenchError(f"--glimpses applies to the glimpse model only, not {model}")
    check_seed(seed)
    try:
        cfg = resolve_config(model, epochs=epochs, lr=lr, batch_size=batch_size, labels=labels, teacher=teacher,
                             train_subset=train_subset, keep_best=keep_best or None,
                             all_train=all_train or None)
    except KeyError as exc:
        raise BenchError(str(exc.args[0])) from None
    if glimpses is not None:  # the same as --set glimpses=K, and named the same
        model_option = [*model_option, f"glimpses={glimpses}"]
    try:
        options = parse_model_options(model, model_option)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    cfg.model_kwargs = {**cfg.model_kwargs, **options}
    ws = workspace_path(workspace)
    torch_device = pick_device(device)
    teacher_model = load_teacher(ws, teacher, labels, seed) if teacher else None
    mnist = load_mnist(data_dir, ws)
    option_tags = "".join(f"-k{value}" if key == "glimpses" else "-" + re.sub(r"[^\w.-]", "", f"{key}{value}")
                          for key, value in options.items())  # glimpses=2 -> -k2, pool=max -> -poolmax
    option_tags += ("-best" if keep_best else "") + ("-all" if all_train else "")
    run_name = (check_name(name, "runs") if name else f"{model}{option_tags}-s{seed}"
                + (f"-l{labels}" if labels is not None else "") + (f"-from-{teacher}" if teacher else ""))
    refuse_other_recipe(ws, run_name, model, lambda saved: recipe_changes(saved, cfg))
    console.print(f"training [bold]{model}[/bold] as run {run_name} on {machine_description(torch_device)}")
    checkpoint = ws / "checkpoints" / f"{run_name}.pt"
    checkpoint.parent.mkdir(parents=True, exist_ok=True)  # an unwritable workspace fails now, not after an epoch
    if resume and not checkpoint.exists():
        console.print(f"--resume: no checkpoint of run {run_name} in {checkpoint.parent}, so it starts at epoch 1")
    result = train_model(model, cfg, mnist, seed, torch_device, teacher=teacher_model, checkpoint=checkpoint,
                         resume=resume)
    val_labels = mnist.train_labels[result.val_indices]
    held_out = result.val_probs is not None
    meta = {
        "name": run_name, "model": model, "seed": seed, "config": asdict(cfg), "parameters": result.parameters,
        "device": str(torch_device), "machine": machine_description(torch_device),
        "date": time.strftime("%Y-%m-%d"), "train_seconds": round(result.seconds, 1),
        "val_errors": int((result.val_probs.argmax(1) != val_labels).sum()) if held_out else None,
        "val_size": len(val_labels),
        "test_errors": int((result.test_probs.argmax(1) != mnist.test_labels).sum()),
        "test_size": len(mnist.test_labels), "history": result.history, "kept_epoch": result.kept_epoch,
        "resumed_after": result.resumed_after,
        "data": {"source": str(mnist.source), "sha256": mnist.digests}, "versions": versions(),
    }
    if model == "glimpse":  # accuracy after every glimpse, reading bilinearly and rounded to the nearest pixel
        from benchmark.train import to_float
        from models.glimpse import per_step_accuracy, plot_glimpse_paths

        x_test, x_val = to_float(mnist.test_images), to_float(mnist.train_images[result.val_indices])
        meta["step_accuracy"] = per_step_accuracy(result.model, x_test, mnist.test_labels)
        meta["step_accuracy_rounded"] = per_step_accuracy(result.model, x_test, mnist.test_labels, rounded=True)
        if held_out:  # the same on the validation split, where choices such as the pull to pixel centres are made
            meta["val_step_accuracy"] = per_step_accuracy(result.model, x_val, val_labels)
            meta["val_step_accuracy_rounded"] = per_step_accuracy(result.model, x_val, val_labels, rounded=True)
            console.print(f"validation after glimpse {len(meta['val_step_accuracy'])}: "
                          f"{100 * meta['val_step_accuracy'][-1]:.2f}% "
                          f"(rounded {100 * meta['val_step_accuracy_rounded'][-1]:.2f}%)")
        for k, (smooth, rounded) in enumerate(zip(meta["step_accuracy"], meta["step_accuracy_rounded"]), 1):
            console.print(f"glimpse {k:2d}: test accuracy {100 * smooth:6.2f}% (rounded to pixels {100 * rounded:6.2f}%)")
    path = save_run(ws, run_name, meta, result.test_probs, result.val_probs, result.model.state_dict())
    checkpoint.unlink(missing_ok=True)  # the run is saved: nothing left to resume
    if hasattr(result.model, "write_figures"):  # model-specific pictures: masks, generator samples
        result.model.write_figures(path)
    if model == "glimpse":
        plot_glimpse_paths(result.model, x_test[:8], mnist.test_labels[:8], path / "glimpse_paths.png")
    validation = f"validation errors {meta['val_errors']}/{meta['val_size']}" if held_out else "no validation held out"
    console.print(f"{run_name}: {validation}, test errors {meta['test_errors']}/{meta['test_size']} "
                  f"({100 * meta['test_errors'] / meta['test_size']:.2f}%), {meta['train_seconds']:.0f} s -> {path}")


def check_seed(seed: int) -> None:
    """Seeds draw labelled subsets (numpy) and trees (scikit-learn), which take 0 to 2**32 - 1."""
    if not 0 <= seed < 2 ** 32:
        raise BenchError(f"--seed {seed}: expected a whole number from 0 to {2 ** 32 - 1}")


def refuse_other_recipe(ws: Path, run_name: str, model: str, changes: Callable[[dict], list[str]]) -> None:
    """Before making run `run_name`: if it is already saved as another model, or with a recipe `changes(its saved
    config)` finds different (["epochs 15 -> 30", ...]), stop with a user error instead of replacing it (for
    training, an hour later). The default names do not hold everything (the schedule, say), so `--epochs 30`
    would otherwise overwrite the 15-epoch run. The same model and recipe is a re-run and replaces the run."""
    from benchmark.runs import refuse_to_replace

    def differences(saved: dict) -> list[str]:
        if saved.get("model") != model:
            return [f"model {saved.get('model')} -> {model}"]
        return changes(saved.get("config", {}))

    refuse_to_replace(ws / "runs" / run_name / "meta.json", differences,
                      f"run {run_name} is already saved with another recipe")


def load_teacher(ws: Path, name: str, labels: Optional[int], seed: int):
    """The model of run `name`, checked to have learnt from the labelled images the student will use: the same
    --labels N and seed (which draws them). Any other teacher has seen labels of images the student is told are
    unlabelled, and its soft targets would leak them."""
    from benchmark.runs import load_model, load_run

    run = load_run(ws, name)
    if labels is None:
        raise BenchError("--teacher needs --labels N: the student keeps N labels, the teacher targets the rest")
    if (run.meta["config"].get("labels"), run.meta.get("seed")) != (labels, seed):
        raise BenchError(f"--teacher {name} was trained with --labels {run.meta['config'].get('labels')} "
                         f"--seed {run.meta.get('seed')}; give the student the same (--labels {labels} --seed {seed} "
                         f"here), so it uses no labels the teacher did not")
    return load_model(run)


@app.command()
@user_errors
def errors(run: List[str] = typer.Option(..., "--run", help="Run name(s) in the workspace; repeat for several."),
           mode: str = typer.Option("union", help="union: wrong for any run; intersection: wrong for all."),
           name: Optional[str] = typer.Option(None, help="Hard-set name (default: the run names joined by +)."),
           data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Gather the test images the run(s) get wrong into a hard set."""
    from benchmark.data import load_mnist
    from benchmark.hardset import write_hardset
    from benchmark.runs import load_run

    if len(set(run)) < len(run):
        raise BenchError(f"--run names a run more than once ({', '.join(run)}); name each run once")
    ws = workspace_path(workspace)
    runs = [load_run(ws, r) for r in run]
    hardset_name = (check_name(name, "hardsets") if name
                    else "+".join(run) + ("" if mode == "union" or len(run) == 1 else f"-{mode}"))
    mnist = load_mnist(data_dir, ws)
    folder, table = write_hardset(ws, hardset_name, runs, mode, mnist.test_images, mnist.test_labels)
    summary = Table(title=f"hard set {hardset_name}: {len(table)} images ({mode} of {len(runs)} run(s))")
    for col in ("run", "test errors", "in hard set wrong"):
        summary.add_column(col)
    for r in runs:
        wrong_here = int((table[f"{r.name}_pred"] != table["label"]).sum())
        summary.add_row(r.name, str(int((r.test_predictions != mnist.test_labels).sum())), str(wrong_here))
    console.print(summary)
    by_label = table["label"].value_counts().sort_index()
    console.print("true labels: " + "  ".join(f"{d}:{n}" for d, n in by_label.items()))
    console.print(f"written to {folder}")


@app.command()
@user_errors
def report(out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default: <workspace>/report)."),
           data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Write the comparison report (self-contained HTML, Markdown, CSVs) from whatever the workspace holds."""
    from reports.build import build_report

    html_path = build_report(workspace_path(workspace), out, data_dir)
    console.print(f"report.md, CSV tables and figures written to {html_path.parent}", markup=False, soft_wrap=True)
    typer.echo(html_path)


app.add_typer(human_app, name="human-label")


@app.command()
@user_errors
def ensemble(members: Optional[str] = typer.Option(None, help="Model whose runs <model>-s0 .. -s<seeds-1> to average."),
             seeds: int = typer.Option(5, help="How many seeds of --members (runs must exist)."),
             run: Optional[List[str]] = typer.Option(None, "--run", help="Explicit member run names instead."),
             name: Optional[str] = typer.Option(None, help="Ensemble run name (default: ensemble-<model>-x<seeds>)."),
             data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Average the probabilities of trained runs and save them as one more run."""
    from benchmark.data import load_mnist
    from benchmark.ensemble import build_ensemble
    from benchmark.runs import load_run

    if not run and not members:
        raise BenchError("name the members: --members MODEL --seeds N, or --run RUN repeated")
    if not run and seeds < 1:
        raise BenchError(f"--seeds {seeds}: expected 1 or more (the runs MODEL-s0 .. -s<N-1> are averaged)")
    names = list(run) if run else [f"{members}-s{s}" for s in range(seeds)]
    if len(set(names)) < len(names):
        raise BenchError(f"--run names a member more than once ({', '.join(names)}); name each run once")
    ws = workspace_path(workspace)
    runs = [load_run(ws, r) for r in names]
    ensemble_name = (check_name(name, "runs") if name else f"ensemble-{members}-x{seeds}" if not run
                     else "ensemble-" + "+".join(names))
    refuse_other_recipe(ws, ensemble_name, "ensemble",
                        lambda saved: [] if saved.get("members") == names else [f"members {saved.get('members')} -> "
                                                                                 f"{names}"])
    mnist = load_mnist(data_dir, ws)
    _, val_idx = mnist.validation_split()
    meta = build_ensemble(ws, ensemble_name, runs, mnist.test_labels, mnist.train_labels[val_idx])
    spread = meta["member_spread"]
    console.print(f"{ensemble_name}: test errors {meta['test_errors']}/{meta['test_size']}; members "
                  f"{', '.join(f'{k} {v}' for k, v in meta['member_test_errors'].items())} "
                  f"(mean {spread['mean']:.1f}, sd {spread['std']:.1f}); wrong for every member "
                  f"{meta['wrong_for_all_members']} ({meta['same_wrong_answer_for_all_members']} with the same "
                  f"answer), for at least one {meta['wrong_for_some_member']}"
                  + (f"; validation errors {meta['val_errors']}/{meta['val_size']}" if "val_errors" in meta else ""))


@app.command()
@user_errors
def assist(run: str = typer.Option(..., "--run", help="Classifier run whose doubtful test images get a second look."),
           generator: str = typer.Option("generator-s0", help="Generator run (`bench train --model generator`)."),
           steps: int = typer.Option(20, help="Gradient steps fitting each candidate's style code."),
           device: str = typer.Option("auto", help="auto, cpu or cuda."),
           data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Re-rank a classifier's doubtful test images by how well the generator's rules explain each candidate."""
    from benchmark.assist import run_assist
    from benchmark.train import pick_device

    if steps < 1:
        raise BenchError(f"--steps {steps}: expected 1 or more (the style code of each candidate is fitted)")
    result, folder = run_assist(workspace_path(workspace), run, generator, data_dir, pick_device(device), steps)
    chosen = result["chosen"]
    table = Table(title=f"assist of {run} by {generator} (tau {chosen['tau']:.4g}, delta {chosen['delta']:.4g}, "
                        f"k {chosen['k']}, lambda {chosen['lambda']:.3g}; chosen on validation)")
    for col in ("consulted", "errors before", "fixed", "introduced", "net gain", "errors after"):
        table.add_column(col, justify="right")
    table.add_row(*(str(result[key]) for key in ("consulted", "errors_before", "fixed", "introduced", "net_gain",
                                                 "errors_after")))
    console.print(table)
    alone = result["generator_alone"]
    console.print(f"generator alone: {alone['test_errors']}/{alone['test_size']} test errors; "
                  f"{result['seconds']:.0f} s; written to {folder}", soft_wrap=True)


@app.command()
@user_errors
def bound(subset: str = typer.Option("all", help="all (train + test, 70,000), train (60,000) or test (10,000)."),
          out: Optional[Path] = typer.Option(None, "--out", help="Output folder "
                                                                 "(default: <workspace>/bound/<subset>)."),
          benchmark: bool = typer.Option(False, "--benchmark", help="Also time the naive per-pair bincount on a "
                                                                     "sample of pairs and extrapolate to all pairs."),
          device: str = typer.Option("auto", help="auto, cpu (numba) or cuda (torch for the in-sample search)."),
          data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Exhaustive two-pixel upper bound: the best lookup table for every one of the 306,936 pixel pairs."""
    from benchmark.bound import SUBSETS, run_bound, summary_table
    from benchmark.data import load_mnist
    from benchmark.train import pick_device

    if subset not in SUBSETS:
        raise BenchError(f"--subset {subset}: expected one of {', '.join(SUBSETS)}")
    torch_device = pick_device(device)
    ws = workspace_path(workspace)
    folder = out or ws / "bound" / subset
    if folder.exists() and not folder.is_dir():
        raise BenchError(f"--out {folder} is a file; give a folder (the bound's files are written into it)")
    folder.parent.mkdir(parents=True, exist_ok=True)  # an unwritable place fails now, not after the search
    summary = run_bound(load_mnist(data_dir, ws), subset, folder, str(torch_device), benchmark)
    console.print(summary_table(summary))
    console.print(f"search (pairs, singles, adaptive): {summary['seconds']:.2f} s with {summary['engine']} "
                  f"(JIT compile/cache load {summary['jit_seconds']:.1f} s, not timed); held-out pass "
                  f"{summary['heldout']['seconds']:.2f} s; load average {summary['load_average_1min']:.1f}",
                  soft_wrap=True)
    if benchmark:
        bench = summary["benchmark"]
        console.print(f"naive bincount: {1000 * bench['naive_seconds_per_pair']:.2f} ms/pair on "
                      f"{bench['naive_pairs_timed']} sampled pairs (all agree with the search) -> "
                      f"{bench['naive_extrapolated_seconds']:.0f} s for all pairs; search "
                      f"{bench['search_seconds']:.2f} s; speed-up {bench['speedup']:.0f}x wall-clock, "
                      f"{bench['speedup_cpu']:.0f}x in CPU seconds ({bench['naive_extrapolated_cpu_seconds']:.0f} "
                      f"vs {bench['search_cpu_seconds']:.1f}); load average after "
                      f"{bench['load_average_1min_after']:.1f}", soft_wrap=True)
    console.print(f"written to {folder}", markup=False, soft_wrap=True)


@app.command()
@user_errors
def tree(depth: int = typer.Option(25, help="Grow the tree to this depth: at most this many pixels read per image."),
         seed: int = typer.Option(0, help="Seed of the tree's tie-breaking between equally good splits."),
         data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """Reference for the glimpse model: a decision tree reads at most K pixels per image, each chosen after the
    ones before; saved as run tree-d<depth>-s<seed> with its test accuracy cut at every depth 1..depth."""
    from benchmark.data import load_mnist
    from benchmark.tree_reference import tree_reference

    check_seed(seed)
    ws = workspace_path(workspace)
    meta = tree_reference(load_mnist(data_dir, ws), ws, depth, seed)
    steps = meta["step_accuracy"]
    for k in [k for k in sorted({1, 2, *range(5, depth + 1, 5), depth}) if k <= depth]:
        console.print(f"depth {k:3d}: test accuracy {100 * steps[k - 1]:6.2f}%  "
                      f"(validation {100 * meta['val_step_accuracy'][k - 1]:6.2f}%)")
    console.print(f"{meta['name']}: depth {meta['config']['chosen_depth']} chosen on validation "
                  f"({meta['val_errors']}/{meta['val_size']} errors), test errors {meta['test_errors']}/"
                  f"{meta['test_size']}, {meta['train_seconds']:.0f} s", soft_wrap=True)


@app.command("glimpse-gains")
@user_errors
def glimpse_gains(run: str = typer.Option(..., "--run", help="A glimpse run trained with --set policy=grid."),
                  images: int = typer.Option(1000, help="How many validation images (the first N of the split)."),
                  candidates: int = typer.Option(32, help="Random unread pixels read counterfactually per step."),
                  seed: int = typer.Option(0, help="Seed of the random pixels."),
                  data_dir: Optional[Path] = DataDirOpt, workspace: Optional[Path] = WorkspaceOpt):
    """How well a grid glimpse policy's gain estimates predict what a read gives, step by step, on validation
    images: for the pixel it reads and for random pixels it does not."""
    import torch

    from benchmark.data import load_mnist
    from benchmark.runs import load_model, load_run
    from benchmark.train import to_float
    from models.glimpse import gain_calibration

    check_seed(seed)
    ws = workspace_path(workspace)
    saved = load_run(ws, run)
    options = saved.meta["config"].get("model_kwargs", {})
    if saved.meta.get("model") != "glimpse" or options.get("policy") != "grid":
        raise BenchError(f"run {run} is not a glimpse run with --set policy=grid; train one with `bench train "
                         f"--model glimpse --set policy=grid --set explore=1.0`")
    if not 1 <= images <= 5000:
        raise BenchError(f"--images {images}: expected 1 to 5000 (the validation split's size)")
    mnist = load_mnist(data_dir, ws)
    val = mnist.validation_split()[1][:images]
    torch.manual_seed(seed)
    try:
        table = gain_calibration(load_model(saved), to_float(mnist.train_images[val]), mnist.train_labels[val],
                                 candidates)
    except ValueError as exc:
        raise BenchError(f"--candidates {candidates}: {exc}") from None
    console.print(f"{run}: gain estimates against the drops in cross-entropy, {images} validation images, "
                  f"{candidates} random unread pixels per step", soft_wrap=True)
    console.print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), highlight=False, soft_wrap=True)


def main():
    app()


if __name__ == "__main__":
    main()
