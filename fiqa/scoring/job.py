"""A scoring job: which shards, which model, where the tables go."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from fiqa import storage
from fiqa.calibration import Logistic4
from fiqa.config import DataConfig, ScoringConfig
from fiqa.models.meta import ModelMeta, read_meta


@dataclass(frozen=True)
class DecodeSpec:
    """How a scoring actor decodes the images it receives as bytes (`fiqa.scoring.device_decode`)."""

    resize: int
    crop: int
    max_pixels: int = 40_000_000
    min_side: int = 16


@dataclass
class ScoreJob:
    """What to score and where to write it."""

    shards: list[str]
    out_dir: str  # writes out_dir/labels/ and out_dir/rejects/
    source: str  # value of the `source` column (e.g. "pseudo_u1", "labeled")
    label_field: str = "mos"  # the field of each sample's json that holds its MOS
    require_label: bool = False  # a sample without one is rejected (labeled data)
    model_path: str | None = None  # None: no model, only read + validate (ingest)
    calibration: Logistic4 | None = None
    model_id: str = ""
    resize: int = 128
    crop: int = 112
    max_pixels: int = 40_000_000
    min_side: int = 16
    max_member_bytes: int = DataConfig.max_member_bytes  # a larger tar member is a reject
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    description: str = ""  # the progress bar's label; "" is "score <source>"
    views: str = "center"  # what a score averages (`fiqa.scoring.scorer.views_of`)
    # The driver's object-storage settings (`fiqa.storage.configure`), travelling with the
    # job to the Ray tasks that read its shards, whatever environment their workers have.
    storage_options: dict = field(default_factory=storage.options)

    @property
    def with_model(self) -> bool:
        return self.model_path is not None

    @property
    def decode_in_actor(self) -> bool:
        """Whether the actors decode JPEGs (``scoring.decode`` as `plan_scoring` resolved it)."""
        return self.with_model and self.scoring.decode == "actor"

    @property
    def decoded_crop(self) -> int:
        """The size the decode tasks decode to: 0 where they yield no pixels (no model, or
        the actors decode)."""
        return self.crop if self.with_model and not self.decode_in_actor else 0

    def decode_spec(self) -> DecodeSpec:
        return DecodeSpec(self.resize, self.crop, self.max_pixels, self.min_side)


def model_id_of(meta: dict, name: str | None = None) -> str:
    """``name:digest`` of a model's metadata (its training fingerprint and calibration);
    ``name`` defaults to the model's architecture."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:12]
    return f"{name or meta.get('arch', 'model')}:{digest}"


def job_for_model(
    model_path: str,
    shards: list[str],
    out_dir: str,
    source: str,
    *,
    scoring: ScoringConfig,
    calibration_override: Logistic4 | None = None,
    model_id: str | None = None,
    label_field: str = "mos",
    require_label: bool = False,
    max_pixels: int = 40_000_000,
    min_side: int = 16,
    max_member_bytes: int = DataConfig.max_member_bytes,
    views: str = "center",
) -> ScoreJob:
    """A scoring job for a trained checkpoint: input size and calibration from its model.json.

    ``calibration_override`` replaces the model's own; ``model_id`` defaults to `model_id_of`.
    ``views`` (`fiqa.config.VIEWS`): with ``crops`` the images are decoded at the model's
    resize, uncropped, and the actor cuts the crops.
    """
    meta = ModelMeta.from_dict(read_meta(model_path))
    return ScoreJob(
        shards=shards,
        out_dir=out_dir,
        source=source,
        label_field=label_field,
        require_label=require_label,
        model_path=model_path,
        calibration=calibration_override or meta.calibration,
        model_id=model_id if model_id is not None else model_id_of(meta.raw),
        resize=meta.resize,
        crop=max(meta.resize, meta.image_size) if views == "crops" else meta.image_size,
        max_pixels=max_pixels,
        min_side=min_side,
        max_member_bytes=max_member_bytes,
        scoring=scoring,
        views=views,
    )
