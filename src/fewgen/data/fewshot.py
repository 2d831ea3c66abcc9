"""The few-shot protocol: a seed's few-shot set and the N-way episodes drawn around it.

For each seed, every novel class gets a fixed random order of its images; its few-shot set
at K shots is the first K of that order (so the 1-shot image is also in the 5-shot set).
Anything that learns about novel classes sees only this set. An N-way episode picks N novel
classes; its support is their few-shot images and its queries are Q *other* images of each.
Episodes come from a generator seeded by (dataset, seed, N, K, Q) alone, so every method in a
run, and every rerun, sees identical tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.utils import atomic_path, make_generator


def _class_orders(novel: ArrayDataset, seed: int) -> list[torch.Tensor]:
    g = make_generator("few-shot-order", novel.name, seed)
    return [idx[torch.randperm(len(idx), generator=g)] for idx in novel.indices_by_class()]


def few_shot_indices(novel: ArrayDataset, n_shot: int, seed: int) -> torch.Tensor:
    """Indices into ``novel`` of the seed's few-shot set, shape (n_classes, n_shot)."""
    if n_shot < 1:
        raise FewgenError(f"n_shot must be at least 1, got {n_shot}")
    orders = _class_orders(novel, seed)
    short = [(novel.class_names[c], len(o)) for c, o in enumerate(orders) if len(o) < n_shot]
    if short:
        name, count = short[0]
        raise FewgenError(
            f"class {name!r} of {novel.name!r} has {count} images, fewer than n_shot={n_shot}; "
            "lower n_shot or drop that class"
        )
    return torch.stack([o[:n_shot] for o in orders])


def few_shot_set(novel: ArrayDataset, n_shot: int, seed: int) -> ArrayDataset:
    """The K real images per novel class that a seed allows methods to learn from; ``n_shot=0``:
    every image of every class (a user's folder of shots, with no query images: ``fewgen fit``)."""
    if n_shot == 0:
        idx = torch.cat([o for o in _class_orders(novel, seed)])
        return novel.subset(idx, name=f"{novel.name}/all-shots-s{seed}")
    idx = few_shot_indices(novel, n_shot, seed).reshape(-1)
    return novel.subset(idx, name=f"{novel.name}/fewshot-s{seed}-k{n_shot}")


@dataclass
class Episodes:
    """A batch of N-way K-shot episodes, as indices into the novel dataset.

    Attributes:
        classes: novel class ids per episode, shape (E, N); episode label i means classes[e, i].
        support: image indices, shape (E, N, K).
        query: image indices, shape (E, N, Q).
    """

    classes: torch.Tensor
    support: torch.Tensor
    query: torch.Tensor
    seed: int

    @property
    def n_episodes(self) -> int:
        return self.classes.shape[0]

    @property
    def n_way(self) -> int:
        return self.classes.shape[1]

    @property
    def n_shot(self) -> int:
        return self.support.shape[2]

    @property
    def n_query(self) -> int:
        return self.query.shape[2]

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, classes=self.classes.numpy(), support=self.support.numpy(),
                         query=self.query.numpy(), seed=np.array(self.seed))

    @classmethod
    def load(cls, path: str | Path) -> Episodes:
        try:
            z = np.load(path, allow_pickle=False)
            return cls(torch.from_numpy(z["classes"]), torch.from_numpy(z["support"]),
                       torch.from_numpy(z["query"]), int(z["seed"]))
        except (OSError, KeyError, ValueError) as e:
            raise FewgenError(f"cannot read episodes file {path} ({e}); delete it to redraw") from None


def check_setting(novel: ArrayDataset, n_way: int, n_shot: int, n_query: int) -> None:
    """Raise a clear error for settings the novel classes cannot supply."""
    if n_shot < 1:
        raise FewgenError(f"n_shot must be at least 1, got {n_shot}")
    if n_query < 1:
        raise FewgenError(f"n_query must be at least 1, got {n_query}")
    if n_way < 2:
        raise FewgenError(f"n_way must be at least 2, got {n_way}")
    if n_way > novel.num_classes:
        raise FewgenError(
            f"n_way={n_way} is larger than the number of novel classes ({novel.num_classes}) in {novel.name!r}; "
            f"use n_way <= {novel.num_classes}"
        )
    counts = novel.counts()
    low = (counts < n_shot + n_query).nonzero().squeeze(1).tolist()
    if low:
        c = low[0]
        raise FewgenError(
            f"class {novel.class_names[c]!r} of {novel.name!r} has {int(counts[c])} images, fewer than "
            f"n_shot + n_query = {n_shot} + {n_query}; lower n_shot or n_query"
        )


def episode_bytes(novel: ArrayDataset, n_way: int, n_shot: int, n_query: int, n_episodes: int) -> int:
    """Peak bytes :func:`sample_episodes` allocates: the class draw (E, C), the candidate pools with
    their random keys and order (E, N, width), and the kept indices (E, N, K + Q)."""
    width = int(novel.counts().max()) - n_shot
    return n_episodes * (12 * novel.num_classes + n_way * (20 * width + 8 * (n_shot + n_query)))


def sample_episodes(
    novel: ArrayDataset, n_way: int, n_shot: int, n_query: int, n_episodes: int, seed: int
) -> Episodes:
    """Draw ``n_episodes`` episodes whose supports are the seed's few-shot set.

    Queries are drawn from each class's images outside its few-shot set, so support and
    query never share an image.
    """
    check_setting(novel, n_way, n_shot, n_query)
    shots = few_shot_indices(novel, n_shot, seed)  # (C, K)
    orders = _class_orders(novel, seed)
    # pools of non-support images per class, padded with -1
    pools = [o[n_shot:] for o in orders]
    width = max(len(p) for p in pools)
    pool = torch.full((len(pools), width), -1, dtype=torch.long)
    for c, p in enumerate(pools):
        pool[c, : len(p)] = p
    g = make_generator("episodes", novel.name, seed, n_way, n_shot, n_query)
    classes = torch.rand(n_episodes, novel.num_classes, generator=g).argsort(dim=1)[:, :n_way]
    cand = pool[classes]  # (E, N, width)
    keys = torch.rand(cand.shape, generator=g).masked_fill(cand < 0, 2.0)
    pick = keys.argsort(dim=2)[:, :, :n_query]
    query = torch.gather(cand, 2, pick)
    support = shots[classes]
    return Episodes(classes=classes, support=support, query=query, seed=seed)


def all_way_split(novel: ArrayDataset, n_shot: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All-way evaluation: (support indices (C, K), query indices of every other novel image)."""
    shots = few_shot_indices(novel, n_shot, seed)
    mask = torch.ones(len(novel), dtype=torch.bool)
    mask[shots.reshape(-1)] = False
    return shots, mask.nonzero().squeeze(1)
