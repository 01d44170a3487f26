"""A classic adaptive pixel reader to measure the glimpse model against: a decision tree cut at depth K.

A classification tree reads one pixel at each node and goes left or right on its grey level, so an image's
path to depth K reads at most K pixels, each chosen after seeing the ones before: K adaptive glimpses (whole
pixels, thresholded), with the choices made by CART's greedy impurity rule (scikit-learn) instead of a
learned policy. One tree is grown on the 55,000 fit images to `max_depth` and cut at each depth K: an image is
answered with the majority class of the node its path reaches at depth K (of its leaf if the path ends sooner).

The result is saved as a run (`<workspace>/runs/tree-d<max_depth>-s<seed>/`: meta.json, val_probs.npy,
test_probs.npy, no model.pt), so the report draws its `step_accuracy` (test accuracy of the tree cut at
each depth 1..max_depth, no choice involved) beside the glimpse models' accuracy per step, and `bench errors`
and the runs table treat it as one more model. Its probabilities are the class shares of the fit images in
the node reached at the depth with the fewest validation errors (shallowest on ties): chosen on validation.
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.tree import DecisionTreeClassifier

from benchmark.data import Mnist
from benchmark.errors import BenchError
from benchmark.runs import machine_description, save_run


def nodes_by_depth(tree: DecisionTreeClassifier, images: np.ndarray, depth: int) -> np.ndarray:
    """(N, depth + 1) node ids: column d is the node each image's path reaches at depth d (its leaf for every
    depth past the path's end). images: uint8 (N, 28, 28)."""
    paths = tree.decision_path(images.reshape(len(images), -1)).tocsr()
    nodes = np.empty((len(images), depth + 1), dtype=np.int64)
    for row in range(len(images)):
        # node ids grow along a path (depth-first numbering: a child's id is larger than its parent's)
        path = np.sort(paths.indices[paths.indptr[row]:paths.indptr[row + 1]])
        nodes[row] = path[np.minimum(np.arange(depth + 1), len(path) - 1)]
    return nodes


def tree_reference(mnist: Mnist, workspace, max_depth: int = 25, seed: int = 0) -> dict:
    """Grow the tree, score it cut at every depth 1..max_depth, save the run; return its meta.json content."""
    if not 1 <= max_depth <= 100:
        raise BenchError(f"--depth {max_depth}: expected 1 to 100 (pixels read per image)")
    start = time.time()
    fit, val = mnist.validation_split()
    tree = DecisionTreeClassifier(max_depth=max_depth, random_state=seed)
    tree.fit(mnist.train_images[fit].reshape(len(fit), -1), mnist.train_labels[fit])
    # the class shares of the fit images in every node, (nodes, 10), a column per digit even when the fit images
    # lack one (scikit-learn >= 1.4 stores shares, older versions counts; either way normalised here)
    counts = tree.tree_.value[:, 0, :]
    shares = np.zeros((len(counts), 10))
    shares[:, tree.classes_] = counts / counts.sum(1, keepdims=True)
    val_nodes = nodes_by_depth(tree, mnist.train_images[val], max_depth)
    test_nodes = nodes_by_depth(tree, mnist.test_images, max_depth)

    def accuracy(nodes: np.ndarray, labels: np.ndarray) -> list[float]:  # per depth 1..max_depth
        return [float((shares[nodes[:, d]].argmax(1) == labels).mean()) for d in range(1, nodes.shape[1])]

    val_accuracy = accuracy(val_nodes, mnist.train_labels[val])
    chosen = int(np.argmax(val_accuracy)) + 1  # shallowest of the best on validation
    test_probs, val_probs = shares[test_nodes[:, chosen]], shares[val_nodes[:, chosen]]
    name = f"tree-d{max_depth}-s{seed}"
    meta = {
        "name": name, "model": "tree", "seed": seed,
        "config": {"max_depth": max_depth, "chosen_depth": chosen, "fit_images": len(fit)},
        "parameters": int(tree.tree_.node_count), "train_seconds": round(time.time() - start, 1),
        "machine": machine_description(), "date": time.strftime("%Y-%m-%d"),
        "val_errors": int((val_probs.argmax(1) != mnist.train_labels[val]).sum()), "val_size": len(val),
        "test_errors": int((test_probs.argmax(1) != mnist.test_labels).sum()), "test_size": len(test_probs),
        "step_accuracy": accuracy(test_nodes, mnist.test_labels), "val_step_accuracy": val_accuracy,
    }
    save_run(workspace, name, meta, test_probs, val_probs)
    return meta
