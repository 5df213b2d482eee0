"""What the test modules share: the hypothesis profile, long-lived rank pools and a tiny checkpoint.

Helpers that are plain functions live next to this file (``checkpoints.py``: transformers-made
checkpoints in every layout; ``towers.py``: NaFlex / Idefics3 / ColPali towers; ``distributed.py``: spawned
gloo ranks; ``hub_server.py``: a local Hub). Fixtures here are built once per session and never mutated,
so no test depends on another one having run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from checkpoints import TINY, save_layout, vision_model
from distributed import RankPool

# property tests: reproducible in CI (derandomized), no per-example deadline on a loaded 2-core machine
settings.register_profile("tp-siglip", deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
settings.load_profile("tp-siglip")


@pytest.fixture(scope="session")
def rank_pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Callable[[int], RankPool]]]:
    """``(workdir, get)``: ``get(world_size)`` gives a pool of that many gloo ranks, started on first use."""
    root = tmp_path_factory.mktemp("pools")
    made: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in made:
            made[world_size] = RankPool(world_size, root)
        return made[world_size]

    yield root, get
    for pool in made.values():
        pool.close()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """``(transformers reference, directory)``: the TINY tower (head included) saved by transformers 5."""
    reference = vision_model(TINY, seed=7)
    return reference, save_layout(reference, "v5_vision", tmp_path_factory.mktemp("tiny") / "v5")
