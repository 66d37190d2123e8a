"""The synthetic local-prompt task of issue 7: scenes and metrics are exact on ground truth, so a trained branch's
score measures the branch, not the yardstick."""
from __future__ import annotations

import numpy as np

from training.data import FolderDataset
from training.learning_task import (classify_hole_colour, held_out_samples, hole_shape_correct, preservation_mse,
                                    task_scene, write_task_folder)


def test_scenes_are_a_pure_function_of_index_and_seed():
    a, b = task_scene(3, seed=1), task_scene(3, seed=1)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2:] == b[2:]
    assert not np.array_equal(task_scene(4, seed=1)[0], a[0])


def test_metrics_are_exact_on_the_original_images():
    samples = held_out_samples(24, seed=0)
    assert {s.colour for s in samples} == {"red", "green", "blue", "yellow"}
    for s in samples:
        assert s.mask.max() == 1.0 and (s.mask >= s.segmentation).all()  # the hole covers the target
        assert classify_hole_colour(s.image, s.mask) == s.colour
        assert hole_shape_correct(s.image, s.mask, s.segmentation, s.colour)
        assert preservation_mse(s.image, s.image, s.mask) == 0.0
    gray = np.full_like(samples[0].image, 128)
    assert classify_hole_colour(gray, samples[0].mask) == "none"


def test_task_folder_is_what_the_trainer_reads(tmp_path):
    root = write_task_folder(tmp_path / "task", count=4, seed=2)
    dataset = FolderDataset(str(root), 64, seed=0, shuffle=False)
    prompts = sorted(sample["prompt"] for sample in dataset)
    expected = sorted(" ".join(task_scene(i, 2)[2:]) for i in range(4))
    assert prompts == expected
