"""Helpers shared by the data tests: small copies of the real FMC_UIA sample that tests may corrupt (no tests here)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np

from usagg.config import DataConfig
from usagg.tasks import TaskCard


def copy_fmc_task(shared_data: Path, dest: Path, task: str, rows: int = 3, csv_name: str | None = None) -> Path:
    """Copy the first ``rows`` rows of one task of the FMC_UIA sample (CSV and files) into ``dest``; returns the root."""
    source = shared_data / "fmc_uia_sample"
    with open(source / "csv_files" / f"{task}.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        body = [next(reader) for _ in range(rows)]
    (dest / "csv_files").mkdir(parents=True, exist_ok=True)
    for row in body:
        for column in ("image_path", "mask_path"):
            if column in header:
                rel = row[header.index(column)]
                target = (dest / "csv_files" / rel).resolve()
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile((source / "csv_files" / rel).resolve(), target)
    write_csv(dest / "csv_files" / (csv_name or f"{task}.csv"), header, body)
    return dest


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def read_csv_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        return header, list(reader)


def fmc_card(name: str, root: Path, **fields) -> TaskCard:
    """Build an fmc_uia task card for the sample's task ``name`` (types and counts as in the sample)."""
    defaults = {
        "breast_lesion": {"type": "segmentation", "num_classes": 2},
        "breast_2cls": {"type": "classification", "num_classes": 2},
        "breast_lesion_det": {"type": "detection", "num_classes": 1},
        "fetal_head": {"type": "segmentation", "num_classes": 2},
        "fetal_head_axis": {"type": "regression", "num_keypoints": 2},
        "nerve_vessel": {"type": "segmentation", "num_classes": 3},
    }[name]
    source = {"format": "fmc_uia", "root": root, **fields.pop("source", {})}
    return TaskCard.model_validate({"name": name, **defaults, **fields, "source": source})


def small_config(**fields) -> DataConfig:
    return DataConfig(img_size=fields.pop("img_size", 64), num_workers=0, **fields)


def write_dicom(path: Path, pixels: np.ndarray, **attributes) -> Path:
    """Write a single-frame ultrasound DICOM of greyscale ``pixels`` with extra header ``attributes``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    for key, value in attributes.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path
