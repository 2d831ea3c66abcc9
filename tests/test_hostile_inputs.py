"""Files a user hands over cannot crash or fool fewgen: odd image encodings are read as the 8-bit
originals, decompression bombs and unreadable values are one clear line (or a skipped row in
``fewgen predict``), empty class folders are reported, a tampered classifier folder is refused
before anything is built, and predictions.csv holds no formula a spreadsheet would run."""

from __future__ import annotations

import csv
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewgen.app.cli import main
from tests.conftest import DIGITS

#: the classes of the tiny shots folder; their names start as spreadsheet formulas do
CLASSES = ("+six", "-seven", "=five", "@eight", "nine")
TINY = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=3", "pretrain.val_episodes=5", "eval.episodes=10",
        "--no-progress", "--quiet"]


# ----------------------------------------------------------------------------- files


def digit_images(per_class: int = 6) -> dict[str, list[np.ndarray]]:
    """scikit-learn's 8x8 digits 5-9 as uint8 16x16 gray images, ``per_class`` of each."""
    from sklearn.datasets import load_digits

    d = load_digits()
    out = {}
    for cls, digit in zip(CLASSES, (6, 7, 5, 8, 9)):
        picks = d.images[d.target == digit][:per_class]
        out[cls] = [np.kron(np.rint(x * 255 / 16).astype(np.uint8), np.ones((2, 2), np.uint8)) for x in picks]
    return out


def png(width: int, height: int, bit_depth: int, colour_type: int, rows) -> bytes:
    """A PNG file from its raw rows (filter byte included), compressed as they come."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for row in rows) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png16(image: np.ndarray) -> bytes:
    """A 16-bit gray (H, W) or RGB (H, W, 3) PNG of uint16 values."""
    h, w = image.shape[:2]
    return png(w, h, 16, 0 if image.ndim == 2 else 2, (b"\x00" + row.astype(">u2").tobytes() for row in image))


def bomb_png(side: int = 40_000) -> bytes:
    """A ~200 KB one-bit PNG whose pixels, decoded, would take side * side bytes."""
    row = bytes(1 + (side + 7) // 8)
    return png(side, side, 1, 0, (row for _ in range(side)))


def pil_bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated(x: np.ndarray, fmt: str, orientation: int, **kw) -> bytes:
    """``x`` stored turned so that the EXIF ``orientation`` (3, 6 or 8) brings it back upright."""
    stored = {3: np.rot90(x, 2), 6: np.rot90(x, 1), 8: np.rot90(x, -1)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(Image.fromarray(np.ascontiguousarray(stored)), fmt, exif=exif, **kw)


#: each encoding of an 8-bit gray image x: (file suffix, the file's bytes); all read back as x
ENCODINGS = {
    "png16-gray": (".png", lambda x: png16(x.astype(np.uint16) * 257)),
    "png16-rgb": (".png", lambda x: png16(np.repeat(x[..., None], 3, 2).astype(np.uint16) * 257)),
    "tiff16": (".tif", lambda x: pil_bytes(Image.fromarray(x.astype(np.uint16) * 257), "TIFF")),
    "tiff-float-unit": (".tiff", lambda x: pil_bytes(Image.fromarray(x.astype(np.float32) / 255), "TIFF")),
    "tiff-float-255": (".tif", lambda x: pil_bytes(Image.fromarray(x.astype(np.float32)), "TIFF")),
    "rgba-opaque": (".png", lambda x: pil_bytes(Image.fromarray(x).convert("RGBA"), "PNG")),
    "palette": (".gif", lambda x: pil_bytes(Image.fromarray(x).convert("P"), "GIF")),
    "png-exif-rotated": (".png", lambda x: exif_rotated(x, "PNG", 6)),
}


def image_folder(root: Path, encoding: str | None = None, per_class: int = 6) -> Path:
    """The digits as ``root/<class>/<i>.<suffix>``: 8-bit PNGs, or another encoding of them."""
    suffix, encode = ENCODINGS[encoding] if encoding else (".png", lambda x: pil_bytes(Image.fromarray(x), "PNG"))
    for cls, images in digit_images(per_class).items():
        (root / cls).mkdir(parents=True)
        for i, x in enumerate(images):
            (root / cls / f"{i:02d}{suffix}").write_bytes(encode(x))
    return root


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def predictions(csv_path: Path) -> dict[str, dict[str, str]]:
    """The CSV's rows by ``<class>/<file stem>``."""
    return {f"{Path(r['file']).parent.name}/{Path(r['file']).stem}": r for r in csv.DictReader(csv_path.open())}


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    """A classifier exported by ``fewgen fit`` on the digit shots (tiny pretraining on digits 0-4)."""
    root = tmp_path_factory.mktemp("fit")
    shots = image_folder(root / "shots", per_class=3)
    assert main(["fit", str(shots), "--preset", DIGITS, f"cache_dir={root / 'cache'}", *TINY,
                 "--out", str(root / "run")]) == 0
    return root / "run" / "classifier"


# ----------------------------------------------------------------------------- images read alike


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_other_encodings_read_as_the_8bit_originals(tmp_path, classifier, capsys, encoding):
    """An image folder in another encoding is the same data for a run, and the same predictions."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import load_data

    original, other = image_folder(tmp_path / "png8"), image_folder(tmp_path / encoding, encoding)
    for channels in (1, 3):
        data = [load_data(load_config(DIGITS, ["data.dataset=imagefolder", f"data.root={folder}", "data.image_size=16",
                                               f"data.channels={channels}"]).data).full for folder in (original, other)]
        assert data[0].images.shape == (30, channels, 16, 16) and data[1].class_names == data[0].class_names
        assert (data[0].images == data[1].images).all()
        assert (data[0].labels == data[1].labels).all()
    for folder in (original, other):
        assert main(["predict", str(classifier), str(folder), "--out", str(tmp_path / f"{folder.name}.csv"),
                     "--no-progress"]) == 0
    before, after = predictions(tmp_path / "png8.csv"), predictions(tmp_path / f"{encoding}.csv")
    assert len(after) == 30 and not any(r["error"] for r in after.values())
    assert {k: (r["predicted"], r["probability"]) for k, r in after.items()} == \
           {k: (r["predicted"], r["probability"]) for k, r in before.items()}
    capsys.readouterr()


def test_16bit_rgb_png_is_read_within_one_of_its_rounding():
    """PIL itself reads 16-bit RGB PNGs as 8-bit (the high byte); any 16-bit value lands within 1
    of round(v / 257)."""
    from fewgen.data.reader import read_image_array

    values = np.random.default_rng(0).integers(0, 65536, (16, 16, 3)).astype(np.uint16)
    read = read_image_array(png16(values), 3).transpose(1, 2, 0).astype(int)
    assert np.abs(read - np.rint(values / 257)).max() <= 1
    gray = read_image_array(png16(values[..., 0]), 1)[0].astype(int)
    assert (gray == np.rint(values[..., 0] / 257)).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_rotated_jpeg_is_read_upright(tmp_path, orientation):
    from fewgen.classifier import read_image_file

    upright = np.zeros((24, 16), np.uint8)
    upright[:4] = 255  # a bright band along the top
    path = tmp_path / "photo.jpg"
    path.write_bytes(exif_rotated(upright, "JPEG", orientation, quality=95))
    read = read_image_file(path, (1, 24, 16))[0].int()
    assert read[:4].float().mean() > 200 and read[6:].float().mean() < 30


def test_alpha_is_composited_on_black():
    from fewgen.data.reader import read_image_array

    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = [[255, 128, 0, 0]] * 4
    read = read_image_array(pil_bytes(Image.fromarray(rgba), "PNG"), 3)
    assert read[:, 0, 0].tolist() == [200] * 3 and read[:, 0, 1].tolist() == [100] * 3
    assert read[:, 0, 2:].max() == 0


# ----------------------------------------------------------------------------- refused in a run

RUN_REFUSALS = {
    "bomb": ("bomb.png", bomb_png, "declares 40000x40000 = 1,600,000,000 pixels, over fewgen's limit"),
    "float-out-of-range": ("x.tif", lambda: pil_bytes(Image.fromarray(np.full((16, 16), 700, np.float32)), "TIFF"),
                           "floating-point image with values from 700 to 700"),
    "float-nan": ("x.tiff", lambda: pil_bytes(Image.fromarray(np.full((16, 16), np.nan, np.float32)), "TIFF"),
                  "floating-point image with NaN"),
    "int32-out-of-range": ("x.tif", lambda: pil_bytes(Image.fromarray(np.full((16, 16), 10**6, np.int32)), "TIFF"),
                           "32-bit integer pixels from 1000000"),
    "garbage": ("x.png", lambda: b"\x89PNG\r\n\x1a\n not really", "cannot read image"),
    "empty-class": (None, None, "have no images"),
}


@pytest.mark.parametrize("case", sorted(RUN_REFUSALS))
def test_a_bad_file_in_a_run_is_one_line_and_changes_nothing(tmp_path, capsys, case):
    name, make, message = RUN_REFUSALS[case]
    folder = image_folder(tmp_path / "folder")
    if make is None:
        (folder / "empty").mkdir()
    else:
        (folder / "nine" / name).write_bytes(make())
    before = snapshot(tmp_path)
    code = main(["run", DIGITS, "data.dataset=imagefolder", f"data.root={folder}", "data.channels=1",
                 f"cache_dir={tmp_path / 'cache'}", *TINY, "--out", str(tmp_path / "run")])
    line = one_error_line(capsys)
    assert code == 2 and message in line, line
    if make is not None:
        assert name in line
    else:
        assert str(folder / "empty") in line and "add images to them or remove them" in line
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_bad_file_in_fit_is_one_line(tmp_path, capsys):
    shots = image_folder(tmp_path / "shots", per_class=2)
    (shots / "nine" / "bomb.png").write_bytes(bomb_png())
    code = main(["fit", str(shots), "--preset", DIGITS, f"cache_dir={tmp_path / 'cache'}", *TINY,
                 "--out", str(tmp_path / "run")])
    assert code == 2 and "declares 40000x40000" in one_error_line(capsys)


def test_bad_files_in_predict_are_listed_and_skipped(tmp_path, classifier, capsys):
    folder = image_folder(tmp_path / "queries", per_class=2)
    for case in ("bomb", "float-out-of-range", "float-nan", "garbage"):
        name, make, _ = RUN_REFUSALS[case]
        (folder / "nine" / f"{case}{Path(name).suffix}").write_bytes(make())
    out = tmp_path / "p.csv"
    assert main(["predict", str(classifier), str(folder), "--out", str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "skipped 4 unreadable file(s)" in captured.out
    rows = predictions(out)
    assert len(rows) == 14 and sum(bool(r["error"]) for r in rows.values()) == 4
    for case in ("bomb", "float-out-of-range", "float-nan", "garbage"):
        row = rows[f"nine/{case}"]
        assert row["predicted"] == "" and row["error"] and RUN_REFUSALS[case][2].split(" = ")[0] in row["error"]
    assert all(r["predicted"] for k, r in rows.items() if not r["error"])


# ----------------------------------------------------------------------------- tampered classifiers


def _edit_json(**changes):
    def edit(folder: Path) -> None:
        info = json.loads((folder / "classifier.json").read_text())
        for k, v in changes.items():
            if v is None:
                info.pop(k)
            else:
                info[k] = v(info) if callable(v) else v
        (folder / "classifier.json").write_text(json.dumps(info))
    return edit


def _flip_bytes(folder: Path) -> None:
    data = bytearray((folder / "model.safetensors").read_bytes())
    start = len(data) // 2
    data[start:start + 1000] = bytes(b ^ 0xFF for b in data[start:start + 1000])
    (folder / "model.safetensors").write_bytes(bytes(data))


def _backbone(name=None, **kwargs):
    return lambda info: {"name": name or info["backbone"]["name"], "kwargs": {**info["backbone"]["kwargs"], **kwargs}}


TAMPERED = {
    "flipped-bytes": (_flip_bytes, "model.safetensors does not match the sha256 recorded in classifier.json"),
    "config-edited": (lambda f: (f / "config.yaml").write_text("seeds: [1]\n"),
                      "config.yaml does not match the sha256 recorded"),
    "no-checksums": (_edit_json(files=None), "records no sha256 for model.safetensors"),
    "format-1": (_edit_json(format="fewgen-classifier/1"), "written before classifiers recorded checksums"),
    "not-json": (lambda f: (f / "classifier.json").write_text("{\"format\": "), "is not valid JSON"),
    "no-backbone": (_edit_json(backbone=None), "has no 'backbone'"),
    "three-names-five-outputs": (_edit_json(class_names=lambda info: info["class_names"][:3]),
                                 "names 3 classes but the head in model.safetensors has 5"),
    "names-not-strings": (_edit_json(class_names=[1, 2, 3, 4, 5]), "not a list of class names"),
    "names-swapped": (_edit_json(class_names=lambda info: info["class_names"][::-1]),
                      "has class_names = ['nine', '@eight'"),
    "svm-head": (_edit_json(head="svm"), "has head 'svm'; fewgen's heads are logreg and proto"),
    "proto-head": (_edit_json(head="proto"), "holds head tensors ['bias', 'mean', 'weight']; a proto head"),
    "other-image-shape": (_edit_json(image_shape=[1, 20, 20]),
                          "has image_shape = [1, 20, 20] but model.safetensors was exported with [1, 16, 16]"),
    "rgb-image-shape": (_edit_json(image_shape=[3, 16, 16]), "backbone.blocks.0.0.weight is"),
    "four-channels": (_edit_json(image_shape=[4, 16, 16]), "not [C, H, W] with C 1 or 3"),
    "huge-image-shape": (_edit_json(image_shape=[1, 100000, 100000]), "over fewgen's limit of 4096 px a side"),
    "tiny-image-shape": (_edit_json(image_shape=[1, 1, 1]), "backbone cannot read images of image_shape [1, 1, 1]"),
    "unknown-backbone": (_edit_json(backbone=_backbone("vit_giant")), "names backbone 'vit_giant', which this fewgen"),
    "other-backbone": (_edit_json(backbone=_backbone("resnet12-small")), "does not hold the resnet12-small backbone"),
    "wider-backbone": (_edit_json(backbone=_backbone(hidden=32)), "the conv4 backbone classifier.json describes needs"),
    "bad-kwarg": (_edit_json(backbone=_backbone(colour=1)), "cannot be built"),
    "huge-kwarg": (_edit_json(backbone=_backbone(depth=10**9)), "is beyond 4096"),
    "temperature": (_edit_json(temperature=-1), "has temperature = -1, not a positive number"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_classifier_is_refused_in_one_line(tmp_path, classifier, capsys, case):
    tamper, message = TAMPERED[case]
    folder = tmp_path / "classifier"
    shutil.copytree(classifier, folder)
    tamper(folder)
    queries = image_folder(tmp_path / "queries", per_class=1)
    before = snapshot(tmp_path)
    code = main(["predict", str(folder), str(queries), "--out", str(tmp_path / "p.csv"), "--no-progress"])
    line = one_error_line(capsys)
    assert code == 2 and message in line, line
    assert "retrain" not in line and "rerun" not in line
    assert snapshot(tmp_path) == before


def test_an_intact_copy_still_loads_and_records_its_checksums(tmp_path, classifier):
    import fewgen
    from fewgen.utils import sha256_file

    info = json.loads((classifier / "classifier.json").read_text())
    assert info["format"] == "fewgen-classifier/2"
    assert info["files"] == {n: sha256_file(classifier / n) for n in ("model.safetensors", "config.yaml")}
    shutil.copytree(classifier, tmp_path / "copy")
    clf = fewgen.load_classifier(tmp_path / "copy")
    assert clf.class_names == sorted(CLASSES) and clf.image_shape == (1, 16, 16)
    assert "files" not in clf.info and clf.info["backbone"]["name"] == "conv4"


# ----------------------------------------------------------------------------- predictions.csv


def test_predictions_csv_holds_no_formula(tmp_path, classifier, capsys, monkeypatch):
    """Class names and file names that start as formulas (=, +, -, @, tab, CR) get a leading ';
    probabilities stay numbers."""
    folder = tmp_path / "q"
    folder.mkdir()
    x = digit_images(1)["nine"][0]
    names = ["=HYPERLINK(1).png", "+1.png", "-1.png", "@SUM(1).png", "\tx.png", "\rx.png", "plain.png"]
    for name in names:
        (folder / name).write_bytes(pil_bytes(Image.fromarray(x), "PNG"))
    (folder / "=broken.png").write_bytes(b"not an image")
    monkeypatch.chdir(folder)
    out = tmp_path / "p.csv"
    # `--` before file names that start with "-" (as for any command line tool)
    assert main(["predict", "--out", str(out), "--no-progress", str(classifier), "--", *names, "=broken.png"]) == 0
    capsys.readouterr()
    table = list(csv.reader(out.open(newline="")))
    header, rows = table[0], table[1:]
    assert len(rows) == len(names) + 1
    numbers = {i for i, h in enumerate(header) if h.startswith("probability")}
    for row in rows:
        for i, cell in enumerate(row):
            if i in numbers:
                assert cell == "" or 0 <= float(cell) <= 1
            else:
                assert cell[:1] not in ("=", "+", "-", "@", "\t", "\r"), row
    files = [r[0] for r in rows]
    assert files[:len(names)] == [f"'{n}" for n in names[:-1]] + ["plain.png"]
    assert files[-1] == "'=broken.png" and rows[-1][-1].startswith("cannot read image")
    labels = {r[1] for r in rows[:-1]} | {c for r in rows[:-1] for c in r[3:-1:2]}
    assert labels <= {f"'{c}" if c[0] in "=+-@" else c for c in CLASSES} and any(c.startswith("'") for c in labels)
