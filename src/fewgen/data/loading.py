"""The data of a run from its config: the base dataset and its split, novel classes from another
dataset when ``data.novel_dataset`` is set, and the validation classes in their place for model
selection (``data.eval_split=val``). With a frozen pretrained backbone (clip, dinov2) images are read
at its image processor's resize size unless ``data.image_size`` is set, and novel classes from
another dataset in colour."""

from __future__ import annotations

from dataclasses import dataclass

from fewgen.data.base import FewShotData
from fewgen.errors import FewgenError
from fewgen.options import opt


@dataclass
class DataConfig:
    """Which data a run reads (the config section ``data``): the dataset, its classes and image shape."""

    dataset: str = opt("digits", "registered dataset (fewgen datasets lists them)", choices="dataset")
    root: str | None = opt(None, "data root with one folder per dataset (default $FEWGEN_DATA, else ./data); for imagefolder the folder itself")
    image_size: int | None = opt(None, "square image side; when null the dataset's default, or with a pretrained "
                                 "backbone (clip, dinov2) the side its image processor resizes to (e.g. 224, "
                                 "256), so photos reach its own resize and centre crop at full size", min=4, max=1024)
    channels: int | None = opt(None, "1 or 3 (imagefolder only)", choices=(1, 3))
    download: bool = opt(False, "download official files when missing (omniglot)")
    base_classes: list[str] | None = opt(None, "override the base classes by name")
    val_classes: list[str] | None = opt(None, "override the validation classes by name")
    novel_classes: list[str] | None = opt(None, "override the novel classes by name (with data.novel_dataset: the "
                                          "classes of that dataset to use; default all)")
    novel_dataset: str | None = opt(None, "take the novel classes from another dataset (a registered one, or "
                                    "imagefolder with data.novel_root), brought to the base side's image shape; "
                                    "the base dataset's own novel classes then join its base classes",
                                    choices="dataset")
    novel_root: str | None = opt(None, "data.novel_dataset=imagefolder: the folder <root>/<class>/*.png of the novel classes")
    eval_split: str = opt("novel", "classes the few-shot episodes are drawn from: novel (results), or val to choose "
                          "hyperparameters on the validation classes without touching the novel ones",
                          choices=("novel", "val"))


def load_data(d, backbone=None) -> FewShotData:
    """The :class:`FewShotData` of the data options ``d`` (:class:`DataConfig`), read for
    the backbone options ``backbone`` (:class:`~fewgen.backbones.registry.BackboneConfig`; None: a backbone trained
    here, which reads the dataset's own size and channels)."""
    from fewgen.data import load_dataset

    foreign = d.novel_dataset is not None
    if foreign and (d.base_classes is None) != (d.val_classes is None):
        raise FewgenError("with data.novel_dataset give both data.base_classes and data.val_classes, or neither")
    from fewgen.backbones.pretrained import default_image_size, is_pretrained

    pretrained = backbone is not None and is_pretrained(backbone.name)
    image_size = d.image_size
    if image_size is None and backbone is not None:  # a pretrained backbone reads images at its processor's size
        image_size = default_image_size(backbone)
    data = load_dataset(d.dataset, d.root, image_size, base_classes=d.base_classes, val_classes=d.val_classes,
                        novel_classes=([] if d.base_classes is not None else None) if foreign else d.novel_classes,
                        download=d.download, channels=d.channels)
    if foreign:
        from fewgen.data.novel import load_novel, with_novel_dataset

        shape = data.base.image_shape
        if pretrained:  # a pretrained model reads colour, whatever the base side's channels
            shape = (3, *shape[1:])
        novel, rule = load_novel(d.novel_dataset, d.root, shape, d.novel_classes, d.novel_root,
                                 crop=pretrained)  # photos keep their aspect
        data = with_novel_dataset(data, novel, rule, d.novel_dataset)
    if d.eval_split == "val":  # model selection: the val classes stand in for the novel ones, never seen here
        import dataclasses

        data = dataclasses.replace(data, novel=data.val, full=None,
                                   protocol=f"{data.protocol}; episodes from the VALIDATION classes "
                                            "(data.eval_split=val, for choosing hyperparameters)")
    return data
