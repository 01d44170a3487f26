"""Crowd labelling through Label Studio, and CSV export of the answers.

Export (`export_labelstudio`) writes into one folder
  images/<item>.png         each image enlarged 8x by pixel repetition (no interpolation), so a browser
                            shows crisp pixels instead of a blurred 28 x 28 thumbnail
  tasks.json                the Label Studio import format: [{"data": {"image": URL, "item": id}}, ...] in a
                            seeded shuffled order
  label_config.xml          an image-classification config with single choices 0-9 and "cannot tell"
Blind: a task carries only its image and an opaque item id (random hex, kept in the annotation store's
crowd_items table), never the test index (an MNIST test index looks up the label), the hard set's name (which
says a model got it wrong), a label or a prediction; Label Studio shows data fields to its annotators.
Image URLs are `image_url` + "<item>.png"; the CLI's default prefix, `/data/local-files/?d=images/`, is Label
Studio's local-file serving (LOCAL_FILES_SERVING_ENABLED=true, LOCAL_FILES_DOCUMENT_ROOT = the export
folder); pass another prefix when the PNGs are hosted elsewhere.

Import (`import_labelstudio`) reads a Label Studio JSON export (a list of tasks, each with "data" and
"annotations": [{"completed_by", "result": [{"from_name": "digit", "type": "choices",
"value": {"choices": ["7"]}}], "created_at", "updated_at", "lead_time", "was_cancelled", "id"}]) into the
annotation store as quick answers, each item found by its id in the store that exported it. answered_at is
the annotation's updated_at, else created_at (UTC), shown_at that minus lead_time (the seconds Label Studio
measured on the task; unknown if absent). The annotator is "labelstudio-<value>" of the field named by
--annotator-from (an email or id when the field holds a user object). Each annotation is keyed by its task,
id, annotator and time, so importing a file twice adds nothing the second time, while an answer changed in
Label Studio (same id, new updated_at) comes in as a later answer, which is then the final one; the earlier
stays in the store. Skipped (cancelled) or empty annotations are counted, not stored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from benchmark.errors import BenchError, first_line
from human_eval.session import hardset_controls, stable_seed
from human_eval.store import AnnotationStore, default_db_path, load_answers

CANNOT_TELL_CHOICE = "cannot tell"
PNG_SCALE = 8
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="digit" toName="image" choice="single">
{choices}
  </Choices>
</View>
""".format(choices="\n".join(f'    <Choice value="{c}"/>' for c in [*map(str, range(10)), CANNOT_TELL_CHOICE]))


def export_labelstudio(workspace: Path, hardset: str, out: Path, controls: int, data_dir: Path | None,
                       image_url: str) -> tuple[Path, int]:
    """Write PNGs, tasks.json and label_config.xml for the hard set plus `controls` control images (the
    same ones a terminal session of this hard set gets) into `out`. Returns (tasks file, task count)."""
    from benchmark.hardset import load_hardset

    if controls < 0:
        raise BenchError(f"--controls {controls}: expected 0 or more control images")
    table, images, meta = load_hardset(workspace, hardset)
    test_indices = table["test_index"].to_numpy()
    if controls:
        from benchmark.data import load_mnist

        mnist = load_mnist(data_dir, workspace)
        control_indices = hardset_controls(workspace, hardset, meta["runs"], controls, mnist.test_labels)
        test_indices = np.concatenate([test_indices, control_indices])
        images = np.concatenate([images, mnist.test_images[control_indices]])
    with AnnotationStore(default_db_path(workspace)) as store:
        items = store.crowd_items(hardset, [int(t) for t in test_indices])
    (out / "images").mkdir(parents=True, exist_ok=True)
    tasks = []
    for item, image in zip(items, images):
        Image.fromarray(np.kron(image, np.ones((PNG_SCALE, PNG_SCALE), np.uint8))).save(out / "images" / f"{item}.png")
        tasks.append({"data": {"image": f"{image_url}{item}.png", "item": item}})
    # Label Studio shows tasks in file order by default: shuffle so a crowd does not meet them sorted.
    order = np.random.default_rng(stable_seed("labelstudio", hardset)).permutation(len(tasks))
    (out / "tasks.json").write_text(json.dumps([tasks[i] for i in order], indent=1))
    (out / "label_config.xml").write_text(LABEL_CONFIG)
    return out / "tasks.json", len(tasks)


def export_csv(db_path: Path, out: Path, hardset: str | None = None) -> tuple[Path, int]:
    """The final answers (see `load_answers`), optionally of one hard set, as CSV. Returns (file, rows)."""
    answers = load_answers(db_path)
    if hardset is not None:
        if hardset not in set(answers["hardset"]):  # a typo would otherwise write an empty file and say so quietly
            known = ", ".join(sorted(set(answers["hardset"]))) or "none yet"
            raise BenchError(f"--hardset {hardset}: no answers for it in {db_path} (hard sets with answers: {known})")
        answers = answers[answers["hardset"] == hardset]
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{hardset or 'all'}-answers.csv"
    answers.to_csv(path, index=False)  # cannot tell is an empty answer cell
    return path, len(answers)


@dataclass
class ImportSummary:
    imported: int
    already_there: int
    skipped: int  # cancelled (skipped) tasks and annotations without a digit choice
    annotators: list[str]


def annotator_id(annotation: dict, field: str) -> str:
    """The annotator named by annotation[field]: a user id, or an object with an email or id."""
    if field not in annotation:
        raise BenchError(f"annotation {annotation.get('id')} has no {field!r} field; pick --annotator-from from "
                         f"{sorted(annotation)}")
    value = annotation[field]
    if isinstance(value, dict):
        value = value.get("email") or value.get("id")
    return f"labelstudio-{value}"


def parse_choice(annotation: dict) -> tuple[bool, int | None]:
    """(has a digit choice, the answer: 0-9 or None for cannot tell) of one annotation."""
    for result in annotation.get("result") or []:
        if result.get("from_name") == "digit" and result.get("type") == "choices":
            choices = result.get("value", {}).get("choices") or []
            if len(choices) != 1:
                raise BenchError(f"annotation {annotation.get('id')}: expected one choice, got {choices}")
            if choices[0] == CANNOT_TELL_CHOICE:
                return True, None
            if choices[0] not in [str(d) for d in range(10)]:
                raise BenchError(f"annotation {annotation.get('id')}: choice {choices[0]!r} is not 0-9 or "
                                 f"{CANNOT_TELL_CHOICE!r}; was the project set up with label_config.xml?")
            return True, int(choices[0])
    return False, None


def task_answers(store: AnnotationStore, task: dict, annotator_from: str, summary: ImportSummary) -> list[tuple]:
    """The answers in one exported task: [(answered_at, origin key, hard set, test index, annotator, answer,
    shown_at)], its cancelled or empty annotations counted in `summary.skipped`."""
    located = store.crowd_item(str(task["data"]["item"])) if "item" in task["data"] else None
    if located is None:
        raise BenchError(f"task {task.get('id')} names no item this workspace exported; import into the workspace "
                         f"whose `bench human-label export` made the tasks")
    hardset, test_index = located
    answers = []
    for annotation in task.get("annotations") or []:
        has_choice, answer = parse_choice(annotation)
        if annotation.get("was_cancelled") or not has_choice:
            summary.skipped += 1
            continue
        stamp = annotation.get("updated_at") or annotation["created_at"]  # an answer changed later: its new time
        try:
            when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))  # Python 3.10 does not read "Z"
        except ValueError:
            raise BenchError(f"annotation {annotation.get('id')}: time {stamp!r} is not an ISO 8601 date") from None
        answered_at = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
        lead_time = annotation.get("lead_time")
        annotator = annotator_id(annotation, annotator_from)
        origin = f"labelstudio:{task.get('id')}:{annotation.get('id')}:{annotator}:{stamp}"
        answers.append((answered_at, origin, hardset, test_index, annotator, answer,
                        answered_at - lead_time if lead_time is not None else math.nan))
    return answers


def import_labelstudio(store: AnnotationStore, path: Path, annotator_from: str, workspace: Path) -> ImportSummary:
    """Read a Label Studio JSON export of tasks made by `export_labelstudio` from `workspace` into `store`; an item
    outside its hard set is a control image."""
    from benchmark.hardset import load_hardset

    try:
        tasks = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"{path}: not a readable JSON file ({exc}); export the project as JSON") from None
    if not isinstance(tasks, list):
        raise BenchError(f"{path}: expected a list of tasks (Label Studio's JSON export), got {type(tasks).__name__}")
    known, summary = store.origins(), ImportSummary(0, 0, 0, [])
    answers = []
    for n, task in enumerate(tasks, 1):
        try:
            answers += task_answers(store, task, annotator_from, summary)
        except (KeyError, TypeError, AttributeError) as exc:  # a field missing or of another type
            raise BenchError(f"{path}: task {n} is not in Label Studio's JSON export format ({first_line(exc)}); "
                             f"export the project as JSON") from None
        except BenchError as exc:
            raise BenchError(f"{path}: {exc}") from None
    hardset_items = {}  # {hard set: its test indices}
    for answered_at, origin, hardset, test_index, annotator, answer, shown_at in sorted(answers, key=lambda r: r[0]):
        if origin in known:  # imported before (or twice in this file)
            summary.already_there += 1
            continue
        if hardset not in hardset_items:
            hardset_items[hardset] = set(load_hardset(workspace, hardset)[0]["test_index"].tolist())
        store.add_answer(hardset, test_index, annotator, "quick", answer, "", shown_at, answered_at,
                         test_index not in hardset_items[hardset], origin=origin)
        known.add(origin)
        summary.imported += 1
        if annotator not in summary.annotators:
            summary.annotators.append(annotator)
    return summary
