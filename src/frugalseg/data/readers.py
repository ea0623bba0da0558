"""Dataset readers, auto-detected from the folder given to ``--data``.

* Decathlon / nnU-Net raw: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (NIfTI).
* SSL4MIS HDF5 (ACDC): ``train.list``, ``val.list``, optional ``test.list``, ``data/*.h5``; training frames exist
  only as slice files ``<frame>_slice_<k>.h5`` and are rebuilt by stacking slices ``1..N``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from frugalseg.data.checks import check_affines, check_image, check_label, check_pair
from frugalseg.data.nifti import permuted_spacing, read_nifti, to_ras
from frugalseg.data.volume import Volume
from frugalseg.errors import UserError

SPLITS = ("train", "val", "test", "all")
VALIDATION_FRACTION = 0.2
VALIDATION_SEED = 20201207  # fixed, independent of any run's seed
MIN_LABELLED_FOR_VALIDATION = 5  # fewer labelled cases: no automatic validation split (it would take a training case)


@dataclass
class DataSource:
    """What a reader knows about a dataset folder. ``load`` reads and checks one case."""

    root: Path
    format: str
    class_names: list[str]
    in_channels: int
    splits: dict[str, list[str]]
    labelled_pool: list[str]
    default_spatial_dims: int = 3
    notes: list[str] = field(default_factory=list)  # what the reader decided that the user should hear of

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def cases(self, split: str) -> list[str]:
        if split not in SPLITS:
            raise UserError(f"--split: unknown split {split!r} (choose from {', '.join(SPLITS)})")
        if split == "all":
            seen: dict[str, None] = {}
            for name in ("train", "val", "test"):
                for case in self.splits.get(name, []):
                    seen[case] = None
            return list(seen)
        return list(self.splits.get(split, []))

    def load(self, case_id: str, with_label: bool = True) -> Volume:  # pragma: no cover - overridden
        raise NotImplementedError

    def check_cases(self, cases: list[str]) -> None:  # pragma: no cover - overridden
        """Read every case's header (shapes, types, affines, label presence) without its voxels: a damaged case
        is found before any training or evaluation starts, in one line naming its file."""
        raise NotImplementedError



class DecathlonSource(DataSource):
    """Decathlon (``labels`` index->name), nnU-Net v2 raw (``labels`` name->index, ``_0000`` channels), or a plain
    folder: ``imagesTr/`` with ``labelsTr/`` labels for some of the images (the classes are read off the labels).

    Images without a label (``training`` entries without one, unlabelled ``test`` scans, images with no file in
    ``labelsTr/``, or the files of an ``unlabelled`` folder) are unlabelled training images: pre-training and
    semi-supervised methods read them, the labelled pool and the evaluation never do.
    """

    @staticmethod
    def matches(names: set[str]) -> bool:
        return "dataset.json" in names or "imagesTr" in names

    def __init__(self, root: Path, unlabelled: Path | None = None) -> None:
        meta_path = root / "dataset.json"
        notes: list[str] = []
        if meta_path.is_file():
            try:
                meta = json.loads(meta_path.read_text())
            except OSError as exc:
                raise UserError(f"{meta_path}: cannot read ({exc.strerror or exc})") from None
            except json.JSONDecodeError as exc:
                raise UserError(f"{meta_path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
            if not isinstance(meta, dict):
                raise UserError(f"{meta_path}: expected a JSON object")
        else:
            meta = {}  # a plain folder: imagesTr/ (+ labelsTr/)
        self._images: dict[str, list[Path]] = {}
        self._labels: dict[str, Path | None] = {}
        self.file_ending = meta.get("file_ending", ".nii.gz")
        if not isinstance(self.file_ending, str):
            raise UserError(f"{meta_path}: 'file_ending' must be a string such as \".nii.gz\"")
        channels = meta.get("modality") or meta.get("channel_names") or {"0": "image"}
        if not isinstance(channels, (dict, list)):
            key = "modality" if meta.get("modality") else "channel_names"
            raise UserError(f"{meta_path}: '{key}' must map channel numbers to names, e.g. {{\"0\": \"MRI\"}}")
        if "training" in meta:
            train = self._entries(meta.get("training"), root, meta_path, "training", len(channels))
        else:  # nnU-Net raw or a plain folder: the images found in imagesTr/, with a label where there is one
            train, n_channels = self._scan(root)
            if not meta:
                channels = {str(i): f"channel {i}" for i in range(n_channels)}
        if meta.get("labels") is None and not meta_path.is_file():
            class_names = self._classes_from_labels(root, [c for c in train if self._labels.get(c)])
        else:
            class_names = _class_names(meta.get("labels"), meta_path)
        labelled = [c for c in train if self._labels.get(c) is not None]
        if not labelled:
            raise UserError(f"{meta_path if meta_path.is_file() else root / 'labelsTr'}: no labelled training case "
                            "(a label file for at least one training image)")
        val_entry = meta.get("validation")
        if val_entry is not None:  # an explicit list, even an empty one, is the user's choice
            val = self._entries(val_entry, root, meta_path, "validation", len(channels)) if val_entry else []
            unknown = [c for c in val if c not in self._images]
            if unknown:
                raise UserError(f"{meta_path}: validation case {unknown[0]!r} is not a listed case")
            unlabelled_val = [c for c in val if self._labels.get(c) is None]
            if unlabelled_val:
                raise UserError(f"{meta_path}: validation case {unlabelled_val[0]!r} has no label")
        elif len(labelled) >= MIN_LABELLED_FOR_VALIDATION:
            ordered = sorted(labelled)  # a fixed 20 % of the labelled training cases
            rng = np.random.default_rng(VALIDATION_SEED)
            n_val = max(1, round(VALIDATION_FRACTION * len(ordered)))
            picked = set(rng.permutation(len(ordered))[:n_val].tolist())
            val = [c for i, c in enumerate(ordered) if i in picked]
        else:
            val = []
            notes.append(f"{root}: only {len(labelled)} labelled case(s): no validation split is set aside "
                              f"automatically below {MIN_LABELLED_FOR_VALIDATION} (list some under 'validation' in "
                              "dataset.json to evaluate on them)")
        train = [c for c in train if c not in set(val)]
        tested = self._entries(meta.get("test"), root, meta_path, "test", len(channels), False)
        test = [c for c in tested if self._labels.get(c) is not None]
        extra = [c for c in tested if self._labels.get(c) is None]  # unlabelled test scans: unlabelled images
        if unlabelled is not None:
            extra += self._folder(Path(unlabelled), len(channels))
        super().__init__(
            root=root,
            format="decathlon",
            class_names=class_names,
            in_channels=len(channels),
            splits={"train": sorted(set(train) | set(extra)), "val": sorted(val), "test": sorted(test)},
            labelled_pool=sorted(c for c in train if self._labels.get(c) is not None),
            default_spatial_dims=2 if str(meta.get("tensorImageSize", "3D")).upper() == "2D" else 3,
            notes=notes,
        )

    def _scan(self, root: Path) -> tuple[list[str], int]:
        """Cases of ``imagesTr/`` (``case.nii.gz``, or nnU-Net's ``case_0000.nii.gz``... one file per channel), with
        ``labelsTr/case.nii.gz`` where it exists. Returns the cases and the number of channels."""
        folder = root / "imagesTr"
        if not folder.is_dir():
            raise UserError(f"{root}: no imagesTr/ folder (and no dataset.json listing the images)")
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not files:
            raise UserError(f"{folder}: no NIfTI image (.nii or .nii.gz)")
        groups = group_channels(files)
        counts = {len(paths) for paths in groups.values()}
        if len(counts) != 1:
            raise UserError(f"{folder}: cases have different numbers of channel files ({sorted(counts)})")
        for case, paths in groups.items():
            self._images[case] = paths
            label = next((root / "labelsTr" / f"{case}{ext}" for ext in (".nii.gz", ".nii")
                          if (root / "labelsTr" / f"{case}{ext}").is_file()), None)
            self._labels[case] = label
        return sorted(groups), counts.pop()

    def _folder(self, folder: Path, n_channels: int) -> list[str]:
        """The images of an extra folder of unlabelled scans (``--unlabelled``)."""
        if not folder.is_dir():
            raise UserError(f"--unlabelled {folder}: folder not found")
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
        if not files:
            raise UserError(f"--unlabelled {folder}: no NIfTI image (.nii or .nii.gz)")
        cases = []
        for case, paths in group_channels(files).items():
            if case in self._images:
                raise UserError(f"--unlabelled {folder}: case id {case!r} is also a case of --data (case ids come "
                                "from file names and must be unique)")
            if len(paths) not in (1, n_channels):
                raise UserError(f"--unlabelled {paths[0]}: {len(paths)} channel file(s), the dataset has "
                                f"{n_channels}")
            self._images[case], self._labels[case] = paths, None
            cases.append(case)
        return cases

    def _classes_from_labels(self, root: Path, cases: list[str]) -> list[str]:
        """Class names of a plain folder: 0 = background and one class per value found in the label files."""
        values: set[int] = set()
        for case in cases:
            data, _, _ = read_nifti(self._labels[case])
            values |= {int(v) for v in np.unique(check_label(data, self._labels[case], 2**31))}
        top = max(values | {1})
        return ["background", *(f"class {k}" for k in range(1, top + 1))]

    def _entries(self, entries, root: Path, meta_path: Path, key: str, n_channels: int,
                 need_label: bool = False) -> list[str]:
        cases: list[str] = []
        if entries is None:
            return cases
        if not isinstance(entries, list):
            raise UserError(f"{meta_path}: '{key}' must be a list")
        listed: set[str] = set()
        for entry in entries:
            if isinstance(entry, str):
                if entry.endswith((".nii", ".nii.gz")):  # Decathlon test lists hold bare image paths
                    entry = {"image": entry}
                else:
                    if entry in listed:
                        raise UserError(f"{meta_path}: case {entry!r} is listed twice under '{key}'")
                    listed.add(entry)
                    cases.append(entry)  # a case id already listed under "training"
                    continue
            if not isinstance(entry, dict) or "image" not in entry:
                raise UserError(f"{meta_path}: each '{key}' entry needs an 'image' path")
            image = self._inside(root, entry["image"], meta_path)
            label = self._inside(root, entry["label"], meta_path) if entry.get("label") else None
            if need_label and label is None:
                raise UserError(f"{meta_path}: '{key}' entry {entry['image']} has no 'label'")
            case = _case_id(image)
            if case in self._images and self._images[case] != [image]:
                raise UserError(f"{meta_path}: two images have the case id {case!r}: {self._images[case][0]} and "
                                f"{image} (case ids come from file names and must be unique)")
            if case in listed:
                raise UserError(f"{meta_path}: case {case!r} is listed twice under '{key}'")
            listed.add(case)
            self._images[case] = [image]
            if case not in self._labels or label is not None:
                self._labels[case] = label
            cases.append(case)
        return cases

    @staticmethod
    def _inside(root: Path, rel: str, meta_path: Path) -> Path:
        path = (root / rel).resolve()
        if not path.is_relative_to(root.resolve()):
            raise UserError(f"{meta_path}: path {rel!r} leaves the dataset folder")
        return path

    def load(self, case_id: str, with_label: bool = True) -> Volume:
        if case_id not in self._images:
            raise UserError(f"{self.root}: unknown case {case_id!r}")
        arrays, affine, spacing = [], None, None
        for path in self._images[case_id]:
            data, aff, zooms = read_nifti(path)
            data = check_image(data, path)
            if data.ndim == 4:  # Decathlon multi-modal: (X, Y, Z, C)
                arrays.extend(np.moveaxis(data, -1, 0))
            elif data.ndim in (2, 3):
                arrays.append(data)
            else:
                raise UserError(f"{path}: unsupported image shape {data.shape}")
            if affine is None:
                affine, spacing = aff, zooms
        image = np.stack(arrays).astype(np.float32)
        if image.shape[0] != self.in_channels:
            raise UserError(
                f"{self._images[case_id][0]}: image has {image.shape[0]} channel(s), dataset.json declares "
                f"{self.in_channels}"
            )
        spacing = tuple(spacing[: image.ndim - 1]) if spacing else (1.0,) * (image.ndim - 1)
        if any(not np.isfinite(s) or s <= 0 for s in spacing):
            raise UserError(f"{self._images[case_id][0]}: voxel spacing {spacing} is missing or not positive")
        label = None
        label_path = self._labels.get(case_id)
        if with_label and label_path is not None:
            lab, lab_aff, _ = read_nifti(label_path)
            check_pair(image.shape[1:], lab.shape, label_path)
            check_affines(affine, lab_aff, label_path)
            label = check_label(lab, label_path, self.num_classes)
        if image.ndim == 4:  # every 3-D volume in the RAS orientation (flips and axis permutations only)
            ras, ras_affine, ornt = to_ras(np.moveaxis(image, 0, -1), affine)
            image = np.ascontiguousarray(np.moveaxis(ras, -1, 0))
            label = None if label is None else to_ras(label, affine)[0]
            affine, spacing = ras_affine, permuted_spacing(spacing, ornt)
        return Volume(case_id, image, label, affine, spacing)

    def check_cases(self, cases: list[str]) -> None:
        import nibabel as nib

        for case in cases:
            paths = [*self._images[case], *([self._labels[case]] if self._labels.get(case) else [])]
            shapes = []
            for path in paths:
                if not path.is_file():
                    raise UserError(f"{path}: file not found")
                try:
                    img = nib.load(str(path))
                    shapes.append((tuple(img.shape), np.asarray(img.affine)))
                except Exception as exc:  # nibabel raises many types for a damaged header
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise UserError(f"{path}: cannot read NIfTI ({reason})") from None
            if self._labels.get(case):
                (image_shape, image_affine), (label_shape, label_affine) = shapes[0], shapes[-1]
                check_pair(image_shape[:3], label_shape[:3], self._labels[case])
                check_affines(image_affine, label_affine, self._labels[case])


_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def group_channels(files: list[Path]) -> dict[str, list[Path]]:
    """Case id -> its image files: nnU-Net's ``case_0000.nii.gz``, ``case_0001.nii.gz``... are one case's channels
    (in channel order), any other name is a one-channel case."""
    groups: dict[str, dict[int, Path]] = {}
    for path in files:
        name = _case_id(path)
        m = _CHANNEL.match(name)
        case, channel = (m["case"], int(m["channel"])) if m else (name, 0)
        if channel in groups.setdefault(case, {}):
            raise UserError(f"{path}: a second file for case {case!r}, channel {channel}")
        groups[case][channel] = path
    out = {}
    for case, chans in groups.items():
        if sorted(chans) != list(range(len(chans))):
            raise UserError(f"{chans[min(chans)].parent}: case {case!r} has channel files {sorted(chans)}, not "
                            f"0..{len(chans) - 1}")
        out[case] = [chans[i] for i in range(len(chans))]
    return out


def _case_id(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _class_names(labels, meta_path: Path) -> list[str]:
    if not isinstance(labels, dict) or not labels:
        raise UserError(f"{meta_path}: missing or empty 'labels'")
    pairs: dict[int, str] = {}
    for k, v in labels.items():
        if re.fullmatch(r"-?[0-9]+", str(k)):  # Decathlon: {"0": "background"}; ASCII only ("²".isdigit() is True)
            pairs[int(k)] = str(v)
        elif isinstance(v, int):  # nnU-Net v2: {"background": 0}
            pairs[v] = str(k)
        else:
            raise UserError(f"{meta_path}: cannot read label entry {k!r}: {v!r}")
    if sorted(pairs) != list(range(len(pairs))):
        raise UserError(f"{meta_path}: label indices must be 0..K-1, got {sorted(pairs)}")
    if len(pairs) < 2:
        raise UserError(f"{meta_path}: need background and at least one foreground class")
    return [pairs[i] for i in range(len(pairs))]


_SLICE = re.compile(r"^(?P<frame>.+)_slice_(?P<k>\d+)\.h5$")
ACDC_CLASSES = ["background", "RV", "Myo", "LV"]


class SSL4MISSource(DataSource):
    """The SSL4MIS ACDC layout. Labelled pool = end-diastolic frames (``frame01``) of training patients."""

    @staticmethod
    def matches(names: set[str]) -> bool:
        return "train.list" in names and "data" in names

    def __init__(self, root: Path) -> None:
        data_dir = root / "data"
        if not data_dir.is_dir():
            raise UserError(f"{root}: SSL4MIS layout needs a data/ folder")
        splits: dict[str, list[str]] = {}
        for name in ("train", "val", "test"):
            lst = root / f"{name}.list"
            if lst.is_file():
                try:
                    splits[name] = [ln.strip() for ln in lst.read_text().splitlines() if ln.strip()]
                except (OSError, UnicodeDecodeError) as exc:
                    raise UserError(f"{lst}: cannot read ({exc})") from None
        if not splits.get("train"):
            raise UserError(f"{root / 'train.list'}: missing or empty")
        seen: dict[str, str] = {}
        for name, cases in splits.items():
            for case in cases:
                if case in seen:
                    where = "twice" if seen[case] == name else f"in {seen[case]}.list too"
                    raise UserError(f"{root / (name + '.list')}: case {case} is listed {where}")
                seen[case] = name
        self._slices: dict[str, list[Path]] = {}
        by_frame: dict[str, dict[int, Path]] = {}
        for path in data_dir.glob("*_slice_*.h5"):
            m = _SLICE.match(path.name)
            if m:
                by_frame.setdefault(m["frame"], {})[int(m["k"])] = path
        for frame, slices in by_frame.items():
            n = max(slices)
            if sorted(slices) != list(range(1, n + 1)):
                missing = sorted(set(range(1, n + 1)) - set(slices))
                raise UserError(f"{data_dir}: frame {frame} is missing slice file(s) {missing}")
            self._slices[frame] = [slices[k] for k in range(1, n + 1)]
        for name, cases in splits.items():
            for case in cases:
                if case not in self._slices and not (data_dir / f"{case}.h5").is_file():
                    raise UserError(f"{root / (name + '.list')}: case {case} has no file in data/")
        pool = [c for c in splits["train"] if c.endswith("frame01")]
        super().__init__(
            root=root,
            format="ssl4mis_h5",
            class_names=list(ACDC_CLASSES),
            in_channels=1,
            splits=splits,
            labelled_pool=pool,
            default_spatial_dims=2,
        )

    def _read_h5(self, path: Path, with_label: bool) -> tuple[np.ndarray, np.ndarray | None]:
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "image" not in f:
                    raise UserError(f"{path}: no 'image' dataset")
                if with_label and "label" not in f:
                    raise UserError(f"{path}: no 'label' dataset")
                image = np.asarray(f["image"][()])
                label = np.asarray(f["label"][()]) if with_label else None
        except UserError:
            raise
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"{path}: cannot read HDF5 ({reason})") from None
        return image, label

    def load(self, case_id: str, with_label: bool = True) -> Volume:
        if case_id in self._slices:
            images, labels = [], []
            for path in self._slices[case_id]:
                img, lab = self._read_h5(path, with_label)
                if img.ndim != 2:
                    raise UserError(f"{path}: expected a 2-D slice, got shape {img.shape}")
                if images and img.shape != images[0].shape:
                    raise UserError(f"{path}: slice shape {img.shape} differs from slice 1 {images[0].shape}")
                images.append(check_image(img, path))
                if lab is not None:
                    check_pair(img.shape, lab.shape, path)
                    labels.append(check_label(lab, path, self.num_classes))
            image = np.stack(images)
            label = np.stack(labels) if with_label and len(labels) == len(images) else None
        else:
            path = self.root / "data" / f"{case_id}.h5"
            img, lab = self._read_h5(path, with_label)
            if img.ndim != 3:
                raise UserError(f"{path}: expected a 3-D volume, got shape {img.shape}")
            image = check_image(img, path)
            label = None
            if lab is not None:
                check_pair(img.shape, lab.shape, path)
                label = check_label(lab, path, self.num_classes)
        # SSL4MIS stores no spacing; slices are along axis 0. Mark that axis as the coarse one (nominal spacing:
        # distances measured on these volumes are in voxels, not mm).
        return Volume(case_id, image[None], label, np.eye(4), (10.0, 1.0, 1.0), spacing_known=False)

    def check_cases(self, cases: list[str]) -> None:
        import h5py

        for case in cases:
            paths = self._slices.get(case) or [self.root / "data" / f"{case}.h5"]
            want = 2 if case in self._slices else 3
            for path in paths:
                try:
                    with h5py.File(path, "r") as f:
                        for key in ("image", "label"):
                            if key not in f:
                                raise UserError(f"{path}: no {key!r} dataset")
                        if f["image"].ndim != want or f["image"].shape != f["label"].shape:
                            raise UserError(f"{path}: image {f['image'].shape} and label {f['label'].shape} "
                                            f"should be {want}-D of one shape")
                except UserError:
                    raise
                except Exception as exc:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise UserError(f"{path}: cannot read HDF5 ({reason})") from None


def open_source(path: Path | str, unlabelled: Path | str | None = None) -> DataSource:
    """Detect the layout of ``path`` and open it; ``unlabelled`` is a folder of extra unlabelled scans (NIfTI)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"--data {root}: folder not found")
    if not root.is_dir():
        raise UserError(f"--data {root}: not a folder")
    try:
        names = {p.name for p in root.iterdir()}
    except OSError as exc:
        raise UserError(f"--data {root}: cannot read folder ({exc.strerror or exc})") from None
    from frugalseg.registry import DATASETS, resolve

    for name in DATASETS:
        reader = resolve(DATASETS, name, "--data")
        if reader.matches(names):
            if unlabelled is None:
                return reader(root)
            if name != "decathlon":
                raise UserError(f"--unlabelled {unlabelled}: extra scans go with a NIfTI dataset (dataset.json or "
                                f"imagesTr/), not the {name} layout of {root}")
            return reader(root, unlabelled=Path(unlabelled).expanduser())
    raise UserError(
        f"--data {root}: unrecognised layout (expected imagesTr/ with labelsTr/, or dataset.json, "
        "or SSL4MIS train.list/val.list + data/*.h5)"
    )
