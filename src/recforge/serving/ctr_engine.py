"""The scoring engine of a CTR artifact: candidate rows with their features in, probabilities out.

A request gives a user (optional), a context (features shared by every candidate: the user's
own features, the time of day, the page) and candidates (each with its own features, e.g. the
item and its category). Each candidate becomes one row: the user id in the schema's user column,
then the context's values, then the candidate's (a candidate's value wins over the context's).
The rows go through the encoders fitted on the run's training part, unchanged, and through the
model in one batch; the answer keeps the candidates' order.

Values: a categorical field takes a string or a number (``5``, ``5.0`` and ``"5"`` are one value,
as in training) or null (the missing value); a numeric field a number, a numeric string or null
(the training mean); a multi-valued or sequence field a list of values or one string split by the
field's ``splitter``. A name that is not a feature is refused (a misspelt field would otherwise
be scored as missing without a word), as is a feature missing from a row. A value never seen in
training is scored as out-of-vocabulary and reported per field in ``unseen``; with
``unseen="error"`` the request is refused instead, naming the field and the values.
"""

from __future__ import annotations

import math

import polars as pl

from recforge.errors import DataError
from recforge.serving.engine import BadRequestError, id_key


def _text(value, field: str):
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise BadRequestError(f"feature {field!r}: {value} is not a category")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (int, str)):
        return id_key(value)
    raise BadRequestError(f"feature {field!r} is categorical: give a string or a number, not {type(value).__name__}")


class CTREngine:
    """One loaded CTR artifact (see the module docstring); immutable after construction."""

    task = "ctr"

    def __init__(self, artifact, threads: int = 1, **_ranking_options):
        self.artifact = artifact
        self.encoder = artifact.encoder
        self.model = artifact.model  # loaded now, not on the first request
        schema = self.encoder.schema
        self.labels = list(schema.labels)
        self.user_column = schema.user
        self.specs = {f.name: f for f in schema.features}
        # the columns a row needs, in the schema's order (the user column may also be a feature)
        self.columns = list(self.specs) + ([schema.user] if schema.user and schema.user not in self.specs else [])
        self.known = set(self.columns)

    @property
    def model_name(self) -> str:
        return self.artifact.model_name

    def close(self) -> None:
        """Nothing runs in the background: scoring happens in the request's thread."""

    def describe(self) -> dict:
        m = self.artifact.manifest
        return {"model": self.model_name, "artifact": str(self.artifact.path), "created": m.get("created"),
                "format_version": m.get("format_version"), "task": "ctr", "labels": self.labels,
                "features": list(self.specs), "n_users": None, "n_items": None, "ann": "none",
                "similar_items": "none", "category_column": None}

    # ---- rows ------------------------------------------------------------------------------------
    def rows(self, user_id, context: dict, candidates: list[dict]) -> pl.DataFrame:
        """The candidate rows as a typed frame (see the module docstring for the rules)."""
        for where, d in [("context", context)] + [(f"candidates.{i}", c) for i, c in enumerate(candidates)]:
            unknown = [k for k in d if k not in self.known]
            if unknown:
                raise BadRequestError(f"{where}: {', '.join(map(repr, unknown[:5]))} "
                                      f"{'is not a feature' if len(unknown) == 1 else 'are not features'} of model "
                                      f"{self.model_name}; its features: {', '.join(self.specs)}")
        base = dict(context)
        if user_id is not None:
            if self.user_column is None:
                raise BadRequestError(f"model {self.model_name} has no user column: leave user_id out")
            base[self.user_column] = user_id
        merged = [{**base, **c} for c in candidates]
        missing = [n for n in self.columns if any(n not in r for r in merged)]
        if missing:
            raise BadRequestError(f"feature(s) {', '.join(map(repr, missing))} missing: give each in the context "
                                  "(shared by every candidate) or in every candidate"
                                  + (f" (the user column {self.user_column!r} may come as user_id)"
                                     if self.user_column in missing else ""))
        cols = {}
        for name in self.columns:
            spec = self.specs.get(name)
            values = [r[name] for r in merged]
            if spec is None or spec.kind == "categorical":  # the user column is read as text
                cols[name] = pl.Series(name, [_text(v, name) for v in values], dtype=pl.Utf8)
            elif spec.kind == "numeric":
                cols[name] = pl.Series(name, [self._number(v, name) for v in values], dtype=pl.Float64)
            else:
                cols[name] = pl.Series(name, [self._tokens(v, spec) for v in values], dtype=pl.List(pl.Utf8))
        return pl.DataFrame(cols)

    @staticmethod
    def _number(value, field: str):
        if value is None:
            return None
        if isinstance(value, bool):
            raise BadRequestError(f"feature {field!r} is numeric: give a number, not a boolean")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise BadRequestError(f"feature {field!r} is numeric: {value!r} is not a number") from None

    @staticmethod
    def _tokens(value, spec) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [t for t in value.split(spec.splitter) if t]
        if isinstance(value, list):
            return [t for t in (_text(v, spec.name) for v in value) if t]
        raise BadRequestError(f"feature {spec.name!r} is a {spec.kind} field: give a list of values or a string "
                              f"split by {spec.splitter!r}")

    # ---- scoring ---------------------------------------------------------------------------------
    def score(self, user_id, context: dict, candidates: list[dict], unseen: str = "oov") -> dict:
        df = self.rows(user_id, context or {}, candidates)
        try:
            table = self.encoder.transform(df, "the request", labels=False, unseen=unseen)
        except DataError as exc:
            raise BadRequestError(str(exc).replace("unseen='oov'", '"unseen": "oov"')) from None
        p = self.model.predict_proba(table)
        return {"model": self.model_name, "user_id": None if user_id is None else id_key(user_id),
                "labels": self.labels,
                "scores": [dict(zip(self.labels, map(float, row))) for row in p],
                "unseen": {k: {"count": int(v["count"]), "examples": [str(e) for e in v["examples"]]}
                           for k, v in table.unseen.items()}}
