"""In-memory image datasets and the base / val / novel class splits.

Every dataset fewgen ships is small enough to hold as one uint8 tensor, which makes
episodes, feature extraction and synthetic-set merging plain indexing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fewgen.errors import FewgenError


@dataclass
class ArrayDataset:
    """Images with integer labels.

    Attributes:
        images: uint8 images, shape (n, C, H, W).
        labels: int64 labels in ``[0, len(class_names))``, shape (n,).
        class_names: one name per label.
        domains: int64 domain index per image, shape (n,), or None.
        domain_names: one name per domain index.
        name: where the data came from (for messages and cache keys).
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    domains: torch.Tensor | None = None
    domain_names: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (n, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def float_images(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        """Images as float in [0, 1]."""
        x = self.images if index is None else self.images[index]
        return x.float().div_(255.0)

    def subset(self, index: torch.Tensor, name: str | None = None) -> ArrayDataset:
        return ArrayDataset(
            images=self.images[index],
            labels=self.labels[index],
            class_names=list(self.class_names),
            domains=None if self.domains is None else self.domains[index],
            domain_names=list(self.domain_names),
            name=name or self.name,
        )

    def select_classes(self, classes: list[int], name: str | None = None) -> ArrayDataset:
        """Keep the images of ``classes`` and relabel them 0..len(classes)-1 in that order."""
        classes_t = torch.as_tensor(classes, dtype=torch.long)
        remap = torch.full((self.num_classes,), -1, dtype=torch.long)
        remap[classes_t] = torch.arange(len(classes))
        keep = remap[self.labels] >= 0
        idx = keep.nonzero().squeeze(1)
        out = self.subset(idx, name=name)
        out.labels = remap[self.labels[idx]]
        out.class_names = [self.class_names[c] for c in classes]
        return out

    def select_domains(self, domains: list[str], name: str | None = None) -> ArrayDataset:
        if self.domains is None:
            raise FewgenError(f"dataset {self.name!r} has no domains; use a domain dataset such as pacs")
        unknown = [d for d in domains if d not in self.domain_names]
        if unknown:
            raise FewgenError(f"unknown domain(s) {unknown} in {self.name!r}; available: {self.domain_names}")
        ids = torch.as_tensor([self.domain_names.index(d) for d in domains])
        keep = torch.isin(self.domains, ids).nonzero().squeeze(1)
        return self.subset(keep, name=name)

    def digest(self) -> str:
        """Content key of the images, labels, class names and domains (cache keys hold it, never
        the folder the data came from, so changed files are never mistaken for the old ones)."""
        from fewgen.utils import content_digest

        return content_digest(self.images, self.labels, list(self.class_names),
                              self.domains if self.domains is not None else None, list(self.domain_names))

    def counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)

    def indices_by_class(self) -> list[torch.Tensor]:
        order = torch.argsort(self.labels, stable=True)
        counts = self.counts().tolist()
        return list(torch.split(order, counts))

    @staticmethod
    def concat(parts: list[ArrayDataset], name: str = "") -> ArrayDataset:
        """Concatenate datasets that share the same class list."""
        first = parts[0]
        for p in parts[1:]:
            if p.class_names != first.class_names:
                raise ValueError("concat needs datasets with identical class_names")
            if p.image_shape != first.image_shape:
                raise ValueError(f"image shapes differ: {p.image_shape} vs {first.image_shape}")
        domains = None
        if all(p.domains is not None for p in parts):
            domains = torch.cat([p.domains for p in parts])  # type: ignore[misc]
        return ArrayDataset(
            images=torch.cat([p.images for p in parts]),
            labels=torch.cat([p.labels for p in parts]),
            class_names=list(first.class_names),
            domains=domains,
            domain_names=list(first.domain_names),
            name=name or first.name,
        )


@dataclass
class FewShotData:
    """A dataset cut into base / val / novel classes (disjoint).

    ``base`` trains backbones and generators; ``val`` selects models; ``novel`` is only
    touched through a seed's few-shot set (support) and the evaluation queries.
    """

    name: str
    base: ArrayDataset
    val: ArrayDataset
    novel: ArrayDataset
    protocol: str  # a sentence saying how the split was made
    full: ArrayDataset | None = None  # the whole dataset, for domain protocols

    def split(self, name: str) -> ArrayDataset:
        if name not in ("base", "val", "novel"):
            raise FewgenError(f"unknown split {name!r}; use base, val or novel")
        return getattr(self, name)

    def summary(self) -> dict:
        out = {"dataset": self.name, "protocol": self.protocol}
        for s in ("base", "val", "novel"):
            d = self.split(s)
            out[s] = {"classes": d.num_classes, "images": len(d), "class_names": d.class_names}
        return out
