"""Typed dataset manifests (`datasets_manifest/<name>.yaml`): where a source's images and captions come from.

Three kinds of source, told apart by `source:`
- `url_list`: an image-URL + caption list that img2dataset downloads (CC3M, CC12M, Megalith-10M, OpenImages);
- `archives`: images already on disk inside tar archives, captions from a side file (SA-1B, JourneyDB);
- `generated`: made by the project itself (`demo_shapes`).

Paths may use `${VAR}` environment variables; relative paths are relative to the manifest's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from simplear.config import ConfigError, StrictModel, describe_validation_error


class DatasetInfo(StrictModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    description: str
    homepage: str | None = None
    license: str
    approx_images: int | None = Field(None, ge=0)
    notes: str | None = None
    verified: str | None = Field(None, description="which fields were checked against the public release, and against what")
    # where a resolved manifest came from; set by the loader, not written in YAML files
    base_dir: Path | None = Field(None, exclude=True)

    def resolve(self, path: str) -> str:
        """Expand `${VAR}` and make a local relative path absolute against the manifest's folder."""
        expanded = os.path.expandvars(path)
        if "://" in expanded or os.path.isabs(expanded) or self.base_dir is None:
            return expanded
        return str((self.base_dir / expanded).resolve())


class UrlListSource(DatasetInfo):
    """A list img2dataset reads: `url_list` is a local file, folder or glob (after fetching it from `list_origin`)."""

    source: Literal["url_list"]
    url_list: str
    list_origin: str = Field(description="where the list comes from and how to prepare it")
    input_format: Literal["txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz", "parquet"]
    url_col: str = "url"
    caption_col: str | None = None
    column_names: list[str] | None = Field(None, description="csv/tsv without a header line: the names of its columns, in order")
    save_additional_columns: list[str] = []
    rotation_col: str | None = Field(None, description="degrees (0, 90, 180, 270) to turn each image counterclockwise to "
                                     "show it upright (Open Images' Rotation); applied at download")
    allow_private_addresses: bool = Field(
        False, description="download from loopback and private-network addresses too (a test or lab server); "
        "without it a URL whose host resolves to one is a failed row (blocked_address); link-local (the cloud "
        "metadata service), multicast and unspecified addresses are refused either way")

    @model_validator(mode="after")
    def _rotation_is_kept(self):
        if self.rotation_col and self.rotation_col not in self.save_additional_columns:
            raise ValueError(f"rotation_col {self.rotation_col!r} must be one of save_additional_columns")
        return self


class CaptionsFile(StrictModel):
    """Side file of captions for archived images: one record per image, joined on `key_field`.

    `webdataset`: a tar whose members are grouped by stem (`sa_1.txt`, `sa_1.json`); the stem is the key,
    `caption_field` is `txt` (the text member) or a dotted path into the `.json` member."""

    path: str
    format: Literal["jsonl", "json", "tsv", "csv", "parquet", "webdataset"]
    key_field: str
    caption_field: str = Field(description="dotted path into a record, e.g. Task2.Caption")
    match: Literal["basename", "stem", "path"] = Field(
        "basename", description="how an archive member's name is compared with key_field"
    )


class ArchiveSource(DatasetInfo):
    """Images inside local tar archives (`.tar`, `.tar.gz`, `.tgz`), one archive per ingest task."""

    source: Literal["archives"]
    archives: str = Field(description="glob of the local archive files")
    links_file: str | None = Field(None, description="the published list of archives (name<TAB>link), to report missing ones")
    image_extensions: list[str] = [".jpg", ".jpeg", ".png", ".webp"]
    captions: CaptionsFile | None = None


class DemoShapesParams(StrictModel):
    """What `pipelines/demo_shapes.py` draws: coloured shapes on coloured backgrounds, plus broken files on purpose."""

    count: int = Field(2000, ge=1)
    seed: int = 0
    short_edges: list[int] = Field([48, 64, 96, 128, 160], min_length=1)
    short_edge_weights: list[float] | None = None
    aspect_ratios: list[float] = [1.0, 1.0, 1.0, 1.25, 1.5]
    jpeg_fraction: float = Field(0.2, ge=0, le=1)
    truncated: int = Field(3, ge=0, description="JPEGs cut in half: they decode partly")
    not_an_image: int = Field(3, ge=0, description="random bytes served as .jpg")
    zero_byte: int = Field(2, ge=0)
    huge_header: int = Field(2, ge=0, description="PNGs whose header claims 200,000 x 200,000 pixels")
    missing: int = Field(4, ge=0, description="URLs with no file behind them (HTTP 404)")
    held_out: int = Field(0, ge=0, le=225, description="colour-shape-colour combinations never drawn into the set "
                          "(`simplear.demo_captions.held_out_combinations`): the eval stage's held-out prompts")

    @model_validator(mode="after")
    def _weights_match(self):
        if self.short_edge_weights is not None and len(self.short_edge_weights) != len(self.short_edges):
            raise ValueError("short_edge_weights must have one weight per short_edges entry")
        if any(e < 8 for e in self.short_edges):
            raise ValueError("short_edges must be >= 8")
        return self


class GeneratedSource(DatasetInfo):
    source: Literal["generated"]
    generator: Literal["demo_shapes"]
    params: DemoShapesParams = DemoShapesParams()
    input_format: Literal["parquet"] = "parquet"


DatasetManifest = Annotated[Union[UrlListSource, ArchiveSource, GeneratedSource], Field(discriminator="source")]
_ADAPTER: TypeAdapter = TypeAdapter(DatasetManifest)


def load_dataset_manifest(path: str | os.PathLike) -> UrlListSource | ArchiveSource | GeneratedSource:
    """Read and validate one manifest; a mistake raises ConfigError naming the file and the key."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ConfigError(f"{path}: dataset manifest not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if "source" not in raw:
        raise ConfigError(f"{path}: source: required (one of url_list, archives, generated)")
    try:
        manifest = _ADAPTER.validate_python(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}:\n  " + "\n  ".join(describe_validation_error(e))) from None
    if manifest.name != path.stem:
        raise ConfigError(f"{path}: name: {manifest.name!r} must match the file name {path.stem!r}")
    manifest.base_dir = path.parent
    return manifest


def load_all(folder: str | os.PathLike) -> dict[str, UrlListSource | ArchiveSource | GeneratedSource]:
    return {p.stem: load_dataset_manifest(p) for p in sorted(Path(folder).glob("*.yaml"))}


def check_dataset_name(value: str, context: dict | None) -> str:
    """Field validator helper: a stage config naming a dataset must name one the workflow lists."""
    known = (context or {}).get("datasets")
    if known is not None and value not in known:
        raise ValueError(f"unknown dataset {value!r}: list it under `datasets:` (listed: {', '.join(known) or 'none'})")
    return value


__all__ = [
    "ArchiveSource",
    "CaptionsFile",
    "DatasetManifest",
    "DemoShapesParams",
    "GeneratedSource",
    "UrlListSource",
    "check_dataset_name",
    "load_all",
    "load_dataset_manifest",
]
