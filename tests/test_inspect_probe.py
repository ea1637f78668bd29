"""The BBC topic probe's classifier finds what is linearly there and nothing else.
(The probe on a real run is tested in test_inspect_cli.py, next to that run.)"""

from __future__ import annotations

import torch

from cached_mslt.evaluation.probe import fit_probe

SPLITS = ("train", "validation", "test")


def clusters(n: int, num_classes: int, spread: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, 16, generator=g) * 4
    y = torch.arange(n) % num_classes
    return centres[y] + spread * torch.randn(n, 16, generator=g), y


def test_probe_separates_linearly_separable_topics():
    data = {s: clusters(150, 5, 0.5, seed=0) for s in SPLITS}
    valid, test, l2, _ = fit_probe(
        {s: d[0] for s, d in data.items()}, {s: d[1] for s, d in data.items()}, 5
    )
    assert valid == test == 1.0 and l2 > 0


def test_probe_is_at_chance_on_random_labels():
    g = torch.Generator().manual_seed(1)
    x = {s: torch.randn(400, 16, generator=g) for s in SPLITS}
    y = {s: torch.randint(0, 2, (400,), generator=g) for s in SPLITS}
    _, test, _, _ = fit_probe(x, y, 2)
    assert 0.38 < test < 0.62
